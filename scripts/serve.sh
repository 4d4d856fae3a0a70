#!/usr/bin/env bash
# The README's serve command: set up .venv, then serve the embedded default model
# (SmolLM2-135M-Instruct) on http://127.0.0.1:8000. Extra arguments go to `tfjax serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${TFJAX_VENV:-.venv}/bin/tfjax" serve --model default "$@"
