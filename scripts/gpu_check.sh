#!/usr/bin/env bash
# GPU check (issue 25): correctness of the attention kernels and the engine, then decode and
# prefill speed against their floors, as one JSON verdict ($OUT/gpu_check.json) and an exit
# code that gates (0 pass, 1 a check failed or a target was missed, 2 no usable environment).
# The logic and the targets are in tfjax/bench/gpu_check.py; about 8 minutes on a fresh H200.
#
#   bash scripts/gpu_check.sh [--dry-run] [--only=decode,prefill]
#                                    OUT=dir (default out/gpu_check), PYTHON=python3
#
# --dry-run: the same logic on CPU, tiny shapes, Pallas kernels interpreted; targets not judged.
# Runs on a bare CUDA image (jax with CUDA plugins, flax, orbax-checkpoint, transformers,
# tokenizers, safetensors, jinja2, pytest, httpx, prometheus-client) with only this repository
# and .whl/ (git-ignored; 3.5 MB): the packages that image lacks, for its Python 3.12. Fill it
# in one command on a machine with network access, in the repository root:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform \
#     manylinux_2_31_x86_64 -d .whl gguf starlette uvicorn qwix 'llguidance>=1.9,<2'
# (their own dependencies are in the image). $OUT/gpu_check.json is rewritten after every
# section, so a run stopped from outside keeps what it checked.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
PY="${PYTHON:-python3}"
DRY_RUN=()
ONLY=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=(--dry-run) ;;
    --only=*) ONLY=(--only "${arg#--only=}") ;;
    *) echo "gpu_check: unknown argument $arg (usage: gpu_check.sh [--dry-run] [--only=a,b])" >&2
       exit 2 ;;
  esac
done
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  SITE="${TMPDIR:-/tmp}/tfjax-gpu-check-site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" .whl/*.whl || { echo "gpu_check: cannot install .whl/" >&2; exit 2; }
  export PYTHONPATH="$SITE:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TFJAX_CACHE_DIR="${TFJAX_CACHE_DIR:-${TMPDIR:-/tmp}/tfjax-cache}"
if [ ${#DRY_RUN[@]} -eq 0 ]; then
  "$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices()" \
    || { echo "gpu_check: no CUDA device visible to jax (use --dry-run on CPU)" >&2; exit 2; }
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/nvidia_smi.csv" 2>&1
fi
exec "$PY" -m tfjax.bench gpu-check --out "$OUT" "${DRY_RUN[@]}" "${ONLY[@]}"
