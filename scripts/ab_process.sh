#!/usr/bin/env bash
# A/B of `ticketflow process` throughput between two builds in one sitting: runs
# alternate (A, B, A, B, ...) on the same generated input, so machine drift hits
# both alike, and the medians are printed.
#
#   scripts/ab_process.sh OLD_BINARY NEW_BINARY [TICKETS] [PROFILE]
#   (RUNS=N pairs, default 5; PROFILE defaults to scripts/bench/zero_latency.toml)
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 2 ] || { echo "usage: $0 OLD_BINARY NEW_BINARY [TICKETS] [PROFILE]" >&2; exit 2; }
A=$1 B=$2 N=${3:-100000} PROFILE=${4:-scripts/bench/zero_latency.toml}
RUNS=${RUNS:-5}
WORK=${WORK:-/tmp/ticketflow-bench}
mkdir -p "$WORK"
input="$WORK/tickets-$N.jsonl"
[ -s "$input" ] || python3 scripts/gen_tickets.py "$N" > "$input"
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
rate() { "$1" process "$input" --quiet --out "$WORK/out-ab" --config "$PROFILE" 2>/dev/null | awk '/throughput/ {print $(NF-2)}'; }
a=() b=()
for _ in $(seq 1 "$RUNS"); do
  a+=("$(rate "$A")")
  b+=("$(rate "$B")")
done
echo "A $A: ${a[*]}  median $(printf '%s\n' "${a[@]}" | median) tickets/s"
echo "B $B: ${b[*]}  median $(printf '%s\n' "${b[@]}" | median) tickets/s"
