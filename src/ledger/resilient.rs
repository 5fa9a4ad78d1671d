//! Riding out a database outage (SPEC §6: the worker stops taking new tickets, reports
//! not-ready, retries, and resumes without losing or double-processing anything).
//!
//! [`Resilient`] wraps a ledger. When an operation fails because the database cannot
//! be reached ([`LedgerError::Unavailable`]), the shared [`Health`] turns not-ready and
//! one prober pings the database with exponential backoff; the failed operation, and
//! every other one issued meanwhile, waits for the database to come back and then runs
//! again. The dispatcher takes no new delivery while not ready. Work in flight is kept, not
//! handed back: a ticket already answered is recorded when the database returns,
//! instead of being answered (and paid for) again on redelivery, and a reply already
//! published is marked so, instead of being published twice.
//!
//! Errors that retrying cannot fix (a lost lease, a rejected statement) pass through.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;

use tokio::sync::watch;

use super::{Claim, JournaledCall, Ledger, LedgerError, Rejected};
use crate::backoff::Backoff;
use crate::ticket::{CostRecord, DeadLetter, Output};

/// Whether the ledger is reachable: the worker's readiness.
#[derive(Debug)]
pub struct Health {
    ready: watch::Sender<bool>,
    probes: AtomicU64,
    outages: AtomicU64,
}

impl Health {
    pub fn new() -> Arc<Health> {
        Arc::new(Health { ready: watch::Sender::new(true), probes: AtomicU64::new(0), outages: AtomicU64::new(0) })
    }

    /// False from the first failure to reach the database until a probe succeeds.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Returns once the ledger is reachable.
    pub async fn wait_ready(&self) {
        let mut rx = self.ready.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|ready| *ready).await;
    }

    /// Returns once the ledger is found unreachable.
    pub async fn wait_not_ready(&self) {
        let mut rx = self.ready.subscribe();
        let _ = rx.wait_for(|ready| !*ready).await;
    }

    /// Probes made since start: how long the prober has been at it, for tests and logs.
    pub fn probes(&self) -> u64 {
        self.probes.load(Ordering::Relaxed)
    }

    /// Outages seen since start.
    pub fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }
}

/// A ledger that waits out database outages instead of failing.
pub struct Resilient {
    inner: Arc<dyn Ledger>,
    health: Arc<Health>,
    backoff: Backoff,
}

impl Resilient {
    pub fn new(inner: Arc<dyn Ledger>, health: Arc<Health>, backoff: Backoff) -> Self {
        Resilient { inner, health, backoff }
    }

    /// Runs `op` (the ledger operation `name`) until the database answers it,
    /// timing each try for the metrics.
    async fn retrying<T, F, Fut>(&self, name: &'static str, op: F) -> Result<T, LedgerError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, LedgerError>>,
    {
        loop {
            self.health.wait_ready().await;
            let started = std::time::Instant::now();
            let result = op().await;
            crate::telemetry::ledger_operation(name, started.elapsed());
            match result {
                Err(LedgerError::Unavailable(error)) => self.went_down(&error),
                other => return other,
            }
        }
    }

    /// Checks that the database answers now (for readiness while idle): a failure
    /// turns the ledger not ready and starts the prober, as a failed operation does.
    pub async fn check(&self, timeout: std::time::Duration) {
        if !self.health.is_ready() {
            return;
        }
        match tokio::time::timeout(timeout, self.inner.ping()).await {
            Ok(Err(LedgerError::Unavailable(error))) => self.went_down(&error),
            Err(_) => self.went_down(&format!("no answer to a check within {timeout:?}")),
            Ok(_) => {}
        }
    }

    /// Marks the ledger not ready and, on the transition, starts the prober.
    fn went_down(&self, error: &str) {
        let changed = self.health.ready.send_if_modified(|ready| std::mem::replace(ready, false));
        if !changed {
            return;
        }
        self.health.outages.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%error, "ledger unavailable: not ready, taking no new tickets, probing the database");
        let (inner, health, backoff) = (self.inner.clone(), self.health.clone(), self.backoff);
        tokio::spawn(async move {
            let started = tokio::time::Instant::now();
            for wait in backoff.waits() {
                tokio::time::sleep(wait).await;
                health.probes.fetch_add(1, Ordering::Relaxed);
                match inner.ping().await {
                    Ok(()) => {
                        tracing::warn!(down_for = ?started.elapsed(), "ledger reachable again: resuming");
                        health.ready.send_replace(true);
                        return;
                    }
                    Err(e) => tracing::debug!(error = %e, "ledger still unavailable"),
                }
            }
        });
    }
}

#[async_trait]
impl Ledger for Resilient {
    async fn claim(
        &self,
        unit_id: &str,
        ticket_id: &str,
        replay_count: u32,
        worker_id: &str,
    ) -> Result<Claim, LedgerError> {
        self.retrying("claim", || self.inner.claim(unit_id, ticket_id, replay_count, worker_id)).await
    }

    async fn finish(&self, unit_id: &str, worker_id: &str, output: &Output) -> Result<(), LedgerError> {
        self.retrying("finish", || self.inner.finish(unit_id, worker_id, output)).await
    }

    async fn mark_published(&self, unit_id: &str) -> Result<(), LedgerError> {
        self.retrying("mark_published", || self.inner.mark_published(unit_id)).await
    }

    async fn call_sent(&self, owner: &str, estimate: &CostRecord) -> Result<(), LedgerError> {
        self.retrying("call_sent", || self.inner.call_sent(owner, estimate)).await
    }

    async fn call_ended(
        &self,
        unit_id: &str,
        call_id: &str,
        record: Option<&CostRecord>,
        answer: Option<&str>,
    ) -> Result<(), LedgerError> {
        self.retrying("call_ended", || self.inner.call_ended(unit_id, call_id, record, answer)).await
    }

    async fn journal(&self, unit_id: &str) -> Result<Vec<JournaledCall>, LedgerError> {
        self.retrying("journal", || self.inner.journal(unit_id)).await
    }

    /// Not retried: an unreleased claim simply expires with its lease.
    async fn release(&self, unit_id: &str, worker_id: &str) -> Result<(), LedgerError> {
        let started = std::time::Instant::now();
        let result = self.inner.release(unit_id, worker_id).await;
        crate::telemetry::ledger_operation("release", started.elapsed());
        result
    }

    async fn claim_rejected(&self, key: &str, worker_id: &str) -> Result<Rejected, LedgerError> {
        self.retrying("claim_rejected", || self.inner.claim_rejected(key, worker_id)).await
    }

    async fn rejected_published(&self, key: &str) -> Result<(), LedgerError> {
        self.retrying("rejected_published", || self.inner.rejected_published(key)).await
    }

    async fn record_rejected(&self, dead_letter: &DeadLetter) -> Result<(), LedgerError> {
        self.retrying("record_rejected", || self.inner.record_rejected(dead_letter)).await
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        self.inner.ping().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::memory::MemoryLedger;
    use std::sync::atomic::AtomicBool;
    use std::time::Duration;

    /// A ledger whose database can be switched off.
    struct Switchable {
        inner: MemoryLedger,
        up: AtomicBool,
        calls: AtomicU64,
    }

    impl Switchable {
        fn check(&self) -> Result<(), LedgerError> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            if self.up.load(Ordering::SeqCst) {
                Ok(())
            } else {
                Err(LedgerError::Unavailable("connection refused".into()))
            }
        }
    }

    #[async_trait]
    impl Ledger for Switchable {
        async fn claim(&self, u: &str, t: &str, r: u32, w: &str) -> Result<Claim, LedgerError> {
            self.check()?;
            self.inner.claim(u, t, r, w).await
        }
        async fn finish(&self, u: &str, w: &str, o: &Output) -> Result<(), LedgerError> {
            self.check()?;
            self.inner.finish(u, w, o).await
        }
        async fn mark_published(&self, u: &str) -> Result<(), LedgerError> {
            self.check()?;
            self.inner.mark_published(u).await
        }
        async fn call_sent(&self, o: &str, e: &CostRecord) -> Result<(), LedgerError> {
            self.check()?;
            self.inner.call_sent(o, e).await
        }
        async fn call_ended(
            &self,
            u: &str,
            c: &str,
            r: Option<&CostRecord>,
            a: Option<&str>,
        ) -> Result<(), LedgerError> {
            self.check()?;
            self.inner.call_ended(u, c, r, a).await
        }
        async fn journal(&self, u: &str) -> Result<Vec<JournaledCall>, LedgerError> {
            self.check()?;
            self.inner.journal(u).await
        }
        async fn release(&self, u: &str, w: &str) -> Result<(), LedgerError> {
            self.check()?;
            self.inner.release(u, w).await
        }
        async fn claim_rejected(&self, k: &str, w: &str) -> Result<Rejected, LedgerError> {
            self.check()?;
            self.inner.claim_rejected(k, w).await
        }
        async fn rejected_published(&self, k: &str) -> Result<(), LedgerError> {
            self.check()?;
            self.inner.rejected_published(k).await
        }
        async fn record_rejected(&self, d: &DeadLetter) -> Result<(), LedgerError> {
            self.check()?;
            self.inner.record_rejected(d).await
        }
        async fn ping(&self) -> Result<(), LedgerError> {
            self.check()
        }
    }

    #[tokio::test]
    async fn an_outage_makes_operations_wait_and_resume_and_other_errors_pass_through() {
        let switchable =
            Arc::new(Switchable { inner: MemoryLedger::new(), up: AtomicBool::new(false), calls: AtomicU64::new(0) });
        let health = Health::new();
        let backoff = Backoff { initial: Duration::from_millis(1), max: Duration::from_millis(5) };
        let ledger = Arc::new(Resilient::new(switchable.clone(), health.clone(), backoff));
        let claim = tokio::spawn({
            let ledger = ledger.clone();
            async move { ledger.claim("T:1", "T", 0, "w").await }
        });
        while health.probes() < 3 {
            tokio::task::yield_now().await;
        }
        assert!(!health.is_ready());
        assert_eq!(health.outages(), 1);
        assert!(!claim.is_finished(), "the claim waits for the database");
        switchable.up.store(true, Ordering::SeqCst);
        assert!(matches!(claim.await.unwrap(), Ok(Claim::Fresh { .. })));
        assert!(health.is_ready());
        // An error that retrying cannot fix is not an outage: it is reported at once.
        let err = ledger.finish("never-claimed", "w", &crate::ledger::memory::tests::dead_letter_output()).await;
        assert!(matches!(err, Err(LedgerError::Other(_))), "{err:?}");
        assert!(health.is_ready());
    }
}
