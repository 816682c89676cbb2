#!/usr/bin/env bash
# The heavy tier: tests marked `extended` (the default model's whole job end to end, torchrun with
# several processes, a real engine run, the README's example on the default model). The main suite
# (`.venv/bin/python -m pytest`) deselects them to stay under 15 minutes; CI runs both.
set -euo pipefail
cd "$(dirname "$0")/.."
KVTUNE_EXTENDED=1 .venv/bin/python -m pytest -p no:cacheprovider "$@"
