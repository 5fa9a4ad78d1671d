#!/usr/bin/env bash
# Replica scaling on RabbitMQ input shards (issue 26): tickets per second answered by
# 1, 2 and 3 `ticketflow worker` processes sharing one sharded input, with every
# provider call taking 200 ms at `ticketflow mock-provider` and the in-flight budget
# per worker fixed (limits.max_in_flight, 32 by default), so a worker is bound by its
# budget, not by this 2-core machine, and replicas should add throughput.
#
#   scripts/bench_scaling.sh [N] [RUNS] [WORKERS...]
#
# N tickets (default 3000) are produced onto a fresh sharded topology (16 shards)
# first; all the workers start at once. The rate is taken between 20% and 80% of the
# units published (the ledger), leaving out the start (joining, dividing the shards)
# and the tail. Prints one line per run, the medians per worker count and the ratio
# of each median to the one-worker median. IN_FLIGHT=N overrides the budget; BIN=path
# the binary.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-3000}
RUNS=${2:-3}
shift $(( $# > 2 ? 2 : $# )) || true
COUNTS=("$@")
[ ${#COUNTS[@]} -eq 0 ] && COUNTS=(1 2 3)
IN_FLIGHT=${IN_FLIGHT:-32}
WORK=${WORK:-/tmp/ticketflow-bench}
mkdir -p "$WORK"
if [ -z "${BIN:-}" ]; then
  cargo build --release --quiet
  BIN=target/release/ticketflow
fi
[ -s "$WORK/tickets-$N.jsonl" ] || python3 scripts/gen_tickets.py "$N" > "$WORK/tickets-$N.jsonl"

workers=()
cleanup() {
  for w in "${workers[@]}"; do kill -9 "$w" 2>/dev/null || true; done
  [ -n "${mock:-}" ] && kill "$mock" 2>/dev/null || true
}
trap cleanup EXIT
. scripts/bench/mock_env.sh

"$BIN" --config scripts/bench/mock_latency_200ms.toml mock-provider --listen 127.0.0.1:0 > "$WORK/mock.out" 2>&1 &
mock=$!
for _ in $(seq 1 50); do grep -q "listening on" "$WORK/mock.out" 2>/dev/null && break; sleep 0.1; done
env_for_mock "$(sed -n 's/^listening on //p' "$WORK/mock.out")"

published() { psql -h 127.0.0.1 -U postgres -d "$1" -tAc "SELECT count(*) FROM units WHERE published" 2>/dev/null || echo 0; }
declare -A medians
for count in "${COUNTS[@]}"; do
  rates=()
  for run in $(seq 1 "$RUNS"); do
    tag="tf-bench-scale-$$-$count-$run"
    db="tf_bench_scale_$$_${count}_$run"
    export TICKETFLOW__BROKER__KIND=rabbitmq TICKETFLOW__BROKER__RABBITMQ__SHARDS=16
    export TICKETFLOW__BROKER__TOPICS__INPUT=$tag-in TICKETFLOW__BROKER__TOPICS__REPLIES=$tag-replies
    export TICKETFLOW__BROKER__TOPICS__COSTS=$tag-costs TICKETFLOW__BROKER__TOPICS__DEAD_LETTERS=$tag-dlq
    export TICKETFLOW__BROKER__RABBITMQ__DEAD_LETTER_EXCHANGE=$tag-dlx
    export TICKETFLOW__DATABASE__URL=postgres://postgres@127.0.0.1:5432/$db
    export TICKETFLOW__LIMITS__MAX_IN_FLIGHT=$IN_FLIGHT TICKETFLOW__HTTP__LISTEN=127.0.0.1:0
    "$BIN" migrate > /dev/null
    "$BIN" produce "$WORK/tickets-$N.jsonl" > /dev/null
    workers=()
    for i in $(seq 1 "$count"); do
      "$BIN" worker 2> "$WORK/scale-worker-$i.err" &
      workers+=($!)
    done
    lo=$(( N / 5 )); hi=$(( N * 4 / 5 )); t_lo=; t_hi=
    while :; do
      n=$(published "$db")
      now=$(date +%s.%N)
      [ -z "$t_lo" ] && [ "${n:-0}" -ge "$lo" ] && { t_lo=$now; n_lo=$n; }
      [ "${n:-0}" -ge "$hi" ] && { t_hi=$now; n_hi=$n; break; }
      for w in "${workers[@]}"; do
        kill -0 "$w" 2>/dev/null || { echo "a worker died:"; cat "$WORK"/scale-worker-*.err; exit 1; }
      done
      sleep 0.05
    done
    for w in "${workers[@]}"; do kill -TERM "$w" 2>/dev/null || true; done
    for w in "${workers[@]}"; do wait "$w" 2>/dev/null || true; done
    workers=()
    rate=$(python3 -c "print(round(($n_hi - $n_lo) / ($t_hi - $t_lo), 1))")
    echo "$count worker(s), run $run: $rate tickets/s (from $n_lo to $n_hi published)"
    rates+=("$rate")
    for q in replies costs dlq; do rabbitmqctl -q delete_queue "$tag-$q" > /dev/null 2>&1 || true; done
    for s in $(seq 0 15); do rabbitmqctl -q delete_queue "$tag-in.$s" > /dev/null 2>&1 || true; done
    for x in in dlx; do
      rabbitmqctl -q eval "rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"$tag-$x\">>), false, <<\"bench\">>)." > /dev/null 2>&1 || true
    done
    psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)"
  done
  medians[$count]=$(printf '%s\n' "${rates[@]}" | sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}')
done
for count in "${COUNTS[@]}"; do
  ratio=$(python3 -c "print(f'{${medians[$count]} / ${medians[${COUNTS[0]}]}:.2f}')")
  echo "median of $RUNS, $count worker(s): ${medians[$count]} tickets/s (${ratio}x ${COUNTS[0]} worker(s); in-flight budget $IN_FLIGHT each, 200 ms calls)"
done
