#!/usr/bin/env bash
# Takeover after a kill (issue 25): two workers on one RabbitMQ queue with the shipped
# defaults (lease, prefetch, in-flight budget, account heartbeat), every provider
# answering in one second (`ticketflow mock-provider` with
# scripts/bench/mock_latency_1s.toml); after KILL_AFTER seconds one worker is
# SIGKILLed. From the ledger's decisions (who finished what, when): the survivor's
# answers per second in the 10 s before the kill, in each second after it, and how
# long after the kill its rate was back above half of that.
#
#   scripts/bench_takeover.sh [N] [KILL_AFTER]      # defaults: 12000 tickets, 15 s
#
# BIN=path overrides the binary (A/B). Uses the local RabbitMQ and PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-12000}
KILL_AFTER=${2:-15}
WORK=${WORK:-/tmp/ticketflow-bench}
mkdir -p "$WORK"
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/ticketflow
fi
[ -s "$WORK/tickets-$N.jsonl" ] || python3 scripts/gen_tickets.py "$N" > "$WORK/tickets-$N.jsonl"

tag="tf-bench-takeover-$$"
db="tf_bench_takeover_$$"
cleanup() {
  for p in ${first:-} ${second:-} ${mock:-}; do kill -9 "$p" 2>/dev/null || true; done
  for q in in replies costs dlq; do rabbitmqctl -q delete_queue "$tag-$q" > /dev/null 2>&1 || true; done
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" > /dev/null 2>&1 || true
}
trap cleanup EXIT

. scripts/bench/mock_env.sh
export TICKETFLOW__BROKER__KIND=rabbitmq TICKETFLOW__HTTP__LISTEN=127.0.0.1:0
export TICKETFLOW__BROKER__TOPICS__INPUT=$tag-in TICKETFLOW__BROKER__TOPICS__REPLIES=$tag-replies
export TICKETFLOW__BROKER__TOPICS__COSTS=$tag-costs TICKETFLOW__BROKER__TOPICS__DEAD_LETTERS=$tag-dlq
export TICKETFLOW__BROKER__RABBITMQ__DEAD_LETTER_EXCHANGE=$tag-dlx
export TICKETFLOW__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
sql() { psql -h 127.0.0.1 -U postgres -d "$db" -tAc "$1"; }

"$BIN" migrate > /dev/null
"$BIN" produce "$WORK/tickets-$N.jsonl" > /dev/null
"$BIN" --config scripts/bench/mock_latency_1s.toml mock-provider --listen 127.0.0.1:0 > "$WORK/mock.out" 2>&1 &
mock=$!
for _ in $(seq 1 50); do grep -q "listening on" "$WORK/mock.out" 2>/dev/null && break; sleep 0.1; done
env_for_mock "$(sed -n 's/^listening on //p' "$WORK/mock.out")"
"$BIN" worker 2> "$WORK/takeover-first.err" &
first=$!
"$BIN" worker 2> "$WORK/takeover-second.err" &
second=$!
# The fault's schedule: the workers run KILL_AFTER seconds, then one dies.
sleep "$KILL_AFTER"
killed_at=$(sql "SELECT extract(epoch FROM clock_timestamp())")
kill -9 "$first"; wait "$first" 2>/dev/null || true; first=
deadline=$((SECONDS + 600))
until [ "$(sql "SELECT count(*) FROM units WHERE published")" -ge "$N" ]; do
  kill -0 "$second" 2>/dev/null || { echo "the survivor died:"; tail -5 "$WORK/takeover-second.err"; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "not every ticket was answered within 600 s"; exit 1; }
  sleep 0.5
done
# The survivor is the worker that decided anything after the kill.
survivor=$(sql "SELECT split_part(worker_id, '#', 1) FROM decisions
                WHERE extract(epoch FROM decided_at) > $killed_at + 1 LIMIT 1")
sql "WITH d AS (
       SELECT floor(extract(epoch FROM decided_at) - $killed_at)::int AS s
       FROM decisions WHERE split_part(worker_id, '#', 1) = '$survivor'
     ), before AS (SELECT count(*) / 10.0 AS rate FROM d WHERE s BETWEEN -10 AND -1)
     SELECT 'survivor ' || '$survivor' || ': ' || round((SELECT rate FROM before), 1) || ' answers/s in the 10 s before the kill'
     UNION ALL
     SELECT 'after the kill, per second: ' || string_agg(coalesce(n, 0)::text, ' ' ORDER BY s)
     FROM generate_series(0, 29) AS s LEFT JOIN (SELECT s, count(*) AS n FROM d GROUP BY s) c USING (s)
     UNION ALL
     SELECT 'seconds at or below half that rate in the 15 s after the kill: ' || count(*)
         || coalesce(', the last ' || max(s) || ' s after the kill', '')
     FROM generate_series(0, 14) AS s LEFT JOIN (SELECT s, count(*) AS n FROM d GROUP BY s) c USING (s)
     WHERE coalesce(c.n, 0) <= (SELECT rate FROM before) / 2"
echo "takeovers: $(sql "SELECT count(*) FROM units WHERE attempts > 1") units claimed again; every ticket answered: $(sql "SELECT count(*) FROM units WHERE published") of $N"
