#!/usr/bin/env bash
# Fetch, on a machine with the package index, the wheels the GPU check needs beyond what a GPU box's Python
# already holds (torch, transformers, safetensors, pyarrow, einops, pillow, tiktoken, numpy and their
# dependencies), into bench/gpu/wheels/ (ignored by git). bench/gpu/run.sh installs them there with no network.
# Ray is not among them: the check runs the training worker and the GRPO learner without it.
#
#   bash bench/gpu/fetch_wheels.sh            # CPython 3.12, manylinux x86_64 (the GPU box)
#   PY_VERSION=3.11 bash bench/gpu/fetch_wheels.sh
#
# DeepSpeed publishes no wheel: its source is built into a pure-Python wheel here (no ops compiled; the
# check uses torch's AdamW, so none is needed there either). Needs pip and, for that build, torch.
set -euo pipefail
cd "$(dirname "$0")/../.."

PY_VERSION=${PY_VERSION:-3.12}
DEST=bench/gpu/wheels
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
# each at the version this project's environment runs (the tests' versions); binary ones for the box's platform
PURE=(hjson annotated-types typing-inspection diffusers importlib-metadata zipp py-cpuinfo pydantic)
BINARY=(pydantic-core msgpack psutil pyyaml)
pinned() {  # name==version as installed here
  for name in "$@"; do
    "$PYTHON" -c "import importlib.metadata as m, sys; print(f'{sys.argv[1]}=={m.version(sys.argv[1])}')" "$name"
  done
}
mapfile -t PURE < <(pinned "${PURE[@]}")
mapfile -t BINARY < <(pinned "${BINARY[@]}")
DEEPSPEED=$(pinned deepspeed)

rm -rf "$DEST"
mkdir -p "$DEST"
PLATFORMS=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$tag")
done
echo "== binary wheels for CPython $PY_VERSION x86_64"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  "${PLATFORMS[@]}" -d "$DEST" "${BINARY[@]}"
echo "== pure-Python wheels"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" -d "$DEST" \
  "${PURE[@]}"
echo "== $DEEPSPEED: its source built into a wheel (no ops)"
BUILD=$(mktemp -d)
"$PYTHON" -m pip download -q --no-deps --no-binary=:all: -d "$BUILD" "$DEEPSPEED"
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" "$BUILD"/deepspeed-*.tar.gz
rm -rf "$BUILD"
ls -l "$DEST"
du -sh "$DEST"
