#!/usr/bin/env bash
# Create .venv (once) and install tfjax with its test extra into it. Idempotent: a second run
# only checks that the installed package still matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TFJAX_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -U pip
fi
stamp="$VENV/.tfjax-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "installing tfjax and its dependencies into $VENV (first time: a few minutes)" >&2
  "$VENV/bin/pip" install -q -e ".[test]"
  touch "$stamp"
fi
