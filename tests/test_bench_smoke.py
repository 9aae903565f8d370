"""The benchmarks run end to end (quick mode) and write their JSON; no timing is asserted."""

import json
import os
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


def test_gpu_check_scripts_parse():
    for script in ("run.sh", "fetch_wheels.sh"):
        run = subprocess.run(["bash", "-n", str(GPU_CHECK / script)], capture_output=True, text=True, check=False)
        assert run.returncode == 0, (script, run.stderr)


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """The GPU check's code on the CPU, as ``bench/gpu/run.sh --dry-run`` runs it: the training worker under
    torch.distributed (ZeRO-2 and ZeRO-3, bf16 where the CPU runs it, EMA, save -> resume -> export), the GRPO
    learner, the attention backends against the reference, evaluation with the compile count, the encoders;
    every check passes, every part has its figures or says why it fell back. Not timed: no budget."""
    run = subprocess.run(["bash", str(GPU_CHECK / "run.sh"), "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                         timeout=1500, check=False, env={**os.environ, "OUT": str(tmp_path)})
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-3000:]
    assert "PASS  zero3: export loads and holds the fp32 EMA" in run.stdout and "FAIL" not in run.stdout
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert result["dry_run"] is True and result["budget_s"] is None
    assert result["checks_failed"] == 0 and result["checks_passed"] >= 20
    assert result["environment"]["flash_attn"]["available"] is False
    for part in ("training", "grpo_learner", "attention", "evaluation", "encoders", "nccl_broadcast"):
        section = result[part]
        assert section["status"] in ("ok", "fallback"), (part, section)
        for row in section["rows"]:
            assert row["status"] in ("ok", "fallback") and (row["status"] == "ok" or row["reason"]), (part, row)
    assert [row["zero_stage"] for row in result["training"]["rows"]] == [2, 3]
    assert all(row["tokens_per_s"] > 0 and row["mfu"] > 0 for row in result["training"]["rows"])
    flash, flex, per_sample = result["attention"]["rows"]
    assert per_sample["backend"] == "per_sample" and per_sample["status"] == "ok"
    assert flash["backend"] == "per_sample" and "flash-attn" in flash["reason"] and flash["passes"] == "fwd+bwd"
    assert flex["backend"] == "flex" and flex["passes"] == "fwd" and "backward" in flex["reason"]
    evaluation = result["evaluation"]["rows"][0]
    assert evaluation["backend"] == "flex" and len(evaluation["lengths"]) > len(evaluation["buckets"])
    assert evaluation["compiles"] < len(evaluation["lengths"])
    assert {item["status"] for item in result["not_as_on_gpu"]} <= {"fallback", "skipped"}
