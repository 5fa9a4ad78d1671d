#!/usr/bin/env bash
# Rate-limit benchmark (issue 3): the mock provider enforces 600 requests/minute on
# Qwen, ticketflow is configured with the same 600 rpm, and `process` keeps Qwen
# saturated (triage and the cheap tier both use it). After SECONDS of load (default
# 180) the mock's counters give the 429s and the share of the limit used.
#
#   scripts/bench_rate_limit.sh            (RUNS=N to repeat; default 1)
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_OF_LOAD=${SECONDS_OF_LOAD:-180}
RUNS=${RUNS:-1}
WORK=${WORK:-/tmp/ticketflow-bench}
mkdir -p "$WORK"
cargo build --release --quiet
BIN=target/release/ticketflow
[ -s "$WORK/tickets-5000.jsonl" ] || python3 scripts/gen_tickets.py 5000 > "$WORK/tickets-5000.jsonl"

stats() { python3 -c "import json,sys,urllib.request; s=json.load(urllib.request.urlopen('http://$1/admin/stats'))['providers']['qwen']; print(s['requests'], s['rate_limited'], s['max_requests_in_any_60s'])"; }

for run in $(seq 1 "$RUNS"); do
  "$BIN" --config scripts/bench/mock_600rpm.toml mock-provider --listen 127.0.0.1:0 > "$WORK/mock.out" &
  mock=$!
  for _ in $(seq 1 50); do grep -q "listening on" "$WORK/mock.out" 2>/dev/null && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$WORK/mock.out")
  export BENCH_KEY=sk-bench
  env TICKETFLOW__PROVIDERS__QWEN__KIND=dashscope \
      TICKETFLOW__PROVIDERS__QWEN__BASE_URL="http://$addr/qwen/v1" \
      TICKETFLOW__PROVIDERS__QWEN__API_KEY_ENV=BENCH_KEY \
      TICKETFLOW__PROVIDERS__QWEN__REQUESTS_PER_MINUTE=600 \
      TICKETFLOW__PROVIDERS__QWEN__TOKENS_PER_MINUTE=1000000000 \
      TICKETFLOW__LIMITS__MAX_IN_FLIGHT=64 \
      "$BIN" process "$WORK/tickets-5000.jsonl" --quiet --out "$WORK/out-rl" --config scripts/bench/zero_latency.toml \
      > "$WORK/process.out" 2>&1 &
  proc=$!
  read -r r0 l0 _ < <(stats "$addr")
  sleep "$SECONDS_OF_LOAD"
  read -r r1 l1 max60 < <(stats "$addr")
  kill -INT "$proc"; sleep 1; kill -INT "$proc" 2>/dev/null || true; wait "$proc" || true
  kill "$mock"; wait "$mock" || true
  accepted=$((r1 - r0))
  limit=$((600 * SECONDS_OF_LOAD / 60))
  echo "run $run: ${SECONDS_OF_LOAD}s of load: $accepted requests accepted of $limit allowed ($(python3 -c "print(f'{100*$accepted/$limit:.1f}')")% of the limit), 429s: $l1, max in any 60 s window: $max60"
done
