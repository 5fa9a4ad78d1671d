//! Drives a [`Source`] through the [`Pipeline`]: bounded concurrency (the in-flight
//! budget is a semaphore, so intake waits instead of piling up work), ack or nack
//! from each completion, and a graceful drain on shutdown. While the ledger is
//! unreachable ([`Health`] not ready) no new delivery is taken.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Source;
use crate::ledger::resilient::Health;
use crate::pipeline::{HandleError, Pipeline};

/// Counters of one run.
#[derive(Debug, Default)]
pub struct RunStats {
    pub received: AtomicU64,
    pub acked: AtomicU64,
    pub handed_back: AtomicU64,
}

/// How a run stops.
#[derive(Clone, Debug)]
pub struct Shutdown {
    /// Stop taking new deliveries; finish what is in flight.
    pub stop_intake: CancellationToken,
    /// Abandon in-flight work at once: nothing unfinished is acked.
    pub abort: CancellationToken,
    /// How long in-flight work may take after `stop_intake` before it is abandoned.
    pub drain_timeout: Duration,
}

impl Shutdown {
    pub fn new(drain_timeout: Duration) -> Self {
        Shutdown { stop_intake: CancellationToken::new(), abort: CancellationToken::new(), drain_timeout }
    }
}

/// Consumes `source` until it ends or shutdown is requested, then drains.
pub async fn run(
    mut source: impl Source,
    pipeline: Arc<Pipeline>,
    max_in_flight: usize,
    shutdown: Shutdown,
    stats: Arc<RunStats>,
    health: Arc<Health>,
) {
    let permits = Arc::new(Semaphore::new(max_in_flight.max(1)));
    let tracker = TaskTracker::new();
    loop {
        tokio::select! {
            biased;
            _ = shutdown.stop_intake.cancelled() => break,
            _ = health.wait_ready() => {}
        }
        let permit = tokio::select! {
            biased;
            _ = shutdown.stop_intake.cancelled() => break,
            permit = permits.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let delivery = tokio::select! {
            biased;
            _ = shutdown.stop_intake.cancelled() => break,
            d = source.recv() => match d {
                Some(d) => d,
                None => break,
            },
        };
        stats.received.fetch_add(1, Ordering::Relaxed);
        let pipeline = pipeline.clone();
        let abort = shutdown.abort.clone();
        let stats = stats.clone();
        tracker.spawn(async move {
            let _permit = permit;
            let source = delivery.source.clone();
            let result = tokio::select! {
                biased;
                _ = abort.cancelled() => None,
                r = pipeline.handle(&delivery) => Some(r),
            };
            let settled = match result {
                Some(Ok(_)) => {
                    stats.acked.fetch_add(1, Ordering::Relaxed);
                    delivery.acker.ack().await
                }
                Some(Err(e)) => {
                    match &e {
                        HandleError::Busy(_) => tracing::info!(?source, error = %e, "handing message back"),
                        _ => tracing::error!(?source, error = %e, "could not finish message; handing it back"),
                    }
                    stats.handed_back.fetch_add(1, Ordering::Relaxed);
                    delivery.acker.nack(true).await
                }
                None => {
                    stats.handed_back.fetch_add(1, Ordering::Relaxed);
                    delivery.acker.nack(true).await
                }
            };
            if let Err(e) = settled {
                tracing::error!(?source, error = %e, "could not settle message with the broker; it will be redelivered");
            }
        });
    }
    tracker.close();
    tokio::select! {
        _ = tracker.wait() => {}
        _ = shutdown.abort.cancelled() => {}
        _ = async {
            shutdown.stop_intake.cancelled().await;
            tokio::time::sleep(shutdown.drain_timeout).await;
        } => {
            tracing::warn!("drain deadline passed; abandoning in-flight tickets (they are not acked)");
            shutdown.abort.cancel();
        }
    }
    // Abandoned tasks settle (nack) quickly once aborted.
    tracker.wait().await;
}
