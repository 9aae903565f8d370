"""bench/train_plan.py runs end to end (quick mode) and writes its JSON; no timing is asserted."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_train_plan_bench_quick(tmp_path):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train_plan.py"), "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["quick"] is True and result["rows"]
    for row in result["rows"]:
        assert {"rows", "shards", "plan_s", "driver_peak_mib"} <= set(row)
        assert row["plan_s"] > 0 and row["driver_peak_mib"] > 0
        assert row["trainable"] + row["filtered"] + row["held_out"] == row["rows"]
    assert [(row["rows"], row["shards"]) for row in result["rows"]] == [(10**6, 10**3), (10**7, 10**3)]
