#!/usr/bin/env bash
# Installs everything pldr_dist needs on a Debian machine (run as root): system packages
# (Open MPI for mpi4py/mpirun, SLURM + munge for the launcher tests) and a virtual
# environment in .venv with pldr_dist and its Python dependencies. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
need_apt=()
command -v mpirun >/dev/null || need_apt+=(openmpi-bin)
command -v slurmctld >/dev/null || need_apt+=(slurm-wlm)
command -v munged >/dev/null || need_apt+=(munge)
command -v make >/dev/null || need_apt+=(make)
python3 -c "import venv, ensurepip" 2>/dev/null || need_apt+=(python3-venv python3-pip)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "[setup] apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  python3 -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip >/dev/null
# CPU machines get the CPU build of torch; a machine with torch already has it kept.
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
$PIP install -q -e ".[test]"
echo "[setup] done: $(.venv/bin/python -c 'import torch, deepspeed; print("torch", torch.__version__, "deepspeed", deepspeed.__version__)' 2>/dev/null | tail -1)"
