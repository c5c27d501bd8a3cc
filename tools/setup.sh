#!/usr/bin/env bash
# Set up normref from scratch in ./.venv: the pinned CPU build of PyTorch first (an unpinned
# `torch` would pull a multi-GB CUDA build), then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,jax,refs,onnx]"
