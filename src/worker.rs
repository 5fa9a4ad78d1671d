//! `ticketflow worker`: the long-running consumer. This version serves RabbitMQ:
//! it declares the topology, consumes the input queue through the dispatcher and
//! the pipeline with the PostgreSQL ledger (riding out database outages), publishes
//! with confirms, and stops gracefully on SIGTERM/SIGINT (a second signal stops at
//! once; nothing unfinished is acked).
//!
//! The connection is kept up by [`Link`]: after a broker restart or a dropped
//! connection the worker reconnects by itself (see `broker::rabbitmq::link`). Not yet
//! here: the HTTP endpoints of the operations issue (readiness is
//! `Link::is_connected` and the ledger's `Health`).

use std::sync::Arc;

use crate::backoff::Backoff;
use crate::broker::rabbitmq::link::Link;
use crate::broker::rabbitmq::publish::RabbitPublisher;
use crate::broker::rabbitmq::RabbitError;
use crate::broker::BrokerError;
use crate::dispatch::{DispatchConfig, Dispatcher, RetryPolicy, RunStats, Shutdown};
use crate::ledger::postgres::PgLedger;
use crate::ledger::resilient::{Health, Resilient};
use crate::ledger::LedgerError;
use crate::pipeline::Pipeline;
use crate::providers::admission::{admission_target, RateAdmission};
use crate::providers::Providers;
use crate::settings::{BrokerKind, Settings};
use crate::triage::Analyzer;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the worker for Kafka is not supported yet; for RabbitMQ set broker.kind = \"rabbitmq\" (TICKETFLOW__BROKER__KIND=rabbitmq)")]
    Kafka,
    #[error(transparent)]
    Providers(#[from] crate::providers::BuildError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Rabbit(#[from] RabbitError),
    #[error("the broker connection failed: {0}")]
    Broker(#[from] BrokerError),
}

/// Runs until `shutdown` (or a broker failure); returns the run's counters.
pub async fn run(settings: Arc<Settings>, shutdown: Shutdown) -> Result<Arc<RunStats>, WorkerError> {
    if settings.broker.kind == BrokerKind::Kafka {
        return Err(WorkerError::Kafka);
    }
    let analyzer = Arc::new(Analyzer::new(&settings.triage));
    let providers = Providers::from_settings(&settings, analyzer.clone())?;
    let store = Arc::new(PgLedger::connect(&settings.database).await?);
    let max_in_flight = settings.limits.max_in_flight;
    // The dispatcher holds up to twice its budget; the broker sends no more ahead.
    let prefetch = u16::try_from(max_in_flight.saturating_mul(2)).unwrap_or(u16::MAX);
    let (link, source) = Link::open(settings.clone(), prefetch).await?;
    let publisher = Arc::new(RabbitPublisher::new(link.clone(), &settings.broker.topics));
    let health = Health::new();
    let ledger = Arc::new(Resilient::new(store, health.clone(), Backoff::default()));
    let pipeline = Arc::new(Pipeline::new(settings.clone(), analyzer, providers.clone(), ledger, publisher));
    let admission = Arc::new(RateAdmission::new(&providers, admission_target(&settings)));
    let stats = Arc::new(RunStats::default());
    let dispatcher = Dispatcher {
        handler: pipeline,
        config: DispatchConfig { max_in_flight, retry: RetryPolicy::from_settings(&settings.limits) },
        observers: vec![admission.clone()],
        admission,
        health,
        stats: stats.clone(),
    };
    tracing::info!(queue = %settings.broker.topics.input, worker_id = %settings.worker.id, "worker consuming");
    let result = dispatcher.run(source, shutdown).await;
    link.close().await;
    result?;
    Ok(stats)
}
