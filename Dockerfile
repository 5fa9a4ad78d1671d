# syntax=docker/dockerfile:1
#
# The ticketflow image: the one binary, for every command (worker, migrate, topics,
# produce, replay, report, mock-provider, process ...). docker-compose.yml builds and
# runs it; on its own:
#
#   docker build -t ticketflow .
#   docker run --rm ticketflow process /usr/share/ticketflow/examples/tickets.jsonl
#
# Configuration: config/default.toml is compiled in; the image also carries config/
# (TICKETFLOW_CONFIG_DIR), so TICKETFLOW_ENV=production selects production.toml, and
# TICKETFLOW__SECTION__KEY variables override any key.

# ---- Builder. Same Debian release as the runtime stage, so the binary finds the
# glibc and OpenSSL it was linked against.
FROM rust:1.95-bookworm AS builder

# rdkafka-sys compiles librdkafka from source (./configure and make) with OpenSSL
# (rdkafka's "ssl" feature) and zlib (its default "libz"); GSSAPI/SASL is off, so no
# libsasl2. aws-lc-sys (rustls) and mimalloc compile C as well; aws-lc-sys falls back
# to cmake on some platforms. python3 lets librdkafka generate its linker script.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      build-essential cmake pkg-config libssl-dev zlib1g-dev python3 \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /build
# Everything `cargo build` reads: the manifest names the integration tests and the
# benches, so their files must exist; build.rs embeds migrations/, the library
# config/default.toml.
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
COPY config ./config
COPY migrations ./migrations
COPY tests ./tests
COPY benches ./benches
COPY examples ./examples

# The crate registry and target/ live in BuildKit cache mounts: after a source change
# only ticketflow itself recompiles, not its dependencies (librdkafka among them).
# The binary leaves the cache mount in the same step. Its line tables stay (panic
# backtraces name lines) but are compressed: about 55 MB instead of 125 MB.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/build/target,sharing=locked \
    cargo build --release --locked --bin ticketflow \
 && install -D -m 0755 target/release/ticketflow /out/ticketflow \
 && objcopy --compress-debug-sections=zlib /out/ticketflow

# ---- Runtime.
FROM debian:bookworm-slim AS runtime

# libssl3: librdkafka's TLS. ca-certificates: provider APIs, Kafka, RabbitMQ and
# PostgreSQL over TLS. curl: the health checks of docker-compose.yml (GET /readyz).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 curl \
 && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 ticketflow \
 && useradd --system --uid 10001 --gid ticketflow --home-dir /var/lib/ticketflow \
      --create-home --shell /usr/sbin/nologin ticketflow

COPY --from=builder /out/ticketflow /usr/local/bin/ticketflow
COPY config /etc/ticketflow/config
COPY examples/tickets.jsonl /usr/share/ticketflow/examples/tickets.jsonl
ENV TICKETFLOW_CONFIG_DIR=/etc/ticketflow/config

# `process` writes ./out: the working directory is the ticketflow user's own.
WORKDIR /var/lib/ticketflow
USER 10001:10001

# The worker's /metrics, /healthz and /readyz, with TICKETFLOW__HTTP__LISTEN=0.0.0.0:9090
# (the default listens on 127.0.0.1 only). No HEALTHCHECK here: the image also runs
# one-shot commands and the mock provider; docker-compose.yml checks each service.
EXPOSE 9090
ENTRYPOINT ["ticketflow"]
CMD ["worker"]
