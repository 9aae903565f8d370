#!/usr/bin/env bash
# One prepared GPU check (bench/gpu/check.py) on a fresh GPU machine, in under 8 minutes all told:
# a virtualenv of its own with torch and the project from the package index, flash-attn when a wheel
# installs within a bounded time (else the check falls back and says so), then the check itself under a
# time budget of what is left. Writes $OUT/gpu_bench.json when OUT is set, else bench/results/gpu_bench.json,
# and prints a table.
#
#   bash bench/gpu/run.sh                      # the GPU check (sets up /tmp/lance-gpu-venv first)
#   bash bench/gpu/run.sh --dry-run            # the same code paths on the CPU, tiny sizes, no install
#   bash bench/gpu/run.sh --layers 4 --tokens 16384   # other arguments go to check.py
#
# Environment: LANCE_GPU_VENV (the virtualenv; reused when it already imports torch), LANCE_GPU_TOTAL_S
# (total seconds, default 470), LANCE_GPU_FLASH_TIMEOUT (seconds for the flash-attn source install
# attempt, default 120; 0 skips it), PYTHON (the interpreter that makes the venv, default python3).
set -uo pipefail
cd "$(dirname "$0")/../.."

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
  # no install: the repository's venv when there is one, else the interpreter on the path
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
  say "dry run with $PY"
  exec "$PY" bench/gpu/check.py --out "$JSON" --setup-note "dry run: no install" "$@"
fi

LOG="$RESULT_DIR/gpu_setup.log"   # the setup's own output (pip, apt, nvidia-smi)
: > "$LOG"
NOTES=()
note() { NOTES+=("$*"); say "$*"; }

nvidia-smi >>"$LOG" 2>&1 || note "nvidia-smi failed: no NVIDIA driver?"

# ------------------------------------------------------------------------------------ system tools
# torch.compile (flex attention) builds Triton's launcher with a C compiler and Python's headers.
PYTHON=${PYTHON:-python3}
apt_install() {
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    timeout 60 apt-get update -qq >>"$LOG" 2>&1
    DEBIAN_FRONTEND=noninteractive timeout 90 apt-get install -y -qq "$@" >>"$LOG" 2>&1
  else
    return 1
  fi
}
PY_INCLUDE=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['include'])" 2>/dev/null)
if ! command -v cc >/dev/null 2>&1 || [ ! -f "$PY_INCLUDE/Python.h" ] || ! "$PYTHON" -c "import ensurepip" 2>/dev/null; then
  if apt_install gcc python3-dev python3-venv; then
    note "apt: installed gcc, Python headers and venv"
  else
    note "apt: could not install gcc / Python headers / venv (flex attention may fail to compile)"
  fi
fi

# ------------------------------------------------------------------------------------ virtualenv
VENV=${LANCE_GPU_VENV:-${TMPDIR:-/tmp}/lance-gpu-venv}
PY="$VENV/bin/python"
if [ -x "$PY" ] && "$PY" -c "import torch, transformers, diffusers, pydantic" 2>/dev/null; then
  note "reused $VENV (torch $("$PY" -c 'import torch; print(torch.__version__)'))"
else
  "$PYTHON" -m venv "$VENV" || { echo "cannot create a venv with $PYTHON" >&2; exit 1; }
  "$PY" -m pip install -q --upgrade pip >>"$LOG" 2>&1
  # torch's CUDA build from the package index must suit the driver: CUDA 13 builds need driver >= 580,
  # the CUDA 12.8 builds (torch 2.8) >= 570, CUDA 12.6 (torch 2.7) runs on >= 525
  DRIVER=$(nvidia-smi --query-gpu=driver_version --format=csv,noheader 2>/dev/null | head -1 | cut -d. -f1)
  if [ -z "$DRIVER" ]; then SPEC=(torch torchvision)
  elif [ "$DRIVER" -ge 580 ]; then SPEC=(torch torchvision)
  elif [ "$DRIVER" -ge 570 ]; then SPEC=("torch>=2.5,<2.9" "torchvision<0.24")
  else SPEC=("torch>=2.5,<2.8" "torchvision<0.23"); fi
  say "driver ${DRIVER:-unknown}: installing ${SPEC[*]} and the project (log: $LOG)"
  # uv downloads in parallel; pip when uv cannot be had
  if "$PY" -m pip install -q uv >>"$LOG" 2>&1 \
      && "$VENV/bin/uv" pip install --python "$PY" "${SPEC[@]}" -e . >>"$LOG" 2>&1; then
    note "installed ${SPEC[*]} and the project with uv"
  elif "$PY" -m pip install -q "${SPEC[@]}" -e . >>"$LOG" 2>&1; then
    note "installed ${SPEC[*]} and the project with pip"
  else
    tail -20 "$LOG" >&2
    echo "install failed; see $LOG" >&2
    exit 1
  fi
fi
"$PY" -c "import torch; assert torch.cuda.is_available()" 2>/dev/null \
  || note "torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device (driver ${DRIVER:-?})"

# ------------------------------------------------------------------------------------ flash-attn
if "$PY" -c "import flash_attn" 2>/dev/null; then
  note "flash-attn already installed"
else
  # a wheel on the index installs in seconds; else flash-attn's own setup (which fetches its prebuilt
  # wheel for this torch and CUDA, or compiles) gets a bounded time, so that the check keeps >= 4 minutes
  FLASH_TIMEOUT=${LANCE_GPU_FLASH_TIMEOUT:-120}
  LEFT=$(( TOTAL - $(elapsed) - 240 ))
  [ "$FLASH_TIMEOUT" -gt "$LEFT" ] && FLASH_TIMEOUT=$LEFT
  if timeout 60 "$PY" -m pip install -q --only-binary=:all: flash-attn >>"$LOG" 2>&1; then
    note "flash-attn: installed a prebuilt wheel from the index"
  elif [ "$FLASH_TIMEOUT" -gt 0 ] && "$PY" -m pip install -q packaging ninja psutil wheel setuptools >>"$LOG" 2>&1 \
      && timeout --kill-after=10 "$FLASH_TIMEOUT" "$PY" -m pip install -q --no-build-isolation flash-attn \
         >>"$LOG" 2>&1; then  # timeout ends the whole process group: pip and any compiler it started
    note "flash-attn: installed by its setup within ${FLASH_TIMEOUT} s"
  else
    note "flash-attn: no prebuilt wheel within the time allowed (${FLASH_TIMEOUT} s for the setup); the check falls back to torch SDPA / flex"
  fi
fi

# ------------------------------------------------------------------------------------ the check
BUDGET=$(( TOTAL - $(elapsed) - 40 ))   # torch import and CUDA start before the budget; watchdog grace after it
[ "$BUDGET" -gt 400 ] && BUDGET=400
if [ "$BUDGET" -lt 60 ]; then
  note "only ${BUDGET} s left after the setup: the check runs with 60 s"
  BUDGET=60
fi
SETUP_NOTE=$(printf '%s; ' ${NOTES[@]+"${NOTES[@]}"})
SETUP_NOTE=${SETUP_NOTE%; }
say "check: budget ${BUDGET} s -> $JSON"
timeout --kill-after=10 $(( BUDGET + 60 )) "$PY" bench/gpu/check.py --out "$JSON" --budget-s "$BUDGET" \
  --setup-note "setup $(elapsed) s: $SETUP_NOTE" "$@"
RC=$?
say "done (check exit code $RC)"
exit "$RC"
