"""The benchmarks run end to end (quick mode) and write their JSON; no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ATTENTION_KEYS = {"tokens", "samples", "sum_len_sq_over_l_sq", "flex_visited_over_l_sq", "dense_ms", "flex_ms",
                  "per_sample_ms", "speedup", "per_sample_speedup", "mask_ms", "flex_warmup_s", "dense_mib",
                  "flex_mib", "per_sample_mib", "flex_ns_per_len_sq", "dense_ns_per_l_sq"}
MODEL_STEP_KEYS = {"model", "backend", "budget", "fill", "real_tokens", "step_ms", "tokens_per_s", "over_sdpa",
                   "fwd_ms", "fwd_tokens_per_s", "fwd_over_sdpa"}


@pytest.mark.slow
@pytest.mark.parametrize("script,top_keys,row_keys", [
    ("activation_memory.py", {"model", "host_bytes", "rows", "fits"},
     {"policy", "tokens", "step_peak_bytes", "over_none", "step_s"}),
    ("attention.py", {"heads", "kv_heads", "head_dim", "block_size", "rows", "scaling"}, ATTENTION_KEYS),
    ("dedup.py", {"hashes", "distance", "rows", "extrapolation"},
     {"index", "actors", "stored_per_actor", "bytes_per_item", "bytes_per_record", "claims_per_s", "claims_ratio"}),
    ("model_step.py", {"threads", "rows"}, MODEL_STEP_KEYS),
    ("ocr_reward.py", {"side", "reps", "rows", "speedup"},
     {"setting", "detector_input", "s_per_image", "ratio", "cpu_ratio", "mean_reward", "exact_share", "models"}),
    ("precompute.py", {"images", "written", "clips", "stage_rates", "vae_alone_runs", "overlap_ratios"},
     {"figure", "value", "baseline", "ratio"}),
    ("planning.py", {"quick", "cpus", "load", "rows"},
     {"source", "files", "records", "plan_s", "time_ratio", "plan_peak_mib", "peak_ratio", "plan_bytes_per_file",
      "reread_ms", "reread_peak_kib", "series"}),
    ("sequence_parallel.py", {"processes", "threads", "reps", "rows"},
     {"model", "tokens_per_rank", "dp_ms", "sp_ms", "sp_over_dp", "a2a_mib"}),
    ("shards.py", {"reps", "batch_rows", "rows"},
     {"shape", "layout", "bytes", "bytes_ratio", "read_rows_per_s", "read_mb_per_s", "read_speedup"}),
    ("video_memory.py", {"rows", "source_first", "flat"},
     {"seconds", "clips", "blocks", "peak_mib", "video_mib", "beside_video_mib", "beside_ratio", "peak_ratio"}),
    ("weight_sync.py", {"receivers", "reps", "rows", "ratios"},
     {"tensors", "params", "mib", "mode", "seconds", "gb_per_s", "ratio"}),
])
def test_bench_quick(tmp_path, script, top_keys, row_keys):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert top_keys <= set(result)
    assert result["rows"] and all(row_keys <= set(row) for row in result["rows"])


GPU_CHECK = ROOT / "bench" / "gpu"
GPU_CHECK_RATES = {"model_step": "tokens_per_s", "vae_encode": "images_per_s", "vit_encode": "tokens_per_s",
                   "nccl_broadcast": "gb_per_s"}


def test_gpu_check_script_parses():
    run = subprocess.run(["bash", "-n", str(GPU_CHECK / "run.sh")], capture_output=True, text=True, check=False)
    assert run.returncode == 0, run.stderr


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The GPU check's code paths on the CPU: every section has its numbers, or the reason it fell back or
    was skipped; nothing fails. (A generous budget, so that a loaded host does not skip parts.)"""
    out = tmp_path / "gpu_bench.json"
    run = subprocess.run([sys.executable, str(GPU_CHECK / "check.py"), "--dry-run", "--budget-s", "150",
                          "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "nccl_broadcast" in run.stdout  # the table
    result = json.loads(out.read_text())
    assert result["dry_run"] is True
    env = result["environment"]
    assert env["status"] == "ok" and env["peak_tflops"] > 0 and env["flash_attn"]["available"] is False
    for name, rate in GPU_CHECK_RATES.items():
        section = result[name]
        assert section["status"] in ("ok", "fallback", "skipped"), (name, section)
        if section["status"] == "skipped":
            assert section["reason"], name
            continue
        assert section["rows"], name
        for row in section["rows"]:
            assert row["status"] in ("ok", "fallback"), (name, row)
            assert row[rate] > 0, (name, row)
            assert row["status"] == "ok" or row["reason"], (name, row)
    if result["model_step"]["status"] != "skipped":
        flash, flex = result["model_step"]["rows"]
        assert flash["backend"] == "per_sample" and "flash-attn" in flash["reason"] and flash["passes"] == "fwd+bwd"
        assert flex["backend"] == "flex" and flex["passes"] == "fwd" and "backward" in flex["reason"]
        assert flash["mfu"] > 0 and result["model_step"]["pack"]["samples"] >= 2
    fell_back = {(item["part"], item["status"]) for item in result["not_as_on_gpu"]}
    assert all(status in ("fallback", "skipped") for _, status in fell_back)
