"""The scoring stage: open_clip image-text score and the PP-OCR text-area filter, alone and in the pipeline."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from lance_core.encoders import ClipScorer
from pipelines.data.config import PrecomputeConfig
from pipelines.data.scores import TextDetector, polygon_area, scored_text


def _text_image(text: str | None, size=(256, 192)) -> Image.Image:
    image = Image.new("RGB", size, (236, 236, 230))
    draw = ImageDraw.Draw(image)
    if text:
        draw.text((16, size[1] // 3), text, fill=(10, 10, 10), font=ImageFont.load_default(size=36))
    else:
        draw.ellipse((60, 40, 180, 160), fill=(40, 90, 200))
    return image


def test_clip_scorer_is_deterministic_and_bounded():
    images = torch.rand(3, 3, 48, 80)
    texts = ["a red sign", "a blue circle", "a cat"]
    first = ClipScorer("tiny", seed=0).score(images, texts)
    second = ClipScorer("tiny", seed=0).score(images, texts)
    assert first.shape == (3,) and torch.equal(first, second)
    assert bool(((first >= -1) & (first <= 1)).all())
    different = ClipScorer("tiny", seed=0).score(images, ["a dog", "a blue circle", "a cat"])
    assert different[0] != first[0] and torch.allclose(different[1:], first[1:])


def test_clip_scorer_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="3 images but 2 texts"):
        ClipScorer("tiny").score(torch.rand(3, 3, 32, 32), ["a", "b"])
    with pytest.raises(ValueError, match="needs a local weights file"):
        ClipScorer("ViT-B-32")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        ClipScorer("ViT-B-32", weights=str(tmp_path / "missing.bin"))


def test_clip_preprocess_resizes_shorter_side_and_crops():
    scorer = ClipScorer("tiny")
    out = scorer.preprocess(torch.rand(2, 3, 40, 120))
    assert out.shape == (2, 3, 64, 64)


def test_scored_text_per_task():
    assert scored_text("t2i", "a red sign", "") == "a red sign"
    assert scored_text("i2t", "", "a chart") == "a chart"
    assert scored_text("i2i", "make it blue", "") is None


def test_text_detector_measures_text_area():
    assert polygon_area([[0, 0], [10, 0], [10, 5], [0, 5]]) == 50.0
    detector = TextDetector()
    texty = detector.text_area(np.asarray(_text_image("OPEN 24 HOURS")))
    plain = detector.text_area(np.asarray(_text_image(None)))
    assert 0.03 < texty < 0.6
    assert plain == 0.0


def _manifest(folder: Path) -> Path:
    media = folder / "media"
    media.mkdir(parents=True)
    rows = []
    for index, text in enumerate(["SALE TODAY", None, "HELLO RAY", None, "OPEN LATE", None]):
        name = f"item{index}.png"
        _text_image(text).save(media / name)
        rows.append({"uri": f"media/{name}", "caption": f'a sign that says "{text}"' if text else "a blue circle"})
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _config(manifest, output, **filters) -> PrecomputeConfig:
    return PrecomputeConfig(input=str(manifest), output=str(output), partition_size=3,
                            buckets=dict(image_area=256 * 192, vit_area=56 * 56),
                            filters=dict(dedup=False, **filters))


def _run(manifest, output, **filters):
    from pipelines.data.pipeline import run_precompute

    return run_precompute(_config(manifest, output, **filters), progress=False)


def _rows(output: Path) -> list[dict]:
    return pq.read_table(output / "shards").to_pylist()


@pytest.mark.slow
def test_scores_are_stored_and_filter_in_the_pipeline(ray_local, tmp_path):
    manifest = _manifest(tmp_path / "data")
    semantic = dict(semantic_dedup=True, semantic_dedup_threshold=0.99995)
    _run(manifest, tmp_path / "scored", clip_score=True, text_area_max=1.0, **semantic)
    rows = _rows(tmp_path / "scored")
    assert len(rows) == 6
    _check_semantic_dedup(_config(manifest, tmp_path / "scored", **semantic), manifest, rows)
    scores = {r["source_uri"]: r["clip_score"] for r in rows}
    areas = {r["source_uri"]: json.loads(r["scores"])["text_area"] for r in rows}
    assert all(s is not None and -1 <= s <= 1 for s in scores.values())
    texty = {uri for uri, area in areas.items() if area > 0.02}
    assert texty == {f"{manifest}#{i}" for i in (0, 2, 4)}

    threshold = float(np.median(list(scores.values())))
    _run(manifest, tmp_path / "filtered", clip_score_min=threshold, text_area_max=0.02)
    stats = json.loads((tmp_path / "filtered" / "stats.json").read_text())
    assert stats["inputs"] == stats["inputs_written"] + stats["inputs_filtered"] + stats["inputs_quarantined"] == 6
    low = {uri for uri, s in scores.items() if s < threshold}
    kept = {r["source_uri"] for r in _rows(tmp_path / "filtered")}
    assert kept == set(scores) - low - texty
    assert stats["filtered_by_reason"].get("clip:low_clip_score", 0) == len(low)
    assert stats["filtered_by_reason"].get("text:text_overlay", 0) == len(texty - low)


def _check_semantic_dedup(cfg: PrecomputeConfig, manifest: Path, rows: list[dict]) -> None:
    """Items 1, 3 and 5 are the same picture (the tiny random CLIP puts the text signs within 0.9995 of each
    other, hence the tight threshold): the pass drops 3 and 5 as repeats of 1, and training leaves them out."""
    from pipelines.data.semdedup import run_semantic_dedup
    from pipelines.train.config import DataSection
    from pipelines.train.data import TaskStream
    from pipelines.train.plan import DataPlan, make_plan

    for row in rows:
        assert abs(float(np.linalg.norm(np.asarray(row["clip_embedding"], np.float32))) - 1) < 1e-2
    result = run_semantic_dedup(cfg)
    assert (result.rows, result.embedded, result.dropped) == (6, 6, 2)
    ids = {r["source_uri"]: r["sample_id"] for r in rows}
    drops = pq.read_table(Path(cfg.output) / "semantic_drop.parquet").to_pylist()
    assert {(d["sample_id"], d["duplicate_of"]) for d in drops} == {
        (ids[f"{manifest}#3"], ids[f"{manifest}#1"]), (ids[f"{manifest}#5"], ids[f"{manifest}#1"])}
    dropped = {d["sample_id"] for d in drops}

    data = DataSection(uris=(cfg.output,), holdout_per_task=1)
    plan = DataPlan.from_json(make_plan(data, {"t2i": 1.0}).to_json())
    assert plan.issues["semantic_duplicate_rows"] == 2 and plan.task_rows == {"t2i": 6 - 2 - 1}
    shard_ids = [pq.read_table(s.uri, columns=["sample_id"]).column(0).to_pylist() for s in plan.shards]
    assert {shard_ids[s][r] for s, r in plan.excluded_rows()} == dropped
    stream = TaskStream("t2i", plan, 0, 1, 0, data)
    seen = [stream.next_row()["sample_id"] for _ in range(2 * plan.task_rows["t2i"])]
    assert len(set(seen)) == 3 and not set(seen) & dropped


def test_actor_pools_that_leave_no_cpu_for_tasks_are_refused_up_front(lance_log):
    from pipelines.data.pipeline import check_cpu_budget, reserved_cpus

    cfg = PrecomputeConfig(filters=dict(clip_score=True), encoders=dict(cpus_per_actor=1.0, cpus_per_task=1.0))
    assert reserved_cpus(cfg) == 4.0
    check_cpu_budget(cfg, 4.0, autoscaling=False)
    with pytest.raises(ValueError, match="reserve 4 CPUs .* cluster has 2"):
        check_cpu_budget(cfg, 2.0, autoscaling=False)
    check_cpu_budget(cfg, 2.0, autoscaling=True)
    assert "waiting for the autoscaler" in lance_log.getvalue()
