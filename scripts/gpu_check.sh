#!/usr/bin/env bash
# GPU check for the attention backends, the ragged step (issue 15) and quantized decode (issue
# 28), prepared to run on one CUDA machine in under 12 minutes. Writes everything under $OUT
# (default out/gpu_check):
#   attention.xml        (1) every backend vs the dense reference at bfloat16 on mixed lengths
#                            (tests/models/test_attention.py on the real Triton/cuDNN kernels)
#   smollm2/ llama3_8b/  (2) scripts/bench_engine.py JSON: decode at batches 1/16/64/128 and
#                            contexts 512/2k, SmolLM2-135M shape and Llama-3-8B shape (random
#                            bf16 weights), plus SmolLM2 prefill at batch 16, context 512
#   llama3_8b_int8/ llama3_8b_fp8/
#                        (2b) the same decode at batches 1/64, context 512, with the weights
#                            kept int8 / fp8 (--quantization, issue 28); the floor counts their
#                            bytes
#   gpu_check.json       (3) every step time beside its HBM floor (weights + KV read once per
#                            step, at the measured read bandwidth) and the GPU's name
# Usage: OUT=/some/dir scripts/gpu_check.sh   (python: $PYTHON, default python3)
# Needs jax with CUDA, flax, orbax, qwix, pytest and gguf importable; a missing pure-Python
# package can travel as a wheel in .whl/ (installed into /tmp/site below).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-out/gpu_check}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
export TFJAX_CACHE_DIR="${TFJAX_CACHE_DIR:-/tmp/tfjax-cache}"
"$PY" -c "import jax; assert jax.default_backend() == 'gpu', jax.devices(); print(jax.devices())" \
  || { echo "gpu_check: no CUDA device visible to jax" >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >"$OUT/nvidia_smi.csv" 2>&1

status=0
echo "== (1) attention backends vs reference, bfloat16" >&2
TFJAX_ATTENTION_DTYPE=bfloat16 timeout 150 "$PY" -m pytest -q -p no:cacheprovider \
  tests/models/test_attention.py --junitxml="$OUT/attention.xml" 2>&1 | tee "$OUT/attention.log" \
  || status=1

echo "== (2) bench_engine: decode grid" >&2
for shape in smollm2-135m llama3-8b; do
  timeout 170 "$PY" scripts/bench_engine.py --shape "$shape" --dtype bfloat16 --skip-prefill \
    --batches 1,16,64,128 --contexts 512,2048 --new-tokens 12 --out "$OUT/${shape//[-.]/_}" \
    2>&1 | tee "$OUT/${shape//[-.]/_}.log" || status=1
done
echo "== (2b) bench_engine: Llama-3-8B-shaped decode with quantized weights" >&2
for q in int8 fp8; do
  timeout 120 "$PY" scripts/bench_engine.py --shape llama3-8b --dtype bfloat16 --skip-prefill \
    --batches 1,64 --contexts 512 --new-tokens 12 --quantization "$q" \
    --out "$OUT/llama3_8b_$q" 2>&1 | tee "$OUT/llama3_8b_$q.log" || status=1
done
echo "== (2) bench_engine: SmolLM2-shaped prefill" >&2
timeout 60 "$PY" scripts/bench_engine.py --shape smollm2-135m --dtype bfloat16 --batches 16 \
  --contexts 512 --new-tokens 4 --out "$OUT/smollm2_prefill" 2>&1 | tee "$OUT/prefill.log" \
  || status=1

echo "== (3) summary" >&2
"$PY" - "$OUT" <<'PYEOF' || status=1
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
summary = {"rows": []}
for name in ("smollm2_135m", "llama3_8b", "llama3_8b_int8", "llama3_8b_fp8", "smollm2_prefill"):
    path = out / name / "bench_engine.json"
    if not path.exists():
        summary["rows"].append({"model": name, "missing": True})
        continue
    run = json.loads(path.read_text())
    summary.update(device_kind=run["device_kind"], attention_backend=run["attention_backend"])
    summary.setdefault("hbm_read_bytes_per_s", run["read_bandwidth_bytes_per_s"])
    for row in run["rows"]:
        step, floor = row["ours"]["decode_step_median_ms"], row["floor"]["decode_read_ms"]
        summary["rows"].append({
            "model": name, "batch": row["batch"], "context": row["context"],
            "decode_step_ms": step, "hbm_floor_ms": floor, "x_floor": step / floor,
            "prefill_tokens_per_s": row["ours"].get("prefill_tokens_per_s"),
        })
        print(f"{name:16} b={row['batch']:<4} ctx={row['context']:<5} step {step:8.2f} ms"
              f"  floor {floor:7.2f} ms  x{step / floor:5.2f}")
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
PYEOF
exit $status
