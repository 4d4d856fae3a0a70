#!/usr/bin/env bash
# N tfjax replicas on this machine behind vLLM's router (vllm-router, a Rust router from PyPI:
# `pip install -e ".[router]"`; scripts/setup.sh installs it with the test extra).
#
#   bash scripts/serve_replicas.sh --replicas N --port P [tfjax serve args] [-- router args]
#
# Replica i (1..N) serves on 127.0.0.1:P+i; the router listens on 127.0.0.1:P (pass
# `-- --host 0.0.0.0` to expose it) and its own Prometheus metrics on P+N+1. The router waits
# until every replica's /health answers 200 (503 while a replica compiles), then routes
# /v1/* with --router-policy (default cache_aware: prefix-tree affinity, balanced by load),
# retries a request a dead replica refused, and drops a replica whose /health fails.
# Ctrl-C or SIGTERM stops the router and every replica (each drains for its
# --shutdown-grace-s); the script exits non-zero if the router stopped on its own.
#
# Environment: TFJAX_VENV (default .venv) holds the router; TFJAX_SERVE is the replica command
# (default: "$TFJAX_VENV/bin/python -m serving.cli serve", this checkout's code).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${TFJAX_VENV:-.venv}"
read -r -a serve <<< "${TFJAX_SERVE:-$VENV/bin/python -m serving.cli serve}"

replicas=2 port=8000 policy=cache_aware
serve_args=() router_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --replicas) replicas="$2"; shift 2 ;;
    --port) port="$2"; shift 2 ;;
    --router-policy) policy="$2"; shift 2 ;;
    --) shift; router_args=("$@"); break ;;
    *) serve_args+=("$1"); shift ;;
  esac
done
if ! [[ "$replicas" =~ ^[1-9][0-9]*$ && "$port" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 --replicas N --port P [tfjax serve args] [-- router args]" >&2
  exit 2
fi
if [ "$policy" = power_of_two ] && [ "$replicas" -lt 2 ]; then
  echo "power_of_two needs at least 2 replicas" >&2
  exit 2
fi

pids=()
stop() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait "${pids[@]}" 2>/dev/null || true
}
trap 'stop; exit 130' INT
trap 'stop; exit 143' TERM
trap stop EXIT

urls=()
for i in $(seq 1 "$replicas"); do
  "${serve[@]}" --host 127.0.0.1 --port $((port + i)) "${serve_args[@]}" &
  pids+=($!)
  urls+=("http://127.0.0.1:$((port + i))")
done
"$VENV/bin/vllm-router" --host 127.0.0.1 --port "$port" --worker-urls "${urls[@]}" \
  --policy "$policy" --prometheus-port $((port + replicas + 1)) \
  --worker-startup-check-interval 1 --health-check-interval-secs 2 --log-level warning \
  "${router_args[@]}" &
router=$!
pids+=("$router")
echo "router on http://127.0.0.1:$port in front of ${urls[*]} (ready once /health is 200)" >&2
# `wait` returns early when a trapped signal arrives; the trap then stops everything.
status=0
wait "$router" || status=$?
echo "the router stopped (exit $status)" >&2
exit $((status == 0 ? 1 : status))
