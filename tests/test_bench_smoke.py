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
    ("attention.py", {"heads", "kv_heads", "head_dim", "block_size", "rows", "scaling"}, ATTENTION_KEYS),
    ("model_step.py", {"threads", "rows"}, MODEL_STEP_KEYS),
    ("precompute.py", {"images", "written", "clips", "stage_rates", "vae_alone_runs", "overlap_ratios"},
     {"figure", "value", "baseline", "ratio"}),
    ("shards.py", {"reps", "batch_rows", "rows"},
     {"shape", "layout", "bytes", "bytes_ratio", "read_rows_per_s", "read_mb_per_s", "read_speedup"}),
    ("video_memory.py", {"rows", "source_first", "flat"},
     {"seconds", "clips", "blocks", "peak_mib", "video_mib", "beside_video_mib", "beside_ratio", "peak_ratio"}),
])
def test_bench_quick(tmp_path, script, top_keys, row_keys):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert top_keys <= set(result)
    assert result["rows"] and all(row_keys <= set(row) for row in result["rows"])
