#!/usr/bin/env bash
# Start-up fit for autoscaling: how soon `tfjax serve` answers /health 200, and how a burst
# sent at that moment fares against the same burst once every bucket is compiled.
#
#   bash scripts/measure_startup.sh [--port P] [--burst N] [--output-len L] [--out DIR] \
#       [-- tfjax serve arguments]
#
# One run: start the server (a child of this script), poll /health every 0.1 s until 200
# (ready_s, from the process start), send a burst of N streamed completions at once
# (`tfjax bench serve`, N=32 by default, 128-token prompts), poll /metrics until
# tfjax_compiled_buckets equals tfjax_buckets (all_compiled_s), send a burst of the same shape
# again (other prompts), stop the server with SIGTERM.
# Prints one line per run with both bursts' output tok/s, their ratio, and the serving-path
# compiles (tfjax_compiles_after_warmup_total, must be 0); DIR keeps the server log and both
# bursts' result.json. A warm start is a run after another one (the persistent XLA cache and
# the converted weights are filled); a cold one: move $TFJAX_CACHE_DIR/xla (default
# ~/.cache/tfjax/xla) aside first. `-- --compile-all-first` measures the old start-up, which
# compiled every bucket before serving. Timing means nothing on a busy machine: run it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${TFJAX_VENV:-.venv}/bin/python"
PORT=8123
BURST=32
OUTPUT_LEN=64
OUT=out/startup
while [[ $# -gt 0 ]]; do
  case "$1" in
    --port) PORT="$2"; shift 2 ;;
    --burst) BURST="$2"; shift 2 ;;
    --output-len) OUTPUT_LEN="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument $1 (serve arguments go after --)" >&2; exit 2 ;;
  esac
done
URL="http://127.0.0.1:$PORT"
mkdir -p "$OUT"

now() { date +%s.%N; }
since() { "$PY" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
metric() { curl -s "$URL/metrics" | awk -v name="$1" '$1 == name {print $2}'; }
burst() {
  "$PY" -m tfjax.bench serve --base-url "$URL" --num-prompts "$BURST" --random-input-len 128 \
    --random-input-len-std 0 --random-output-len "$OUTPUT_LEN" --random-output-len-std 0 \
    --seed "$2" --save-result --result-dir "$OUT/$1" --disable-tqdm >/dev/null
  "$PY" -c "import json, sys; r = json.load(open(sys.argv[1])); \
print(f\"{r['output_throughput']:.1f} {r['failed']}\")" "$OUT/$1/result.json"
}

start=$(now)
"$PY" -m serving.cli serve --port "$PORT" "$@" >"$OUT/serve.out" 2>"$OUT/serve.log" &
server=$!
trap 'kill -TERM $server 2>/dev/null || true; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 6000); do  # 600 s at most
  code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/health" || true)
  [[ "$code" == 200 ]] && break
  kill -0 $server 2>/dev/null || { echo "tfjax serve exited; see $OUT/serve.log" >&2; exit 1; }
  sleep 0.1
done
ready_s=$(since "$start")
compiled_at_ready="$(metric tfjax_compiled_buckets)/$(metric tfjax_buckets)"
read -r first_tok_s first_failed < <(burst first 0)
for _ in $(seq 6000); do
  [[ "$(metric tfjax_compiled_buckets)" == "$(metric tfjax_buckets)" ]] && break
  sleep 0.1
done
all_compiled_s=$(since "$start")
# Other prompts of the same lengths: no prefix-cache hits, and the same work as the first
# burst (with lengths drawn per seed, seed 0's prompts were 9 % longer than seed 1's).
read -r warm_tok_s warm_failed < <(burst warm 1)
compiles=$(metric tfjax_compiles_after_warmup_total)
ratio=$("$PY" -c "import sys; print(f'{float(sys.argv[1]) / float(sys.argv[2]):.3f}')" \
  "$first_tok_s" "$warm_tok_s")
echo "ready_s=$ready_s buckets_at_ready=$compiled_at_ready all_compiled_s=$all_compiled_s" \
  "first_burst_tok_s=$first_tok_s warm_burst_tok_s=$warm_tok_s first/warm=$ratio" \
  "failed=$first_failed+$warm_failed serving_path_compiles=$compiles"
