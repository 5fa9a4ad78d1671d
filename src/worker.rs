//! `ticketflow worker`: the long-running consumer of RabbitMQ or Kafka. It consumes
//! the input through the dispatcher and the pipeline with the PostgreSQL ledger
//! (riding out database outages), publishes with confirms (RabbitMQ) or through the
//! idempotent producer (Kafka), and stops gracefully on SIGTERM/SIGINT (a second
//! signal stops at once; nothing unfinished is acked or committed).
//!
//! RabbitMQ: the connection is kept up by [`Link`], which reconnects by itself (see
//! `broker::rabbitmq::link`). Kafka: librdkafka reconnects by itself; the consumer
//! commits only finished offsets (see `broker::kafka::consume`).
//!
//! With `http.listen` set, it serves `/metrics`, `/healthz` and `/readyz` (see
//! [`crate::endpoints`]); an idle worker checks its database every
//! [`LEDGER_CHECK_INTERVAL`] so that readiness reports an outage nobody else noticed.

use std::sync::Arc;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::broker::kafka::consume::KafkaSource;
use crate::broker::kafka::publish::KafkaPublisher;
use crate::broker::kafka::KafkaSetupError;
use crate::broker::rabbitmq::link::Link;
use crate::broker::rabbitmq::publish::RabbitPublisher;
use crate::broker::rabbitmq::shards::{self, Membership};
use crate::broker::rabbitmq::RabbitError;
use crate::broker::{BrokerError, Publisher, Source};
use crate::dispatch::{DispatchConfig, Dispatcher, RetryPolicy, RunStats, Shutdown};
use crate::endpoints::{Readiness, LEDGER_CHECK_INTERVAL};
use crate::ledger::meeting::{PgBank, PgMeeting, PgRoster};
use crate::ledger::postgres::PgLedger;
use crate::ledger::resilient::{Health, Resilient};
use crate::ledger::LedgerError;
use crate::pipeline::Pipeline;
use crate::providers::account::{Member, Timing};
use crate::providers::admission::{admission_target, RateAdmission};
use crate::providers::Providers;
use crate::routing::budget::Budgets;
use crate::settings::{BrokerKind, Settings};
use crate::triage::Analyzer;
use tokio_util::sync::CancellationToken;

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
    #[error("{0}")]
    Http(String),
}

/// Runs until `shutdown` (or a broker failure); returns the run's counters.
/// `metrics` renders the installed recorder for `/metrics`.
pub async fn run(
    settings: Arc<Settings>,
    shutdown: Shutdown,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> Result<Arc<RunStats>, WorkerError> {
    // The address first: a port already taken is reported before anything connects.
    let listener = match settings.http.listen.as_str() {
        "" => None,
        listen => Some(crate::endpoints::bind(listen).await.map_err(WorkerError::Http)?),
    };
    let endpoints = listener.map(|l| (l, metrics));
    let store = Arc::new(PgLedger::connect(&settings.database).await?);
    // A member name of its own per process: two processes configured with the same
    // worker id must not count as one.
    let member_id = format!("{}#{:08x}", settings.worker.id, rand::random::<u32>());
    match settings.broker.kind {
        BrokerKind::Rabbitmq => {
            // The dispatcher holds up to twice its budget; the broker sends no more ahead.
            let prefetch = u16::try_from(settings.limits.max_in_flight.saturating_mul(2)).unwrap_or(u16::MAX);
            let rabbit = &settings.broker.rabbitmq;
            // The roster outlives the link: this worker leaves it once its connection
            // has closed and the broker has taken its shards' deliveries back.
            let stop_roster = CancellationToken::new();
            let _stop_roster = stop_roster.clone().drop_guard();
            let (given, roster) = if rabbit.shards > 0 {
                let membership = Membership {
                    roster: Arc::new(PgRoster::new(store.pool().clone())),
                    scope: shards::scope(&rabbit.url, &settings.broker.topics.input),
                    member: member_id.clone(),
                    shards: rabbit.shards,
                    heartbeat: Duration::from_millis(rabbit.member_heartbeat_ms),
                };
                let (given, task) = membership.start(stop_roster.clone());
                (Some(given), Some(task))
            } else {
                (None, None)
            };
            let (link, source) = Link::open(settings.clone(), prefetch, given).await?;
            let publisher = Arc::new(RabbitPublisher::new(link.clone(), &settings.broker.topics));
            let connected = {
                let link = link.clone();
                Box::new(move || link.is_connected())
            };
            let result =
                serve(&settings, store, Broker { publisher, source, connected }, shutdown, endpoints, &member_id).await;
            link.close().await;
            stop_roster.cancel();
            if let Some(roster) = roster {
                let _ = tokio::time::timeout(Duration::from_secs(3), roster).await;
            }
            result
        }
        BrokerKind::Kafka => {
            let publisher = Arc::new(KafkaPublisher::new(&settings.broker.kafka, &settings.broker.topics)?);
            let source = KafkaSource::start(&settings)?;
            let flag = source.connected();
            let connected = Box::new(move || flag.load(std::sync::atomic::Ordering::Relaxed));
            serve(&settings, store, Broker { publisher, source, connected }, shutdown, endpoints, &member_id).await
        }
    }
}

/// The broker's side of a worker: its input, its publisher, and whether it is
/// connected (for readiness).
struct Broker<S> {
    publisher: Arc<dyn Publisher>,
    source: S,
    connected: Box<dyn Fn() -> bool + Send + Sync>,
}

/// The pipeline and the dispatcher over `source`, publishing with `publisher`, and
/// the HTTP endpoints when there is a listener.
async fn serve(
    settings: &Arc<Settings>,
    store: Arc<PgLedger>,
    broker: Broker<impl Source>,
    shutdown: Shutdown,
    endpoints: Option<(tokio::net::TcpListener, metrics_exporter_prometheus::PrometheusHandle)>,
    member_id: &str,
) -> Result<Arc<RunStats>, WorkerError> {
    let Broker { publisher, source, connected: broker_connected } = broker;
    let analyzer = Arc::new(Analyzer::new(&settings.triage));
    let providers = Providers::from_settings(settings, analyzer.clone())?;
    let health = Health::new();
    let pool = store.pool().clone();
    let ledger = Arc::new(Resilient::new(store, health.clone(), Backoff::default()));
    let budgets = (!settings.budgets.is_empty()).then(|| {
        let bank = Arc::new(PgBank::new(pool.clone()));
        Arc::new(Budgets::shared(settings.budgets.clone(), settings.budget_zone(), bank, member_id))
    });
    let mut pipeline = Pipeline::new(settings.clone(), analyzer, providers.clone(), ledger.clone(), publisher);
    if let Some(budgets) = &budgets {
        pipeline = pipeline.with_budgets(budgets.clone());
    }
    let pipeline = Arc::new(pipeline);
    let admission = Arc::new(RateAdmission::new(&providers, admission_target(settings)));
    let stats = Arc::new(RunStats::default());
    let max_in_flight = settings.limits.max_in_flight;
    let readiness = Arc::new(Readiness {
        ledger: health.clone(),
        broker: broker_connected,
        draining: shutdown.stop_intake.clone(),
    });
    let stop_background = CancellationToken::new();
    let _stop_background = stop_background.clone().drop_guard();
    // The member leaves the division when the dispatcher is done: its share goes to
    // the others at once instead of after three missed heartbeats.
    let stop_member = CancellationToken::new();
    let mut member = None;
    if settings.limits.account_heartbeat_ms > 0 {
        let timing = Timing::every(Duration::from_millis(settings.limits.account_heartbeat_ms));
        let meeting = Arc::new(PgMeeting::new(pool));
        member = Some(tokio::spawn(Member::new(member_id, timing, meeting, &providers).run(stop_member.clone())));
    }
    if let Some(budgets) = &budgets {
        let every = Duration::from_millis(settings.limits.account_heartbeat_ms.max(1000));
        tokio::spawn(sync_budgets(budgets.clone(), every, stop_background.clone()));
    }
    tokio::spawn(watch_readiness(ledger, readiness.clone(), stop_background.clone()));
    let mut serving = String::new();
    if let Some((listener, metrics)) = endpoints {
        if let Ok(addr) = listener.local_addr() {
            serving = format!("; /metrics, /healthz and /readyz on http://{addr}");
        }
        tokio::spawn(crate::endpoints::serve(listener, metrics, readiness, stop_background.clone()));
    }
    let dispatcher = Dispatcher {
        handler: pipeline,
        config: DispatchConfig { max_in_flight, retry: RetryPolicy::from_settings(&settings.limits) },
        observers: vec![admission.clone(), Arc::new(crate::telemetry::Metrics)],
        admission,
        health,
        stats: stats.clone(),
    };
    crate::cli::say(
        "INFO",
        &format!(
            "worker {} consuming `{}` on {}{serving} (SIGTERM/Ctrl-C stops intake and finishes what is in flight)",
            settings.worker.id,
            settings.broker.topics.input,
            match (settings.broker.kind, settings.broker.rabbitmq.shards) {
                (BrokerKind::Rabbitmq, 0) => "RabbitMQ".to_owned(),
                (BrokerKind::Rabbitmq, n) => format!("RabbitMQ, {n} shards divided among the live workers"),
                (BrokerKind::Kafka, _) => "Kafka".to_owned(),
            }
        ),
    );
    let ran = dispatcher.run(source, shutdown).await;
    stop_member.cancel();
    if let Some(member) = member {
        let _ = tokio::time::timeout(Duration::from_secs(2), member).await;
    }
    if let Some(budgets) = budgets {
        // Nothing is in flight any more: every unused lease goes back.
        match tokio::time::timeout(Duration::from_secs(2), budgets.leave()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not give the unused budget leases back; they lapse at the end of the day")
            }
            Err(_) => {
                tracing::warn!("giving the unused budget leases back took too long; they lapse at the end of the day")
            }
        }
    }
    ran?;
    Ok(stats)
}

/// Reports this process's use of the shared budgets every `every`, giving back the
/// leases of tiers it no longer reserves on.
async fn sync_budgets(budgets: Arc<Budgets>, every: Duration, stop: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = budgets.sync().await {
            tracing::debug!(error = %e, "could not report the use of the budgets; the next sync will");
        }
    }
}

/// Checks the database while idle (a failed check turns the ledger not ready, and
/// its prober turns it ready again) and keeps the `ready` gauge current.
async fn watch_readiness(ledger: Arc<Resilient>, readiness: Arc<Readiness>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(LEDGER_CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        ledger.check(LEDGER_CHECK_INTERVAL).await;
        crate::telemetry::ready(readiness.problems().is_empty());
    }
}
