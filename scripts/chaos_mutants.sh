#!/usr/bin/env bash
# Shows that each invariant ticketflow-chaos checks can fail: builds ticketflow with
# one deliberate bug at a time (scripts/mutants/*.patch), runs a chaos run on it and
# expects exit 1 with the violation of the invariant meant to catch that bug. Each
# patch's header gives the bug, that invariant, the words of its violation
# (`# expect:`, an extended regex) and the run (`# chaos:`). Prints one line per
# mutant; exits 1 when a mutant went unnoticed or was caught only by another
# invariant.
#
#   scripts/chaos_mutants.sh                  # every mutant
#   scripts/chaos_mutants.sh call-twice       # the ones named
#
# It works in a scratch git worktree of HEAD (TF_MUTANTS_DIR, /tmp/tf-mutants) with
# its own target directory, so the checkout and its build are never touched. The
# first build is a cold debug build (minutes); each mutant after it rebuilds a little.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
work=${TF_MUTANTS_DIR:-/tmp/tf-mutants}
target=$work-target
if [ ! -d "$work" ]; then
    git worktree add --detach -f "$work" HEAD >/dev/null
fi
git -C "$work" checkout -q --detach "$(git rev-parse HEAD)"
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
    for p in scripts/mutants/*.patch; do names+=("$(basename "$p" .patch)"); done
fi
missed=0
for name in "${names[@]}"; do
    patch=$repo/scripts/mutants/$name.patch
    [ -f "$patch" ] || { echo "error: no mutant $name (scripts/mutants/$name.patch)" >&2; exit 2; }
    read -r -a args <<<"$(sed -n 's/^# chaos: //p' "$patch")"
    git -C "$work" checkout -q -- .
    git -C "$work" apply "$patch"
    if ! (cd "$work" && CARGO_TARGET_DIR=$target cargo build -q --bins 2>"$work.build.log"); then
        echo "$name: does not build (see $work.build.log)"
        missed=1
        continue
    fi
    set +e
    out=$(cd "$work" && "$target/debug/ticketflow-chaos" "${args[@]}" 2>&1)
    rc=$?
    set -e
    # The invariant meant to catch it (`# expect:`) must be among the violations.
    expect=$(sed -n 's/^# expect: //p' "$patch")
    if [ $rc -eq 1 ] && line=$(grep -m1 -E -- "$expect" <<<"$(grep '^violation:' <<<"$out")"); then
        echo "$name: caught: $line"
    elif [ $rc -eq 1 ]; then
        echo "$name: MISSED by its invariant (\`$expect\`), caught only by: $(grep -m1 '^violation:' <<<"$out")"
        missed=1
    else
        echo "$name: MISSED (exit $rc): $(tail -n1 <<<"$out")"
        missed=1
    fi
done
git -C "$work" checkout -q -- .
exit $missed
