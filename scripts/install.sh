#!/usr/bin/env bash
# Install diffalign into ./.venv (idempotent). torch comes first, pinned, so that pip takes the build already on
# this kind of machine (torch 2.14.1 / torchvision 0.29.1, a CUDA build that also runs on CPU) instead of resolving
# a different one from the registry; use pip, not uv or poetry, which do not see those local files.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[dev,demo]"
