"""Training state under faults (issue 13): a metrics line cut by a kill does not stop a resume, metric
rewrites and the export copy are atomic, and a rank's data state is stored as JSON + safetensors, a format
whose loading cannot run code."""

from __future__ import annotations

import json
import pickle
import random

import pytest
import torch

from lance_core.packing import Sample, Span
from pipelines.runtime.local_files import copy_file_atomic
from pipelines.runtime.run_log import MetricsLog
from pipelines.train import checkpoints as ckpt
from pipelines.train.metrics import METRICS_FILE, read_metrics


def _rows(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in steps)


def test_a_metrics_line_cut_by_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text(_rows(range(1, 6)) + '{"step": 6, "lo')  # killed while appending step 6
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    writer = MetricsLog(tmp_path, "step", tensorboard=False)
    writer.resume_at(5)  # resumed from the step-4 checkpoint
    assert path.read_text() == _rows(range(1, 5))
    writer.append({"step": 5, "loss": 0.5})
    writer.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)][-2:] == [(4, 0.25), (5, 0.5)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [METRICS_FILE]  # no temporary file left


def test_a_cut_line_followed_by_more_rows_loses_only_that_line(tmp_path):
    (tmp_path / METRICS_FILE).write_text(_rows([1]) + '{"step": 2, "lo\n' + _rows([2, 3]) + "\n\n")
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_export_copy_replaces_the_file_whole(tmp_path):
    source = tmp_path / "src.safetensors"
    source.write_bytes(b"new" * 1000)
    target = tmp_path / "run" / "model.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"old")
    copy_file_atomic(source, target)
    assert target.read_bytes() == b"new" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]


def _data_state() -> dict:
    rng = random.Random(7)
    rng.random()
    noise = torch.Generator().manual_seed(3)
    spans = [Span("causal", "text", torch.arange(5), ce_targets=torch.tensor([False, True, True, False, True])),
             Span("noise", "target", torch.zeros(6, dtype=torch.long), grid=(1, 2, 3),
                  latents=torch.randn(6, 48).to(torch.bfloat16), clean_frames=1)]
    loader = {"streams": {"t2i": {"epoch": 1, "shard_pos": 2, "row": 17, "ordinal": 9, "yielded_in_epoch": 4}},
              "rng": rng.getstate(), "buffer": [Sample("t2i", spans, key="shard-0:17")], "skipped": 2,
              "counters": {"bad_rows": 1, "filtered_rows": 3}}
    return {"loader": loader, "pending": [(9, {"t2i": 0.25, "i2t": 0.75}), (10, {"t2i": 1 / 3})],
            "noise_rng": noise.get_state()}


def test_data_state_is_json_and_safetensors_and_resumes_exactly(tmp_path):
    state = _data_state()
    ckpt.save_data_state(tmp_path, 1, state)
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert files == ["slot_00001.json", "slot_00001.safetensors"]
    json.loads((tmp_path / "data" / "slot_00001.json").read_text())  # plain JSON, no pickle
    back = ckpt.load_data_state(tmp_path, 1)

    rng, again = random.Random(), random.Random(7)
    rng.setstate(back["loader"]["rng"])
    again.random()
    assert [rng.random() for _ in range(3)] == [again.random() for _ in range(3)]
    noise = torch.Generator()
    noise.set_state(back["noise_rng"])
    assert torch.equal(torch.rand(4, generator=noise), torch.rand(4, generator=torch.Generator().manual_seed(3)))
    assert back["pending"] == state["pending"] and isinstance(back["pending"][0], tuple)
    assert back["loader"]["streams"] == state["loader"]["streams"]
    assert back["loader"]["counters"] == state["loader"]["counters"]
    sample, want = back["loader"]["buffer"][0], state["loader"]["buffer"][0]
    assert isinstance(sample, Sample) and sample.key == want.key and sample.num_tokens == want.num_tokens
    for got, span in zip(sample.spans, want.spans):
        assert (got.mode, got.role, got.grid, got.clean_frames) == (span.mode, span.role, span.grid, span.clean_frames)
        for name in ("token_ids", "latents", "ce_targets", "vit_features"):
            a, b = getattr(got, name), getattr(span, name)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), name


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_data_state_loading_runs_no_code(tmp_path, capsys):
    ckpt.save_data_state(tmp_path, 0, _data_state())
    (tmp_path / "data" / "rank_00000.pt").write_bytes(pickle.dumps(_Payload()))  # a pickle planted beside it
    ckpt.load_data_state(tmp_path, 0)
    assert "code ran" not in capsys.readouterr().out
    path = tmp_path / "data" / "slot_00000.json"
    path.write_text(json.dumps({"__object__": "Popen", "fields": {"args": ["true"]}}))
    with pytest.raises(ValueError, match="'Popen' is not a class a data state may hold"):
        ckpt.load_data_state(tmp_path, 0)
    with pytest.raises(TypeError, match="cannot hold a _Payload"):
        ckpt.save_data_state(tmp_path, 0, {"loader": _Payload()})
