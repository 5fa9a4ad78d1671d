//! `ticketflow worker`: the long-running consumer of RabbitMQ or Kafka. It consumes
//! the input through the dispatcher and the pipeline with the PostgreSQL ledger
//! (riding out database outages), publishes with confirms (RabbitMQ) or through the
//! idempotent producer (Kafka), and stops gracefully on SIGTERM/SIGINT (a second
//! signal stops at once; nothing unfinished is acked or committed).
//!
//! RabbitMQ: the connection is kept up by [`Link`], which reconnects by itself (see
//! `broker::rabbitmq::link`). Kafka: librdkafka reconnects by itself; the consumer
//! commits only finished offsets (see `broker::kafka::consume`). Not yet here: the
//! HTTP endpoints of the operations issue.

use std::sync::Arc;

use crate::backoff::Backoff;
use crate::broker::kafka::consume::KafkaSource;
use crate::broker::kafka::publish::KafkaPublisher;
use crate::broker::kafka::KafkaSetupError;
use crate::broker::rabbitmq::link::Link;
use crate::broker::rabbitmq::publish::RabbitPublisher;
use crate::broker::rabbitmq::RabbitError;
use crate::broker::{BrokerError, Publisher, Source};
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
    #[error(transparent)]
    Kafka(#[from] KafkaSetupError),
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
    let store = Arc::new(PgLedger::connect(&settings.database).await?);
    match settings.broker.kind {
        BrokerKind::Rabbitmq => {
            // The dispatcher holds up to twice its budget; the broker sends no more ahead.
            let prefetch = u16::try_from(settings.limits.max_in_flight.saturating_mul(2)).unwrap_or(u16::MAX);
            let (link, source) = Link::open(settings.clone(), prefetch).await?;
            let publisher = Arc::new(RabbitPublisher::new(link.clone(), &settings.broker.topics));
            let result = serve(&settings, store, publisher, source, shutdown).await;
            link.close().await;
            result
        }
        BrokerKind::Kafka => {
            let publisher = Arc::new(KafkaPublisher::new(&settings.broker.kafka, &settings.broker.topics)?);
            let source = KafkaSource::start(&settings)?;
            serve(&settings, store, publisher, source, shutdown).await
        }
    }
}

/// The pipeline and the dispatcher over `source`, publishing with `publisher`.
async fn serve(
    settings: &Arc<Settings>,
    store: Arc<PgLedger>,
    publisher: Arc<dyn Publisher>,
    source: impl Source,
    shutdown: Shutdown,
) -> Result<Arc<RunStats>, WorkerError> {
    let analyzer = Arc::new(Analyzer::new(&settings.triage));
    let providers = Providers::from_settings(settings, analyzer.clone())?;
    let health = Health::new();
    let ledger = Arc::new(Resilient::new(store, health.clone(), Backoff::default()));
    let pipeline = Arc::new(Pipeline::new(settings.clone(), analyzer, providers.clone(), ledger, publisher));
    let admission = Arc::new(RateAdmission::new(&providers, admission_target(settings)));
    let stats = Arc::new(RunStats::default());
    let max_in_flight = settings.limits.max_in_flight;
    let dispatcher = Dispatcher {
        handler: pipeline,
        config: DispatchConfig { max_in_flight, retry: RetryPolicy::from_settings(&settings.limits) },
        observers: vec![admission.clone()],
        admission,
        health,
        stats: stats.clone(),
    };
    tracing::info!(input = %settings.broker.topics.input, worker_id = %settings.worker.id, "worker consuming");
    dispatcher.run(source, shutdown).await?;
    Ok(stats)
}
