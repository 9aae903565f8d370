"""Positions, splits and masks against the released Lance code's measured behaviour.

Every layout of ``../shared/fixtures/lance_release/positions.json`` is rebuilt twice: from its span list
through :mod:`lance_core.positions` alone, and through our sample builders (same texts, same grids) and
the packer. Ids, masks and loss positions must equal the release's exactly.
"""

from __future__ import annotations

import json

import pytest
import torch

from lance_core.config import model_preset
from lance_core.model import AttentionLayout
from lance_core.packing import (
    IGNORE_INDEX,
    VisualInput,
    build_generation_sample,
    build_understanding_sample,
    pack_samples,
)
from lance_core.positions import SpanPosition, position_ids
from lance_core.prompts import generation_system_prompt
from lance_core.tokenizer import load_tokenizer

ROLE_OF_MODALITY = {1: "target", 2: "source", 3: "reference", 4: "vit"}
TASK_OF_LAYOUT = {
    "t2i": "t2i", "t2v": "t2v", "i2v": "i2v", "i2i_edit": "i2i", "i2i_edit_target_larger": "i2i",
    "i2i_edit_target_transposed": "i2i", "v2v_edit": "v2v", "subject_2ref": "subject", "i2t": "i2t",
    "v2t": "v2t", "i2t_two_images": "i2t", "t2i_inference": "t2i",
}
HIDDEN = 8
CHANNELS = 48
PACK_CFG = model_preset("tiny", hidden_size=HIDDEN, latent_channels=CHANNELS, vit={"out_hidden_size": HIDDEN})


@pytest.fixture(scope="module")
def release(shared_dir):
    folder = shared_dir / "fixtures" / "lance_release"
    return {name: json.loads((folder / f"{name}.json").read_text())
            for name in ("positions", "splits_and_mask", "system_prompts")}


@pytest.fixture(scope="module")
def qwen_tokenizer():
    tok = load_tokenizer(None)
    if len(tok) != 151_665:
        pytest.skip("the Qwen2.5 tokenizer (qwen.tiktoken of the dashscope package) is not installed")
    return tok


def _layouts(release):
    return {layout["name"]: layout for layout in release["positions"]["layouts"]}


def _grid(span) -> tuple[int, int, int]:
    return tuple(span["grid_thw"] if span["kind"] == "vit" else span["latent_thw"])


def span_positions(layout) -> list[SpanPosition]:
    """The release's span list as ours: each visual span takes its two markers."""
    out, spans, i = [], layout["spans"], 0
    while i < len(spans):
        span = spans[i]
        if span["kind"] == "vision_start":
            visual = spans[i + 1]
            out.append(SpanPosition(visual["n"] + 2, ROLE_OF_MODALITY[visual["modality"]], _grid(visual),
                                    bracketed=True))
            i += 3
        else:
            out.append(SpanPosition(span["n"], "text"))
            i += 1
    return out


@pytest.mark.parametrize("name", list(TASK_OF_LAYOUT))
def test_positions_from_span_list_equal_the_release(release, name):
    layout = _layouts(release)[name]
    spans = span_positions(layout)
    assert position_ids(spans, mape=False).tolist() == layout["position_ids_before_mape"]
    assert position_ids(spans, mape=True).tolist() == layout["position_ids"]


def _visual_input(vit_span, vae_span) -> VisualInput:
    visual = VisualInput()
    if vit_span is not None:
        grid = _grid(vit_span)
        visual.vit_features = torch.randn(vit_span["n"], HIDDEN)
        visual.vit_grid = grid
        visual.is_video = grid[0] > 1
    if vae_span is not None:
        visual.latents = torch.randn(*_grid(vae_span), CHANNELS)
        visual.is_video = vae_span["latent_thw"][0] > 1
    return visual


def _strip(text: str, prefix: str = "", suffix: str = "") -> str:
    assert text.startswith(prefix) and text.endswith(suffix), text
    return text[len(prefix):len(text) - len(suffix)]


def build_like_release(layout, tok):
    """Our builder called with the layout's texts and grids."""
    task = TASK_OF_LAYOUT[layout["name"]]
    spans = layout["spans"]
    system = _strip(spans[0]["text"], "<|im_start|>system\n", "<|im_end|>\n")
    visuals = [s for s in spans if s["kind"] in ("vit", "vae")]
    if task in ("i2t", "v2t"):
        media = [_visual_input(s, None) for s in visuals]
        after = [s for s in spans if s["kind"] == "text" and s["start"] > visuals[-1]["start"]]
        question = _strip(after[0]["text"], suffix="<|im_end|>\n")
        answer = _strip(after[1]["text"], "<|im_start|>assistant\n", "<|im_end|>")
        return build_understanding_sample(tok, task, media, question, answer, system=system)
    caption = next(s["text"] for s in spans if s["modality"] == 0)
    target = next(s for s in visuals if s["modality"] == 1)
    pairs = {}
    for span in visuals[:-1]:
        pairs.setdefault(span["modality"] if span["modality"] != 4 else "vit", []).append(span)
    vits = pairs.get("vit", [])
    references = [_visual_input(v, r) for v, r in zip(vits, pairs.get(3, []))]
    source = _visual_input(vits[0], pairs[2][0]) if 2 in pairs else None
    return build_generation_sample(tok, task, caption, torch.randn(*_grid(target), CHANNELS), source=source,
                                   references=references, first_frame_clean=bool(target.get("clean_latent_frames")),
                                   system=system)


def _expected_ids(layout) -> list[int]:
    ids = []
    for span in layout["spans"]:
        if span["kind"] == "text":
            ids += span["ids"]
        elif span["kind"] == "vision_start":
            ids.append(151652)
        elif span["kind"] == "vision_end":
            ids.append(151653)
        else:
            ids += [151656] * span["n"]
    return ids


def _ranges(pairs) -> list[int]:
    return [i for start, stop in pairs for i in range(start, stop)]


@pytest.mark.parametrize("name", list(TASK_OF_LAYOUT))
def test_builders_and_packer_equal_the_release(release, qwen_tokenizer, name):
    layout = _layouts(release)[name]
    sample = build_like_release(layout, qwen_tokenizer)
    batch = pack_samples([sample], PACK_CFG)
    assert batch.input_ids.tolist() == _expected_ids(layout)
    assert batch.position_ids.tolist() == layout["position_ids"]
    assert torch.nonzero(batch.mse_mask).squeeze(1).tolist() == _ranges(layout.get("mse_loss_indexes") or [])
    ce = torch.nonzero(batch.ce_labels != IGNORE_INDEX).squeeze(1)
    assert ce.tolist() == _ranges(layout.get("ce_loss_indexes") or [])
    if "label_ids" in layout:
        assert batch.ce_labels[ce].tolist() == layout["label_ids"]
    # markers belong to their visual span: same span index, UND expert
    for span in layout["spans"]:
        if span["kind"] in ("vision_start", "vision_end"):
            neighbour = span["start"] + (1 if span["kind"] == "vision_start" else -1)
            assert batch.span_index[span["start"]] == batch.span_index[neighbour]
            assert not batch.is_gen[span["start"]]


@pytest.mark.parametrize("name", ["t2v", "i2i_edit", "subject_2ref", "i2t"])
def test_attention_mask_equals_the_release(release, qwen_tokenizer, name):
    fixture = next(x for x in release["splits_and_mask"]["layouts"] if x["name"] == name)
    sample = build_like_release(_layouts(release)[name], qwen_tokenizer)
    batch = pack_samples([sample], PACK_CFG)
    mask = AttentionLayout.from_batch(batch).dense_mask()
    expected = torch.tensor([[c == "1" for c in row] for row in fixture["allowed"]])
    assert mask.shape == expected.shape
    assert int(mask.sum()) == fixture["allowed_pairs"]
    assert torch.equal(mask, expected)


def test_mask_of_a_sample_packed_second_is_its_own(release, qwen_tokenizer):
    layouts = _layouts(release)
    fixture = next(x for x in release["splits_and_mask"]["layouts"] if x["name"] == "i2i_edit")
    first = build_like_release(layouts[fixture["as_second_sample_of_a_pack"]["first_sample_of_the_pack"]],
                               qwen_tokenizer)
    second = build_like_release(layouts["i2i_edit"], qwen_tokenizer)
    batch = pack_samples([first, second], PACK_CFG)
    mask = AttentionLayout.from_batch(batch).dense_mask()
    n = first.num_tokens
    expected = torch.tensor([[c == "1" for c in row] for row in fixture["allowed"]])
    assert torch.equal(mask[n:, n:], expected)
    assert not mask[n:, :n].any() and not mask[:n, n:].any()
    assert batch.position_ids[:, n:].tolist() == layouts["i2i_edit"]["position_ids"]


def test_system_prompts_are_the_released_texts_in_training_and_inference(release):
    by_task = {}
    for entry in release["system_prompts"]["tasks"]:
        by_task.setdefault(entry["task"], {})[entry["path"]] = entry["text"]
    # one text per task for both paths; t2i takes the prompt the released weights were trained with
    assert generation_system_prompt("t2i", video=False) == by_task["t2i"]["training"]
    assert by_task["t2i"]["inference"] != by_task["t2i"]["training"]
    for task, ours in (("t2v", "t2v"), ("i2v", "i2v"), ("i2i", "i2i"), ("v2v", "v2v"),
                       ("subject (idip, multi-reference)", "subject")):
        video = ours in ("t2v", "i2v", "v2v")
        assert generation_system_prompt(ours, video) == by_task[task]["training"] == by_task[task]["inference"]
    candidates = release["system_prompts"]["candidates"]
    assert generation_system_prompt("subject", video=True) == candidates["idip/video"][0]
    from lance_core.prompts import DESCRIPTION_PROMPTS

    assert list(DESCRIPTION_PROMPTS[False]) == candidates["caption/image"]
    assert list(DESCRIPTION_PROMPTS[True]) == candidates["caption/video"]


@pytest.mark.parametrize("name", ["t2i", "t2v", "i2v", "i2i_edit", "v2v_edit", "subject_2ref", "v2t"])
def test_builders_default_to_the_released_system_prompt(release, qwen_tokenizer, name):
    layout = _layouts(release)[name]
    task = TASK_OF_LAYOUT[name]
    if task == "v2t":
        video = VisualInput(vit_features=torch.randn(8, HIDDEN), vit_grid=(2, 2, 2), is_video=True)
        sample = build_understanding_sample(qwen_tokenizer, task, video, "", None)
    else:
        frames = 2 if task in ("t2v", "i2v", "v2v") else 1
        source = VisualInput(latents=torch.randn(frames, 1, 1, CHANNELS)) if task in ("i2i", "v2v") else None
        sample = build_generation_sample(qwen_tokenizer, task, "x", torch.randn(frames, 1, 1, CHANNELS),
                                         source=source)
    system_ids = layout["spans"][0]["ids"]
    assert sample.spans[0].token_ids[:len(system_ids)].tolist() == system_ids
