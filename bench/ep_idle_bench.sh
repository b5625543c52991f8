#!/bin/bash
# One EP2 group on the CPU (pdbus multi-serve, the built-in model), requests to rank 0 only: rank 1
# idles and must join every step's collectives. Prints serve_bench's TPOT / ITL at concurrency 1.
#   bash bench/ep_idle_bench.sh [out_dir]
set -eu
cd "$(dirname "$0")/.."
OUT=${1:-bench/out/ep_idle}; mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
P0=$($PY -c "from pdbus.testing import free_port; print(free_port())")
P1=$($PY -c "from pdbus.testing import free_port; print(free_port())")
$PY -m pdbus multi-serve --ports "$P0,$P1" --num-servers 2 --args --splitwise-role mixed \
    --enable-expert-parallel --data-parallel-size 2 --kv-cache-memory-gb 0.1 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for port in $P0 $P1; do
    for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.2; done
done
$PY bench/serve_bench.py --base-url "http://127.0.0.1:$P0" --num-prompts 16 --input-len 32 --output-len 64 \
    --max-concurrency 1 --warmup-rounds 1 --json "$OUT/result.json" 2>&1 | tail -n 25
