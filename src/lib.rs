//! ticketflow answers customer-support tickets with LLMs at a fraction of the usual
//! cost: a cheap model triages every ticket, declarative rules route it, and only the
//! tickets that need a premium or specialist model (or a person) get one.
//!
//! # The pipeline
//!
//! ```text
//! source (kafka | rabbitmq | file)  ->  intake (size, utf-8, json, validate)
//!   -> ledger claim (idempotency)  ->  triage (cheap tier + local signals)
//!   -> route (rules)  ->  respond (provider chain, retries, failover,
//!      moderation bypass)  ->  publish (reply, cost records | dead letter)
//!   -> ledger record  ->  ack / store offset
//! ```
//!
//! # Layout
//!
//! - [`cli`]: commands → library calls. [`settings`]: layered config as plain data,
//!   its own checks, redaction. [`policy`]: loads it and runs every check, domain
//!   ones included. [`vocab`]: the values triage and routing share.
//! - [`ticket`]: the wire contract. [`intake`]: bytes → [`ticket::Ticket`] or a rejection.
//! - [`triage`]: prompts, the defensive answer parser, local signals and heuristics.
//! - [`routing`]: ordered rules and budgets. [`moderation`]: our own check after a refusal.
//! - [`reply_text`]: quote normalisation of model replies.
//! - [`providers`]: the provider trait, the simulated provider, pricing, model chains.
//! - [`pipeline`]: one ticket through every stage; knows no broker.
//! - [`dispatch`]: between a source and the pipeline: order per key, lanes, flow
//!   control, rate-aware admission, one disposition per outcome, graceful drain.
//! - [`observe`]: completions and their observers (summary, metrics, admission).
//! - [`telemetry`]: the Prometheus metric families and their recording.
//! - [`broker`]: sources and publishers (in-memory queue, output files, RabbitMQ, Kafka).
//! - [`ledger`]: idempotency and cost memory (in-memory and PostgreSQL).
//! - [`process`]: the embedded `ticketflow process` command. [`summary`]: its report.
//! - [`produce`]: `ticketflow produce`, tickets from a file onto the input queue.
//! - [`replay`]: `ticketflow replay`, dead letters back onto the input queue.
//! - [`worker`]: `ticketflow worker`, the long-running consumer (RabbitMQ, Kafka).
//!   [`endpoints`]: its `/metrics`, `/healthz` and `/readyz`.
//! - [`explain`]: triage and routing traces for rule authors, and policy comparison.
//! - [`report`]: spend, savings, routing counts and latency from the PostgreSQL ledger.
//! - [`mock_provider`]: an OpenAI/DashScope/Anthropic-compatible mock server for tests and demos.

pub mod backoff;
pub mod broker;
pub mod cli;
pub mod dispatch;
pub mod endpoints;
pub mod eval;
pub mod explain;
pub mod intake;
pub mod ledger;
pub mod limits;
pub mod mock_provider;
pub mod moderation;
pub mod observe;
pub mod pipeline;
pub mod policy;
pub mod process;
pub mod produce;
pub mod providers;
pub mod replay;
pub mod reply_text;
pub mod report;
pub mod routing;
pub mod settings;
pub mod summary;
pub mod telemetry;
pub mod ticket;
pub mod triage;
pub mod vocab;
pub mod worker;

/// An error with its causes, one after another: "a: b: c". Library errors such as
/// tokio-postgres' keep the useful part ("database \"x\" does not exist") in a source.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}
