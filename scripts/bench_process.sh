#!/usr/bin/env bash
# Benchmarks of `ticketflow process` (issue 2's targets). Each scenario runs RUNS
# times (default 5) and reports every figure and the median. Needs python3 and
# GNU time (/usr/bin/time) for peak RSS.
#
#   scripts/bench_process.sh [throughput|memory|latency|all]
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-5}
WORK=${WORK:-/tmp/ticketflow-bench}
mkdir -p "$WORK"
cargo build --release --quiet
BIN=target/release/ticketflow

tickets() { # N -> path of a generated file with N tickets
  local f="$WORK/tickets-$1.jsonl"
  [ -s "$f" ] || python3 scripts/gen_tickets.py "$1" > "$f"
  echo "$f"
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

run() { # name, tickets, profile, extra env...
  local name=$1 n=$2 profile=$3; shift 3
  local input; input=$(tickets "$n")
  local rates=() rss=()
  for i in $(seq 1 "$RUNS"); do
    local out; out=$(env "$@" /usr/bin/time -f "maxrss_kb %M" "$BIN" process "$input" --quiet \
      --out "$WORK/out" --config "$profile" 2>&1)
    rates+=("$(echo "$out" | awk '/throughput/ {print $(NF-2)}')")
    rss+=("$(echo "$out" | awk '/maxrss_kb/ {print $2}')")
  done
  echo "$name: $n tickets, profile $profile $*"
  echo "  tickets/s per run: ${rates[*]}  median: $(printf '%s\n' "${rates[@]}" | median)"
  echo "  peak RSS MB per run: $(for r in "${rss[@]}"; do echo -n "$((r / 1024)) "; done) median: $(( $(printf '%s\n' "${rss[@]}" | median | cut -d. -f1) / 1024 ))"
}

case "${1:-all}" in
  throughput) run "zero latency" 100000 scripts/bench/zero_latency.toml ;;
  memory) RUNS=${RUNS_MEMORY:-3} run "one million" 1000000 scripts/bench/zero_latency.toml ;;
  latency) run "500 ms latency, 1000 in flight" 40000 scripts/bench/latency_500ms.toml
           run "500 ms latency, 2000 in flight" 40000 scripts/bench/latency_500ms.toml TICKETFLOW__LIMITS__MAX_IN_FLIGHT=2000 ;;
  all) "$0" throughput; "$0" memory; "$0" latency ;;
  *) echo "usage: $0 [throughput|memory|latency|all]" >&2; exit 2 ;;
esac
