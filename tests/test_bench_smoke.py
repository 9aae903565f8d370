"""The benchmarks run end to end (quick mode) and write their JSON; no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("script,keys", [
    ("attention.py", {"tokens", "samples", "dense_ms", "flex_ms", "per_sample_ms", "speedup", "dense_mib"}),
    ("model_step.py", {"model", "backend", "tokens_per_s", "fill", "step_ms"}),
])
def test_bench_quick(tmp_path, script, keys):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert rows and keys <= set(rows[0])
