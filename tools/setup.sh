#!/usr/bin/env bash
# Set up normref from scratch in ./.venv: the pinned CPU build of PyTorch first (an unpinned
# `torch` would pull a multi-GB CUDA build), then the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[test,jax,refs,onnx,keras]"
# timm's layer modules (EvoNorm2d*, SplitBatchNorm2d) for the torch adapter, without its dependencies:
# PyPI's torchvision does not import beside the CPU torch build, and only the layer files are loaded
# (conformance/adapters/_timm.py), never `import timm`.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps timm==1.0.31
