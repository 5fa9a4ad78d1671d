#!/usr/bin/env bash
# The whole test suite, as README.md and CI run it: formatting, lints, unit and
# integration tests. Starts the local services the suite relies on when they are down.
set -euo pipefail
cd "$(dirname "$0")/.."

# PostgreSQL and RabbitMQ back the worker's ledger and broker tests. Start them if
# they are installed but stopped (a fresh machine, or one whose services died).
ensure_postgres() {
  if command -v pg_isready >/dev/null && pg_isready -h 127.0.0.1 -p 5432 -q; then return 0; fi
  if command -v pg_ctlcluster >/dev/null && [ -d /etc/postgresql ]; then
    echo "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 30); do pg_isready -h 127.0.0.1 -p 5432 -q && return 0; sleep 1; done
  fi
  echo "warning: PostgreSQL is not reachable on 127.0.0.1:5432" >&2
}

ensure_rabbitmq() {
  if (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null; then return 0; fi
  if command -v rabbitmq-server >/dev/null; then
    echo "starting RabbitMQ"
    rabbitmq-server -detached || true
    for _ in $(seq 1 60); do (exec 3<>/dev/tcp/127.0.0.1/5672) 2>/dev/null && return 0; sleep 1; done
  fi
  echo "warning: RabbitMQ is not reachable on 127.0.0.1:5672" >&2
}

# The worker's input shards are a consistent-hash exchange: its plugin ships with
# RabbitMQ and is enabled here (a no-op when it already is).
enable_hash_exchange() {
  command -v rabbitmq-plugins >/dev/null || return 0
  rabbitmq-plugins -q is_enabled rabbitmq_consistent_hash_exchange >/dev/null 2>&1 && return 0
  echo "enabling RabbitMQ's rabbitmq_consistent_hash_exchange plugin"
  rabbitmq-plugins -q enable rabbitmq_consistent_hash_exchange >/dev/null ||
    echo "warning: could not enable rabbitmq_consistent_hash_exchange" >&2
}

ensure_postgres
ensure_rabbitmq
enable_hash_exchange

# Each PostgreSQL test creates its own database (tf_test_<uuid>) and drops it when it
# passes; drop any left behind by failed runs.
if command -v psql >/dev/null; then
  psql -h 127.0.0.1 -U postgres -d postgres -tAc "SELECT datname FROM pg_database WHERE datname LIKE 'tf_test_%' OR datname LIKE 'tf_bench_%'" 2>/dev/null |
    while read -r db; do [ -n "$db" ] && psql -h 127.0.0.1 -U postgres -d postgres -qc "DROP DATABASE IF EXISTS \"$db\" WITH (FORCE)" || true; done
fi

# RabbitMQ tests use queues named tf-test-<uuid> and delete them when they pass;
# delete any left behind by failed runs.
if command -v rabbitmqctl >/dev/null; then
  rabbitmqctl -q list_queues name 2>/dev/null | { grep '^tf-test-' || true; } |
    while read -r q; do rabbitmqctl -q delete_queue "$q" >/dev/null 2>&1 || true; done
fi

cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
# Benches are compiled by clippy above and run by `cargo bench`, not here.
cargo test --lib --bins --tests --locked
