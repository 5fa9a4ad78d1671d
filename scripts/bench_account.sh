#!/usr/bin/env bash
# Account-wide limits and budgets across replicas (issue 14). RabbitMQ, PostgreSQL,
# the mock provider and REPLICAS `ticketflow worker` processes share this machine.
#
#   scripts/bench_account.sh limits    REPLICAS workers on one queue of N tickets whose
#       replies all go to Mistral; the mock provider enforces RPM requests per sliding
#       minute on Mistral and every replica is configured with the same RPM. After the
#       first answer and a 5 s settling, measures SECONDS_OF_LOAD seconds: Mistral
#       requests per second and their share of the limit, the most requests sent in
#       any 60 s (429s included) and the 429s. KILL=1 kills one replica with SIGKILL
#       half-way and starts another. HEARTBEAT_MS=0 turns the sharing off (each
#       process enforces the whole limit: the comparison).
#   scripts/bench_account.sh budget    REPLICAS workers on N tickets all routed to the
#       premium tier with a daily cap of CAP dollars: the premium spend of the fleet
#       (from the ledger), the dearest premium ticket, and how many degraded.
#
# Defaults: REPLICAS=3 RPM=600 SECONDS_OF_LOAD=62 N=3000 (limits) or 300 (budget)
# CAP=0.05 RUNS=1. BIN=path overrides the binary. Prints one line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
SCENARIO=${1:-limits}
REPLICAS=${REPLICAS:-3}
RPM=${RPM:-600}
SECONDS_OF_LOAD=${SECONDS_OF_LOAD:-62}
CAP=${CAP:-0.05}
RUNS=${RUNS:-1}
KILL=${KILL:-0}
HEARTBEAT_MS=${HEARTBEAT_MS:-1000}
case "$SCENARIO" in
  limits) N=${N:-3000} ;;
  budget) N=${N:-300} ;;
  *) echo "usage: $0 limits|budget" >&2; exit 2 ;;
esac
WORK=${WORK:-/tmp/ticketflow-bench}
mkdir -p "$WORK"
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/ticketflow
fi

. scripts/bench/mock_env.sh

workers=()
cleanup() {
  for w in "${workers[@]}"; do kill -9 "$w" 2>/dev/null || true; done
  [ -n "${mock:-}" ] && kill "$mock" 2>/dev/null || true
}
trap cleanup EXIT

stats() {
  python3 -c "import json,urllib.request; s=json.load(urllib.request.urlopen('http://$addr/admin/stats'))['providers']['mistral']; print(s['requests'], s['ok'], s['rate_limited'], s['max_sent_in_any_60s'])"
}

start_worker() {
  "$BIN" --config scripts/bench/account.toml worker 2>> "$WORK/account-workers.err" &
  workers+=($!)
}

for run in $(seq 1 "$RUNS"); do
  tag="tf-bench-acct-$$-$run"
  db="tf_bench_account_$$_$run"
  python3 - "$N" "$tag" > "$WORK/account-tickets.jsonl" <<'PY'
import json, sys
n, tag = int(sys.argv[1]), sys.argv[2]
for i in range(n):
    print(json.dumps({"ticket_id": f"{tag}-{i}", "messages": [{"role": "customer", "text": f"Where is my order {i}? It has not arrived."}]}))
PY
  export TICKETFLOW__BROKER__KIND=rabbitmq
  export TICKETFLOW__BROKER__TOPICS__INPUT=$tag-in TICKETFLOW__BROKER__TOPICS__REPLIES=$tag-replies
  export TICKETFLOW__BROKER__TOPICS__COSTS=$tag-costs TICKETFLOW__BROKER__TOPICS__DEAD_LETTERS=$tag-dlq
  export TICKETFLOW__BROKER__RABBITMQ__DEAD_LETTER_EXCHANGE=$tag-dlx
  export TICKETFLOW__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
  export TICKETFLOW__LIMITS__ACCOUNT_HEARTBEAT_MS=$HEARTBEAT_MS
  "$BIN" migrate > /dev/null
  "$BIN" produce "$WORK/account-tickets.jsonl" > /dev/null
  "$BIN" --config scripts/bench/mock_mistral_600rpm.toml mock-provider --listen 127.0.0.1:0 > "$WORK/mock.out" 2>&1 &
  mock=$!
  for _ in $(seq 1 50); do grep -q "listening on" "$WORK/mock.out" 2>/dev/null && break; sleep 0.1; done
  addr=$(sed -n 's/^listening on //p' "$WORK/mock.out")
  env_for_mock "$addr"
  export TICKETFLOW__PROVIDERS__MISTRAL__REQUESTS_PER_MINUTE=$RPM
  : > "$WORK/account-workers.err"
  workers=()
  if [ "$SCENARIO" = limits ]; then
    unset TICKETFLOW__BUDGETS__PREMIUM__DAILY_USD TICKETFLOW__BUDGETS__PREMIUM__WHEN_SPENT
    for _ in $(seq 1 "$REPLICAS"); do start_worker; done
    while read -r _ ok _ _ < <(stats) && [ "$ok" -eq 0 ]; do sleep 0.1; done
    sleep 5
    read -r r0 _ _ _ < <(stats)
    t0=$(date +%s.%N)
    if [ "$KILL" = 1 ]; then
      sleep $((SECONDS_OF_LOAD / 2))
      kill -9 "${workers[0]}"; workers=("${workers[@]:1}")
      start_worker
      sleep $((SECONDS_OF_LOAD - SECONDS_OF_LOAD / 2))
    else
      sleep "$SECONDS_OF_LOAD"
    fi
    read -r r1 _ limited max60 < <(stats)
    t1=$(date +%s.%N)
    python3 -c "r=($r1-$r0)/($t1-$t0); l=$RPM/60; print(f'run $run: $REPLICAS replicas (heartbeat ${HEARTBEAT_MS} ms$( [ "$KILL" = 1 ] && echo ', one SIGKILLed and replaced half-way')): {r:.2f} Mistral requests/s over {$t1-$t0:.0f} s = {100*r/l:.0f}% of {$RPM}/min; most sent in any 60 s: $max60; 429s: $limited')"
  else
    export TICKETFLOW__BUDGETS__PREMIUM__DAILY_USD=$CAP TICKETFLOW__BUDGETS__PREMIUM__WHEN_SPENT=cheap
    # Every ticket goes to the premium tier; the cap sends the rest to the cheap one.
    { cat scripts/bench/account.toml; printf '\n[[routing.rules]]\nname = "all:premium"\ntarget = "premium"\n'; } > "$WORK/all_premium.toml"
    export TICKETFLOW__LIMITS__MAX_IN_FLIGHT=${MAX_IN_FLIGHT:-8}
    for _ in $(seq 1 "$REPLICAS"); do
      "$BIN" --config "$WORK/all_premium.toml" worker 2>> "$WORK/account-workers.err" &
      workers+=($!)
    done
    t0=$(date +%s.%N)
    while :; do
      done_n=$(psql -h 127.0.0.1 -U postgres -d "$db" -tAc "SELECT count(*) FROM units WHERE published" 2>/dev/null || echo 0)
      [ "${done_n:-0}" -ge "$N" ] && break
      sleep 0.1
    done
    t1=$(date +%s.%N)
    for w in "${workers[@]}"; do kill -TERM "$w"; wait "$w" || true; done
    workers=()
    read -r premium spent dearest degraded leased < <(psql -h 127.0.0.1 -U postgres -d "$db" -tAF' ' -c "
      WITH t AS (SELECT u.unit_id, u.tier, sum(c.cost_usd) AS cost FROM units u JOIN cost_records c USING (unit_id) GROUP BY 1, 2)
      SELECT count(*) FILTER (WHERE tier = 'premium'), round(coalesce(sum(cost) FILTER (WHERE tier = 'premium'), 0)::numeric, 6),
             round(coalesce(max(cost) FILTER (WHERE tier = 'premium'), 0)::numeric, 6), count(*) FILTER (WHERE tier <> 'premium'),
             (SELECT round(coalesce(sum(granted_usd), 0)::numeric, 6) FROM budget_leases)
      FROM t")
    python3 -c "print(f'run $run: $REPLICAS replicas, premium cap \$$CAP: $premium premium tickets spent \$$spent (dearest \$$dearest; {100*$spent/$CAP:.0f}% of the cap), $degraded degraded to cheap; leases \$$leased; {$N/($t1-$t0):.0f} tickets/s')"
  fi
  for w in "${workers[@]}"; do kill -TERM "$w" 2>/dev/null; wait "$w" || true; done
  workers=()
  kill "$mock"; wait "$mock" 2>/dev/null || true; mock=
  for q in in replies costs dlq; do rabbitmqctl -q delete_queue "$tag-$q" > /dev/null 2>&1 || true; done
  rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$tag-dlx\">>), false, <<\"bench\">>)." > /dev/null 2>&1 || true
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
done
