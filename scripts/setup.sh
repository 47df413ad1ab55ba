#!/usr/bin/env bash
# Create .venv and install lossmask with its training and test dependencies.
#
# torch is installed first, so that the extras cannot pull a multi-GB CUDA build by accident:
#   1. an already importable torch is kept (install your own CUDA build first if you want one);
#   2. else a torch wheel that pip finds locally (its --find-links, as on machines that carry one);
#   3. else the CPU build from the PyTorch index (TORCH_INDEX_URL to choose another), else PyPI's default.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if $PIP install -q --no-index --no-deps torch 2>/dev/null; then
    $PIP install -q torch
  else
    $PIP install -q torch --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" \
      || $PIP install -q torch
  fi
fi
$PIP install -q -e ".[train,test,scale,bench]"
.venv/bin/python -c "import lossmask, torch; print(f'lossmask {lossmask.__version__} installed (torch {torch.__version__})')"
