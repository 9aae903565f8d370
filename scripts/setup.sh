#!/usr/bin/env bash
# One-command setup: system packages (ffmpeg), a virtualenv in .venv, the project with every job's extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v ffmpeg >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "== installing ffmpeg (apt)"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "== ffmpeg not found and apt-get unavailable: install ffmpeg with your package manager" >&2
  fi
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
echo "== installing the project and its extras (pip)"
python -m pip install -q -e ".[all,dev]"
echo "== setup done: activate with '. .venv/bin/activate'"
