#!/usr/bin/env bash
# The long chaos runs of issue 15, whose figures are in BENCHMARKS.md (CI runs short
# ones: tests/it/chaos.rs). One line of figures per run, in the order below; exits 1
# if any run found a violation.
#
#   scripts/chaos_long.sh                 # every run, both brokers (about an hour)
#   scripts/chaos_long.sh kill soak       # the runs named
#   BROKERS=kafka scripts/chaos_long.sh   # one broker
set -uo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bins || exit 2
declare -A RUNS=(
    [kill]="--scenario kill --tickets 20000 --workers 3 --seconds 300 --every 15"
    [storm]="--scenario storm --tickets 6000 --workers 2 --seconds 60 --every 10"
    [term]="--scenario term --tickets 6000 --workers 3 --seconds 60 --every 6"
    [db-cut]="--scenario db-cut --tickets 6000 --workers 3 --seconds 60 --every 8"
    [db-restart]="--scenario db-restart --tickets 6000 --workers 3 --seconds 60 --every 10"
    [broker-restart]="--scenario broker-restart --tickets 6000 --workers 3 --seconds 60 --every 10"
    [outage]="--scenario outage --tickets 6000 --workers 3 --seconds 60 --every 8"
    [flaky]="--scenario flaky --tickets 6000 --workers 3 --seconds 60"
    [limit]="--scenario calm --tickets 600 --workers 3 --rpm 600"
    [soak]="--scenario soak --tickets 100000 --settle-timeout 1800"
)
ORDER=(kill storm term db-cut db-restart broker-restart outage flaky limit soak)
names=("$@")
[ ${#names[@]} -eq 0 ] && names=("${ORDER[@]}")
failed=0
for name in "${names[@]}"; do
    [ -n "${RUNS[$name]:-}" ] || { echo "error: no run $name (one of ${ORDER[*]})" >&2; exit 2; }
    for broker in ${BROKERS:-rabbitmq kafka}; do
        # shellcheck disable=SC2086
        target/release/ticketflow-chaos --broker "$broker" ${RUNS[$name]} --seed "${SEED:-42}" || failed=1
    done
done
exit $failed
