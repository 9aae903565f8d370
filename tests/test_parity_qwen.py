"""Parity of the UND path with transformers' Qwen2.5-VL: a tiny random Qwen2.5-VL checkpoint written by
``save_pretrained``, loaded into the Lance model (qk_norm and MaPE off), gives the same logits in fp32.

Our side takes the ViT features from the same HF vision tower and the position ids from
``lance_core.positions``; Qwen's LLM is causal over every token, image tokens included, so the whole
sequence is one causal span of one sample."""

import pytest
import torch

from lance_core.checkpoint import load_qwen25vl_weights
from lance_core.config import model_preset
from lance_core.model import AttentionLayout, TokenInputs, build_model
from lance_core.positions import SpanPosition, position_ids
from tests.qwen_tiny import SPECIAL, TOKENS_PER_SECOND, save_random_qwen

PATCH_DIM = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch
MERGE = 2
SECONDS_PER_GRID = 1.0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cfg = model_preset("tiny", qk_norm=False, mape=False)
    path = tmp_path_factory.mktemp("qwen")
    qwen = save_random_qwen(path, cfg, seed=0)
    lance = build_model(cfg).eval()
    report = load_qwen25vl_weights(lance, path)
    assert report.copied_to_gen > 0 and report.skipped_vision > 0 and not report.tied_lm_head
    return qwen, lance


def _lance_logits(lance, ids, spans, vit_positions=None, vit_features=None):
    n = ids.numel()
    zeros = torch.zeros(n, dtype=torch.long)
    layout = AttentionLayout(zeros, zeros, torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool))
    empty = torch.zeros(0, dtype=torch.long)
    inputs = TokenInputs(
        input_ids=ids, is_gen=torch.zeros(n, dtype=torch.bool), position_ids=position_ids(spans, mape=False),
        layout=layout, vae_positions=empty, vae_values=torch.zeros(0, 48), vae_timesteps=torch.zeros(0),
        vae_grid=torch.zeros(0, 3, dtype=torch.long),
        vit_positions=empty if vit_positions is None else vit_positions,
        vit_features=torch.zeros(0, lance.cfg.hidden_size) if vit_features is None else vit_features)
    with torch.no_grad():
        hidden, _ = lance.backbone(inputs)
        return lance.text_logits(hidden), inputs.position_ids


def test_text_only_logits_match(pair):
    qwen, lance = pair
    ids = torch.randint(0, 256, (24,))
    with torch.no_grad():
        reference = qwen(input_ids=ids[None]).logits[0]
    ours, our_positions = _lance_logits(lance, ids, [SpanPosition(24, "text")])
    assert torch.equal(our_positions, torch.arange(24).expand(3, -1))
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


# Patch grids (T, H, W) of the vision tower; the LLM sees (T, H/2, W/2) tokens after the 2x2 merger.
# An image is one temporal patch (2 identical frames); 56x84 px -> (1, 4, 6) -> 1x2x3 LLM tokens.
IMAGE = ("image", (1, 4, 6))
# 4 frames of 56x84 px -> (2, 4, 6) -> 2x2x3 LLM tokens with temporal ids step 2 (tokens per second x
# seconds per grid). transformers 5.23's get_rope_index moves the text index after a visual span by
# max(H', W') rather than by (largest id + 1), the rule of Qwen2.5-VL and of lance_core.positions; the two
# agree only when (T' - 1)·2 < max(H', W'), which holds here (2 < 3), so the comparison checks numerics
# rather than that difference. (A (2, 4, 4) grid, 2x2x2 LLM tokens, would not: 2 = max(2, 2).)
VIDEO = ("video", (2, 4, 6))


def _sequence(items):
    """[<|im_start|> text] then per item [<|vision_start|> pads <|vision_end|> text], then <|im_end|>."""
    ids, token_type, spans, vit_positions, text_run = [SPECIAL.im_start, 10, 11, 12], [0] * 4, [], [], 4
    for kind, (t, h, w) in items:
        llm_grid = (t, h // MERGE, w // MERGE)
        n = llm_grid[0] * llm_grid[1] * llm_grid[2]
        ids.append(SPECIAL.vision_start)
        token_type.append(0)
        spans.append(SpanPosition(text_run + 1, "text"))
        vit_positions.extend(range(len(ids), len(ids) + n))
        ids.extend([SPECIAL.video_pad if kind == "video" else SPECIAL.image_pad] * n)
        token_type.extend([2 if kind == "video" else 1] * n)
        # An image has one grid frame, so its temporal step never shows (HF uses 1 for images).
        spans.append(SpanPosition(n, "vit", llm_grid, temporal_step=TOKENS_PER_SECOND * SECONDS_PER_GRID))
        ids.extend([SPECIAL.vision_end, 20, 21, 22])
        token_type.extend([0] * 4)
        text_run = 4
    ids.append(SPECIAL.im_end)
    token_type.append(0)
    spans.append(SpanPosition(text_run + 1, "text"))
    return torch.tensor(ids), torch.tensor(token_type, dtype=torch.int32), spans, torch.tensor(vit_positions)


@pytest.mark.parametrize("items", [[IMAGE], [VIDEO], [IMAGE, VIDEO]], ids=["image", "video", "image+video"])
def test_text_and_visual_logits_match(pair, items):
    qwen, lance = pair
    ids, token_type, spans, vit_positions = _sequence(items)
    grids = {kind: torch.tensor([g for k, g in items if k == kind]) for kind in ("image", "video")}
    # random patches: the vision tower is random too, so real pixels would test nothing more here
    pixels = {kind: torch.randn(int(grid.prod(-1).sum()), PATCH_DIM)
              for kind, grid in grids.items() if len(grid)}
    kwargs = {}
    if "image" in pixels:
        kwargs.update(pixel_values=pixels["image"], image_grid_thw=grids["image"])
    if "video" in pixels:
        kwargs.update(pixel_values_videos=pixels["video"], video_grid_thw=grids["video"],
                      second_per_grid_ts=torch.full((len(grids["video"]),), SECONDS_PER_GRID))
    with torch.no_grad():
        reference = qwen(input_ids=ids[None], mm_token_type_ids=token_type[None], **kwargs).logits[0]
        image = (qwen.model.get_image_features(pixels["image"], grids["image"]).pooler_output
                 if "image" in pixels else ())
        video = (qwen.model.get_video_features(pixels["video"], grids["video"]).pooler_output
                 if "video" in pixels else ())
        rope, _ = qwen.model.get_rope_index(
            ids[None], token_type[None], image_grid_thw=kwargs.get("image_grid_thw"),
            video_grid_thw=kwargs.get("video_grid_thw"), second_per_grid_ts=kwargs.get("second_per_grid_ts"))
    per_kind = {"image": iter(image), "video": iter(video)}
    features = torch.cat([next(per_kind[kind]) for kind, _ in items])
    ours, our_positions = _lance_logits(lance, ids, spans, vit_positions, features)
    assert torch.equal(our_positions, rope[:, 0])
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)


def test_gen_expert_starts_as_a_copy_of_und(pair):
    _, lance = pair
    state = lance.state_dict()
    gen_keys = [k for k in state if "_moe_gen" in k]
    assert "language_model.model.norm_moe_gen.weight" in gen_keys
    for key in gen_keys:
        assert torch.equal(state[key], state[key.replace("_moe_gen", "")]), key
