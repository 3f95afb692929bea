#!/usr/bin/env bash
# The wheels a GPU machine without network needs for pldr-train / pldr-bench, built into .whl/
# (gitignored) where pip works, then the line that installs them there. The machine has torch
# and Triton; it lacks DeepSpeed (built here with DS_BUILD_OPS=0: its ops compile at run time
# or are not used), its small pure-Python dependencies and torchao (train.precision=fp8). torchao
# goes into .whl/torchao/<version>/ for several versions, newest first: the install line keeps
# the first that imports against the machine's torch. Idempotent: what .whl/ holds is kept.
#
#   bash tools/device_wheels.sh            # then, on the GPU machine, the printed line
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEEPSPEED=0.19.8
TORCHAO_VERSIONS="0.18.0 0.17.0 0.16.0"
DEPS="webdataset braceexpand hjson pydantic pydantic-core annotated-types typing-inspection zstandard typing-extensions"
PLATFORM=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
          --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
mkdir -p .whl

have() { compgen -G "$1" >/dev/null; }   # a wheel matching the glob is already there
norm() { echo "$1" | tr '-' '_'; }       # wheel file names spell - as _

if ! have ".whl/deepspeed-$DEEPSPEED-*.whl"; then
  echo "[device_wheels] building deepspeed $DEEPSPEED (DS_BUILD_OPS=0)"
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps "deepspeed==$DEEPSPEED" -w .whl
fi
missing=()
for dep in $DEPS; do
  have ".whl/$(norm "$dep")-*.whl" || missing+=("$dep")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[device_wheels] downloading ${missing[*]}"
  $PY -m pip download -q --no-deps "${PLATFORM[@]}" -d .whl "${missing[@]}"
fi
for v in $TORCHAO_VERSIONS; do
  if ! have ".whl/torchao/$v/torchao-$v-*.whl"; then
    echo "[device_wheels] downloading torchao $v"
    mkdir -p ".whl/torchao/$v"
    $PY -m pip download -q --no-deps "${PLATFORM[@]}" -d ".whl/torchao/$v" "torchao==$v"
  fi
done
for dep in deepspeed $DEPS; do   # two versions of one package stop the whole install there
  n=$(compgen -G ".whl/$(norm "$dep")-*.whl" | wc -l)
  [ "$n" -le 1 ] || { echo "[device_wheels] .whl/ holds $n wheels of $dep: keep one" >&2; exit 1; }
done
echo "[device_wheels] .whl/ is ready ($(du -sh .whl | cut -f1)); carry .whl and begin the GPU machine's command with:"
echo "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site" \
  ".whl/*.whl && export PYTHONPATH=\$PWD:/tmp/site || exit; for v in $TORCHAO_VERSIONS; do python3 -m pip install -q" \
  "--no-index --no-deps --no-compile --target /tmp/ao\$v .whl/torchao/\$v/*.whl && PYTHONPATH=/tmp/ao\$v:\$PYTHONPATH" \
  "python3 -c 'import torchao.float8' 2>/dev/null && export PYTHONPATH=/tmp/ao\$v:\$PYTHONPATH && break; done;"
