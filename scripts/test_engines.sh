#!/usr/bin/env bash
# The tests that need a package kept out of kvtune's install, each in that package's venv
# (scripts/setup_engines.sh makes them). The main suite deselects these; with KVTUNE_NO_SKIPS=1
# (CI) a test skipped for anything but missing hardware fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
# vLLM's store and attention kernels (Triton, interpreted on CPU) against kvtune's formats; its argument parser.
TRITON_INTERPRET=1 .venvs/vllm/bin/python -m pytest -p no:cacheprovider -m needs_vllm \
    tests/test_vllm_formats.py tests/test_turboquant_vllm.py tests/test_engine_export.py "$@"
# lm-evaluation-harness through the quantized cache.
.venvs/lmeval/bin/python -m pytest -p no:cacheprovider -m needs_lm_eval tests/test_lmeval.py "$@"
