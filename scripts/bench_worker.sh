#!/usr/bin/env bash
# RabbitMQ worker benchmark (issue 10): tickets per second end to end through one
# `ticketflow worker` with the PostgreSQL ledger, and the worker's CPU per ticket.
# RabbitMQ, PostgreSQL, the mock provider and the worker share this machine.
#
#   scripts/bench_worker.sh [N] [RUNS] [PROVIDERS]
#
# N tickets (default 20000) are produced onto a fresh queue first; the clock runs
# from the worker's start until the ledger has every unit published (each unit is
# marked published after its outputs are confirmed by the broker, just before its
# message is acked). PROVIDERS is `mock` (default: the real HTTP adapters against
# `ticketflow mock-provider` at zero latency) or `simulated` (in-process, 0 ms).
# Prints one line per run and the medians. BIN=path overrides the binary (A/B).
# BROKER=kafka runs it on a fresh librdkafka mock cluster per run (examples/kafka_mock.rs,
# topics of six partitions) instead of the local RabbitMQ. MOCK_CONFIG=FILE configures
# the mock provider (e.g. scripts/bench/mock_latency_1s.toml) and WORKER_CONFIG=FILE
# the worker (default scripts/bench/zero_latency.toml; e.g. in_flight_5000.toml). The
# worker's peak RSS is reported too, and the ledger's statements per ticket: the
# transactions its database committed during the run (each ledger statement is one,
# the lease renewals and account heartbeats included) over the tickets.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20000}
RUNS=${2:-3}
PROVIDERS=${3:-mock}
WORK=${WORK:-/tmp/ticketflow-bench}
mkdir -p "$WORK"
BROKER=${BROKER:-rabbitmq}
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/ticketflow
fi
[ "$BROKER" = kafka ] && cargo build --release --quiet --example kafka_mock
[ -s "$WORK/tickets-$N.jsonl" ] || python3 scripts/gen_tickets.py "$N" > "$WORK/tickets-$N.jsonl"
TICKS=$(getconf CLK_TCK)

cleanup() {
  [ -n "${worker:-}" ] && kill -9 "$worker" 2>/dev/null || true
  [ -n "${mock:-}" ] && kill "$mock" 2>/dev/null || true
  [ -n "${cluster:-}" ] && kill "$cluster" 2>/dev/null || true
}
trap cleanup EXIT

. scripts/bench/mock_env.sh

rates=(); cpus=(); rsss=(); stmts=()
commits() { psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT xact_commit FROM pg_stat_database WHERE datname = '$1'"; }
for run in $(seq 1 "$RUNS"); do
  tag="tf-bench-$$-$run"
  db="tf_bench_worker_$$_$run"
  if [ "$BROKER" = kafka ]; then
    target/release/examples/kafka_mock > "$WORK/cluster.out" 2>&1 &
    cluster=$!
    for _ in $(seq 1 50); do grep -q "bootstrap servers" "$WORK/cluster.out" 2>/dev/null && break; sleep 0.1; done
    export TICKETFLOW__BROKER__KIND=kafka TICKETFLOW__BROKER__KAFKA__GROUP_ID=$tag
    export TICKETFLOW__BROKER__KAFKA__BOOTSTRAP_SERVERS=$(sed -n 's/^bootstrap servers //p' "$WORK/cluster.out")
  else
    export TICKETFLOW__BROKER__KIND=rabbitmq
    export TICKETFLOW__BROKER__TOPICS__INPUT=$tag-in TICKETFLOW__BROKER__TOPICS__REPLIES=$tag-replies
    export TICKETFLOW__BROKER__TOPICS__COSTS=$tag-costs TICKETFLOW__BROKER__TOPICS__DEAD_LETTERS=$tag-dlq
    export TICKETFLOW__BROKER__RABBITMQ__DEAD_LETTER_EXCHANGE=$tag-dlx
  fi
  export TICKETFLOW__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
  "$BIN" migrate > /dev/null
  "$BIN" produce "$WORK/tickets-$N.jsonl" > /dev/null
  if [ "$PROVIDERS" = mock ]; then
    "$BIN" ${MOCK_CONFIG:+--config "$MOCK_CONFIG"} mock-provider --listen 127.0.0.1:0 > "$WORK/mock.out" 2>&1 &
    mock=$!
    for _ in $(seq 1 50); do grep -q "listening on" "$WORK/mock.out" 2>/dev/null && break; sleep 0.1; done
    env_for_mock "$(sed -n 's/^listening on //p' "$WORK/mock.out")"
  fi
  commits_before=$(commits "$db")
  start=$(date +%s.%N)
  "$BIN" --config "${WORKER_CONFIG:-scripts/bench/zero_latency.toml}" worker 2> "$WORK/worker.err" &
  worker=$!
  while :; do
    done_n=$(psql -h 127.0.0.1 -U postgres -d "$db" -tAc "SELECT count(*) FROM units WHERE published" 2>/dev/null || echo 0)
    [ "${done_n:-0}" -ge "$N" ] && break
    kill -0 "$worker" 2>/dev/null || { echo "the worker died:"; cat "$WORK/worker.err"; exit 1; }
    sleep 0.05
  done
  end=$(date +%s.%N)
  read -r utime stime < <(awk '{print $14, $15}' "/proc/$worker/stat")
  rss=$(awk '/^VmHWM/ {print int($2 / 1024)}' "/proc/$worker/status")
  kill -TERM "$worker"; wait "$worker" || true; worker=
  # The worker's backends report their counts as they exit.
  sleep 1
  stmt=$(python3 -c "print(f'{($(commits "$db") - $commits_before) / $N:.2f}')")
  if [ -n "${mock:-}" ]; then kill "$mock"; wait "$mock" 2>/dev/null || true; mock=; fi
  rate=$(python3 -c "print(round($N / ($end - $start)))")
  cpu=$(python3 -c "print(f'{($utime + $stime) / $TICKS * 1000 / $N:.3f}')")
  echo "run $run: $N tickets in $(python3 -c "print(f'{$end - $start:.2f}')") s: $rate tickets/s; worker CPU $cpu ms/ticket; worker peak RSS $rss MB; ledger statements $stmt/ticket"
  rates+=("$rate"); cpus+=("$cpu"); rsss+=("$rss"); stmts+=("$stmt")
  if [ -n "${cluster:-}" ]; then kill "$cluster"; wait "$cluster" 2>/dev/null || true; cluster=; fi
  for q in in replies costs dlq; do rabbitmqctl -q delete_queue "$tag-$q" > /dev/null 2>&1 || true; done
  rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$tag-dlx\">>), false, <<\"bench\">>)." > /dev/null 2>&1 || true
  psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
done
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
echo "median of $RUNS: $(median "${rates[@]}") tickets/s; worker CPU $(median "${cpus[@]}") ms/ticket; peak RSS $(median "${rsss[@]}") MB; ledger statements $(median "${stmts[@]}")/ticket ($PROVIDERS providers, $BROKER)"
