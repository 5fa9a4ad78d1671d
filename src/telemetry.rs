//! Prometheus metrics (SPEC §8), through the `metrics` facade and
//! `metrics-exporter-prometheus`. [`FAMILIES`] is the one list of what ticketflow
//! exports: the recorder describes each family from it, the Grafana dashboard may
//! only query names from it (checked by a test), and the README's table is checked
//! against it. Recording sites call the small functions below, so a family's name and
//! labels are written once.
//!
//! Without an installed recorder (a `process` run without `--metrics-file`, the
//! library in tests) every call here is a no-op costing an atomic load.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::observe::{Completion, Handled, Observer, Published};

/// Kinds of metric families.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// One exported metric family.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    pub name: &'static str,
    pub kind: Kind,
    pub labels: &'static [&'static str],
    pub help: &'static str,
}

const fn family(name: &'static str, kind: Kind, labels: &'static [&'static str], help: &'static str) -> Family {
    Family { name, kind, labels, help }
}

pub const TICKETS: &str = "ticketflow_tickets_total";
pub const TICKET_LATENCY: &str = "ticketflow_ticket_latency_seconds";
pub const COST: &str = "ticketflow_cost_usd";
pub const BASELINE: &str = "ticketflow_baseline_cost_usd";
pub const DEAD_LETTERS: &str = "ticketflow_dead_letters_total";
pub const PROVIDER_REQUESTS: &str = "ticketflow_provider_requests_total";
pub const PROVIDER_LATENCY: &str = "ticketflow_provider_request_duration_seconds";
pub const LIMITER_WAIT: &str = "ticketflow_rate_limit_wait_seconds";
pub const LIMITER_WAITING: &str = "ticketflow_rate_limit_waiting";
pub const BREAKER: &str = "ticketflow_breaker_state";
pub const IN_FLIGHT: &str = "ticketflow_in_flight";
pub const CONSUMER_LAG: &str = "ticketflow_consumer_lag";
pub const QUEUE_DEPTH: &str = "ticketflow_queue_depth";
pub const SHARD_CONSUMED: &str = "ticketflow_shard_consumed";
pub const LEDGER_LATENCY: &str = "ticketflow_ledger_operation_duration_seconds";
pub const BUDGET_SPENT: &str = "ticketflow_budget_spent_usd";
pub const READY: &str = "ticketflow_ready";

/// Every family ticketflow exports.
pub const FAMILIES: &[Family] = &[
    family(
        TICKETS,
        Kind::Counter,
        &["outcome", "tier", "provider", "model"],
        "Tickets settled, by outcome (answered, needs_human, dead_letter, duplicate, republished) and the tier, provider and model that answered (none when nothing answered).",
    ),
    family(TICKET_LATENCY, Kind::Histogram, &["tier"], "Time from the start of triage to the reply, by tier."),
    family(
        COST,
        Kind::Gauge,
        &["tier", "provider", "model"],
        "USD spent on provider calls since the process started, by the tier, provider and model that answered (a running total: use increase()).",
    ),
    family(
        BASELINE,
        Kind::Gauge,
        &["tier"],
        "USD the answered tickets would have cost on the baseline premium model, since the process started (a running total: use increase()).",
    ),
    family(DEAD_LETTERS, Kind::Counter, &["kind"], "Dead letters published, by error kind."),
    family(
        PROVIDER_REQUESTS,
        Kind::Counter,
        &["provider", "model", "stage", "outcome"],
        "Provider calls by outcome: ok, refused, rate_limited, timeout, error, unreachable (never reached the provider).",
    ),
    family(
        PROVIDER_LATENCY,
        Kind::Histogram,
        &["provider", "model", "stage"],
        "Duration of provider calls, waits on our own rate limiters excluded.",
    ),
    family(LIMITER_WAIT, Kind::Histogram, &["provider"], "Time calls waited on our own rate limiter of a provider."),
    family(LIMITER_WAITING, Kind::Gauge, &["provider"], "Calls waiting on our own rate limiter of a provider now."),
    family(BREAKER, Kind::Gauge, &["provider"], "Circuit breaker of a provider: 0 closed, 1 half-open (a probe is out), 2 open."),
    family(IN_FLIGHT, Kind::Gauge, &[], "Tickets being worked on now."),
    family(
        CONSUMER_LAG,
        Kind::Gauge,
        &["topic", "partition"],
        "Kafka: messages behind the end of each assigned partition, from the first unfinished one.",
    ),
    family(QUEUE_DEPTH, Kind::Gauge, &["queue"], "RabbitMQ: ready messages in the input queues this worker consumes and the dead-letter queue."),
    family(
        SHARD_CONSUMED,
        Kind::Gauge,
        &["queue"],
        "RabbitMQ input shards: 1 for each shard queue this worker is given and consumes (active, or standby until the previous owner lets go), 0 for the others.",
    ),
    family(
        LEDGER_LATENCY,
        Kind::Histogram,
        &["operation"],
        "Duration of PostgreSQL ledger operations (claim, finish, mark_published, release, record_rejected).",
    ),
    family(BUDGET_SPENT, Kind::Gauge, &["tier"], "USD spent today (UTC) against each capped tier's daily budget."),
    family(READY, Kind::Gauge, &[], "1 while the worker is ready (broker connected, database reachable, not draining)."),
];

/// Histogram buckets in seconds: provider calls and tickets take from milliseconds
/// to minutes.
const SLOW_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0];
/// Ledger statements take microseconds to a second.
const FAST_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

/// How often the recorder's histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Installs the global Prometheus recorder and describes every family; the handle
/// renders the text format. Fails only when a recorder is already installed.
///
/// The recorder keeps every histogram sample until upkeep folds it into its buckets,
/// which rendering alone would do: a thread of its own runs upkeep every five
/// seconds, so that a worker nobody scrapes (or scrapes rarely) keeps constant
/// memory. Found by the chaos soak: 200 bytes more per ticket, for ever.
pub fn install() -> Result<PrometheusHandle, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets(SLOW_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(LEDGER_LATENCY.into()), FAST_BUCKETS))
        .map_err(|e| e.to_string())?;
    let handle = builder.install_recorder().map_err(|e| format!("metrics recorder: {e}"))?;
    for f in FAMILIES {
        match f.kind {
            Kind::Counter => metrics::describe_counter!(f.name, f.help),
            Kind::Gauge => metrics::describe_gauge!(f.name, f.help),
            Kind::Histogram => metrics::describe_histogram!(f.name, f.help),
        }
    }
    gauge!(IN_FLIGHT).set(0.0);
    let upkeep = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        })
        .map_err(|e| format!("metrics upkeep thread: {e}"))?;
    Ok(handle)
}

/// A provider call that ended with `outcome` after `latency`.
pub fn provider_call(provider: &str, model: &str, stage: &'static str, outcome: &'static str, latency: Duration) {
    let labels = [("provider", provider.to_owned()), ("model", model.to_owned()), ("stage", stage.to_owned())];
    counter!(
        PROVIDER_REQUESTS,
        &[labels[0].clone(), labels[1].clone(), labels[2].clone(), ("outcome", outcome.to_owned())]
    )
    .increment(1);
    histogram!(PROVIDER_LATENCY, &labels).record(latency.as_secs_f64());
}

/// A call waited `waited` on our own limiter of `provider`.
pub fn limiter_waited(provider: &str, waited: Duration) {
    histogram!(LIMITER_WAIT, "provider" => provider.to_owned()).record(waited.as_secs_f64());
}

/// Calls waiting on our own limiter of `provider` changed by `delta`.
pub fn limiter_waiting(provider: &str, delta: f64) {
    let g = gauge!(LIMITER_WAITING, "provider" => provider.to_owned());
    if delta >= 0.0 {
        g.increment(delta);
    } else {
        g.decrement(-delta);
    }
}

/// The breaker of `provider` is now closed (0), half-open (1) or open (2).
pub fn breaker_state(provider: &str, state: u8) {
    gauge!(BREAKER, "provider" => provider.to_owned()).set(f64::from(state));
}

/// Tickets being worked on now.
pub fn in_flight(n: usize) {
    gauge!(IN_FLIGHT).set(n as f64);
}

/// Kafka: `lag` messages behind on `topic`/`partition`.
pub fn consumer_lag(topic: &str, partition: i32, lag: i64) {
    gauge!(CONSUMER_LAG, "topic" => topic.to_owned(), "partition" => partition.to_string()).set(lag as f64);
}

/// RabbitMQ: ready messages in `queue`.
pub fn queue_depth(queue: &str, ready: u32) {
    gauge!(QUEUE_DEPTH, "queue" => queue.to_owned()).set(f64::from(ready));
}

/// RabbitMQ input shards: which of `shards` queues of `input` this worker consumes.
pub fn shards_consumed(shards: u16, consumed: &[u16], input: &str) {
    for shard in 0..shards {
        let queue = crate::broker::rabbitmq::shards::queue(input, shard);
        gauge!(SHARD_CONSUMED, "queue" => queue).set(if consumed.contains(&shard) { 1.0 } else { 0.0 });
    }
}

/// A ledger operation took `elapsed`.
pub fn ledger_operation(operation: &'static str, elapsed: Duration) {
    histogram!(LEDGER_LATENCY, "operation" => operation).record(elapsed.as_secs_f64());
}

/// `tier` has spent `usd` of today's budget.
pub fn budget_spent(tier: &str, usd: f64) {
    gauge!(BUDGET_SPENT, "tier" => tier.to_owned()).set(usd);
}

/// The worker's readiness.
pub fn ready(ready: bool) {
    gauge!(READY).set(if ready { 1.0 } else { 0.0 });
}

/// Counts every completion: tickets by outcome and route, cost, baseline, latency
/// and dead letters.
pub struct Metrics;

impl Observer for Metrics {
    fn completed(&self, c: &Completion) {
        let outcome = match (&c.handled, c.published) {
            (Handled::Duplicate, _) => "duplicate",
            (Handled::Republished, _) => "republished",
            (_, Some(Published::DeadLetter(_))) => "dead_letter",
            (_, Some(Published::Reply(status))) => status.as_str(),
            (_, None) => "none",
        };
        let none = || "none".to_owned();
        let tier = c.tier.clone().unwrap_or_else(none);
        let provider = c.provider.clone().unwrap_or_else(none);
        let model = c.model.clone().unwrap_or_else(none);
        counter!(
            TICKETS,
            "outcome" => outcome,
            "tier" => tier.clone(),
            "provider" => provider.clone(),
            "model" => model.clone()
        )
        .increment(1);
        if let Some(Published::DeadLetter(kind)) = c.published {
            counter!(DEAD_LETTERS, "kind" => kind.as_str()).increment(1);
        }
        if c.cost_usd > 0.0 {
            gauge!(COST, "tier" => tier.clone(), "provider" => provider, "model" => model).increment(c.cost_usd);
        }
        if c.baseline_cost_usd > 0.0 {
            gauge!(BASELINE, "tier" => tier.clone()).increment(c.baseline_cost_usd);
        }
        if let Some(ms) = c.latency_ms {
            histogram!(TICKET_LATENCY, "tier" => tier).record(ms as f64 / 1000.0);
        }
    }
}
