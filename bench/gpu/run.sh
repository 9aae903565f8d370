#!/usr/bin/env bash
# The prepared GPU check (bench/gpu/check.py) on a fresh single-GPU box with no network, in under 8 minutes:
# the box's own Python with CUDA torch (and transformers, safetensors, pyarrow, einops, pillow, tiktoken),
# plus the wheels bench/gpu/fetch_wheels.sh fetched beforehand into bench/gpu/wheels/ (installed into a
# folder of their own, nothing downloaded), then the check under a time budget of what is left. It runs the
# jobs' own code (the training worker under torch.distributed, the GRPO learner, the encoders), not Ray.
# Writes $OUT/gpu_bench.json when OUT is set, else bench/results/gpu_bench.json, and prints a table with a
# PASS / FAIL line per check.
#
#   bash bench/gpu/fetch_wheels.sh             # beforehand, where the package index is reachable
#   bash bench/gpu/run.sh                      # on the GPU box
#   bash bench/gpu/run.sh --dry-run            # the same code on the CPU, tiny sizes (the tests run this)
#
# Environment: PYTHON (default python3), LANCE_GPU_TOTAL_S (total seconds, default 470), LANCE_GPU_SITE (where
# the wheels go, default /tmp/lance-gpu-site).
set -uo pipefail
cd "$(dirname "$0")/../.."
REPO=$(pwd)

START=$(date +%s)
TOTAL=${LANCE_GPU_TOTAL_S:-470}
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "== [$(elapsed) s] $*"; }

DRY_RUN=0
for arg in "$@"; do [ "$arg" = "--dry-run" ] && DRY_RUN=1; done
if [ -n "${OUT:-}" ]; then RESULT_DIR=$OUT; else RESULT_DIR=bench/results; fi
mkdir -p "$RESULT_DIR"
JSON="$RESULT_DIR/gpu_bench.json"

if [ "$DRY_RUN" = 1 ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
  say "dry run with $PY (no install)"
  DS_ACCELERATOR=cpu exec "$PY" bench/gpu/check.py --out "$JSON" --setup-note "dry run: no install" "$@"
fi

LOG="$RESULT_DIR/gpu_setup.log"
: > "$LOG"
NOTES=()
note() { NOTES+=("$*"); say "$*"; }
nvidia-smi >>"$LOG" 2>&1 || note "nvidia-smi failed: no NVIDIA driver?"

PY=${PYTHON:-python3}
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'" >>"$LOG" 2>&1 \
  || { echo "$PY: torch sees no CUDA device (see $LOG)" >&2; exit 2; }
note "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), torch $("$PY" -c 'import torch; print(torch.__version__)')"

WHEELS=bench/gpu/wheels
SITE=${LANCE_GPU_SITE:-/tmp/lance-gpu-site}
if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  rm -rf "$SITE"
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
      >>"$LOG" 2>&1; then
    note "installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE (no network)"
  else
    tail -20 "$LOG" >&2
    echo "installing the wheels of $WHEELS failed; see $LOG" >&2
    exit 2
  fi
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
  note "no wheels in $WHEELS (bench/gpu/fetch_wheels.sh fetches them where the index is reachable): using what $PY has"
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
MISSING=$("$PY" - <<'EOF' 2>>"$LOG"
import importlib
missing = []
for name in ("torch", "deepspeed", "pydantic", "diffusers", "transformers", "safetensors", "pyarrow", "yaml", "fsspec"):
    try:
        importlib.import_module(name)
    except Exception as err:  # an ABI mismatch raises more than ImportError
        missing.append(f"{name} ({type(err).__name__}: {err})")
print("; ".join(missing))
EOF
)
if [ -n "$MISSING" ]; then
  echo "cannot import: $MISSING (see $LOG; bench/gpu/fetch_wheels.sh fetches the wheels)" >&2
  exit 2
fi
"$PY" -c "import flash_attn" 2>/dev/null && note "flash-attn installed" \
  || note "flash-attn not installed (no network to fetch it): the flash rows fall back to flex / SDPA, said so"

BUDGET=$(( TOTAL - $(elapsed) - 40 ))   # torch import and CUDA start before the budget; watchdog grace after it
[ "$BUDGET" -gt 420 ] && BUDGET=420
[ "$BUDGET" -lt 60 ] && BUDGET=60
SETUP_NOTE=$(printf '%s; ' ${NOTES[@]+"${NOTES[@]}"})
SETUP_NOTE=${SETUP_NOTE%; }
say "check: budget ${BUDGET} s -> $JSON"
timeout --kill-after=10 $(( BUDGET + 60 )) "$PY" bench/gpu/check.py --out "$JSON" --budget-s "$BUDGET" \
  --setup-note "setup $(elapsed) s: $SETUP_NOTE" "$@"
RC=$?
say "done (check exit code $RC)"
exit "$RC"
