//! A circuit breaker per provider. After `failure_threshold` consecutive transient
//! failures the circuit opens and calls skip the provider (failing over at once
//! instead of waiting for timeouts); after `cooldown` one probe call goes through;
//! its success closes the circuit, its failure opens it again. While the probe is
//! out, other calls wait for its verdict ([`Admission::Wait`]) instead of failing:
//! after an outage, a burst of tickets (a replay of the dead-letter queue) would
//! otherwise all fail but the one probe, and die a second time.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

/// What the breaker says about a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed,
    /// The one probe of a half-open circuit, handed out at `since`. A probe whose
    /// call is never made goes back with [`Breaker::release`].
    Probe {
        since: Instant,
    },
    /// A probe is out: ask again once the breaker changes ([`Breaker::changes`]).
    Wait,
    Rejected,
}

/// State of the circuit.
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probe_started: Instant },
}

/// The circuit breaker of one provider.
#[derive(Debug)]
pub struct Breaker {
    name: String,
    threshold: u32,
    cooldown: Duration,
    inner: Mutex<Inner>,
    /// Bumped on every change of state, for calls waiting on a probe.
    changed: watch::Sender<u64>,
}

impl Breaker {
    pub fn new(name: &str, threshold: u32, cooldown: Duration) -> Self {
        crate::telemetry::breaker_state(name, 0);
        Breaker {
            name: name.to_owned(),
            threshold: threshold.max(1),
            cooldown,
            inner: Mutex::new(Inner::Closed { failures: 0 }),
            changed: watch::Sender::new(0),
        }
    }

    /// A receiver that sees every later change of state: take it before
    /// [`Breaker::admit`], and on [`Admission::Wait`] await its `changed()`.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// May a call go to this provider now?
    pub fn admit(&self) -> Admission {
        let Ok(mut inner) = self.inner.lock() else { return Admission::Allowed };
        let now = Instant::now();
        match *inner {
            Inner::Closed { .. } => Admission::Allowed,
            Inner::Open { until } if now >= until => {
                *inner = Inner::HalfOpen { probe_started: now };
                crate::telemetry::breaker_state(&self.name, 1);
                tracing::info!(provider = %self.name, "circuit half-open: probing");
                Admission::Probe { since: now }
            }
            Inner::Open { .. } => Admission::Rejected,
            // A probe that never reported back (its ticket was abandoned) must not
            // keep the circuit half-open forever.
            Inner::HalfOpen { probe_started } if now.duration_since(probe_started) >= self.cooldown => {
                *inner = Inner::HalfOpen { probe_started: now };
                Admission::Probe { since: now }
            }
            Inner::HalfOpen { .. } => Admission::Wait,
        }
    }

    /// Reports how a call ended: `healthy` is false only for transient failures
    /// (timeouts, 5xx, overload, connection errors).
    pub fn record(&self, healthy: bool) {
        let Ok(mut inner) = self.inner.lock() else { return };
        if matches!(*inner, Inner::HalfOpen { .. }) {
            self.bump();
        }
        match (&mut *inner, healthy) {
            (Inner::Closed { failures }, true) => *failures = 0,
            (Inner::Closed { failures }, false) => {
                *failures += 1;
                if *failures >= self.threshold {
                    tracing::warn!(provider = %self.name, failures = *failures, cooldown_ms = self.cooldown.as_millis() as u64, "circuit opened");
                    *inner = Inner::Open { until: Instant::now() + self.cooldown };
                    crate::telemetry::breaker_state(&self.name, 2);
                }
            }
            (Inner::HalfOpen { .. }, true) => {
                tracing::info!(provider = %self.name, "circuit closed: provider recovered");
                *inner = Inner::Closed { failures: 0 };
                crate::telemetry::breaker_state(&self.name, 0);
            }
            (Inner::HalfOpen { .. }, false) => {
                tracing::warn!(provider = %self.name, "probe failed: circuit open again");
                *inner = Inner::Open { until: Instant::now() + self.cooldown };
                crate::telemetry::breaker_state(&self.name, 2);
            }
            // Calls admitted before the circuit opened may still report; they change nothing.
            (Inner::Open { .. }, _) => {}
        }
    }

    /// Hands back an admission whose call was never made (e.g. no rate-limit slot
    /// before the deadline). A probe goes back, so the next call may probe at once
    /// instead of the circuit staying half-open until the probe goes stale; other
    /// admissions need nothing.
    pub fn release(&self, admission: Admission) {
        let Admission::Probe { since } = admission else { return };
        let Ok(mut inner) = self.inner.lock() else { return };
        // Only while it is still this probe: once stale, another may have been handed out.
        if matches!(*inner, Inner::HalfOpen { probe_started } if probe_started == since) {
            *inner = Inner::Open { until: since };
            crate::telemetry::breaker_state(&self.name, 2);
            self.bump();
        }
    }

    #[cfg(test)]
    pub fn state(&self) -> State {
        match self.inner.lock().as_deref() {
            Ok(Inner::Closed { .. }) | Err(_) => State::Closed,
            Ok(Inner::Open { .. }) => State::Open,
            Ok(Inner::HalfOpen { .. }) => State::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_cooldown() {
        let b = Breaker::new("p", 3, Duration::from_millis(30));
        b.record(false);
        b.record(false);
        b.record(true);
        b.record(false);
        b.record(false);
        assert_eq!(b.state(), State::Closed, "a success resets the count");
        b.record(false);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(), Admission::Rejected);
        std::thread::sleep(Duration::from_millis(35));
        assert!(matches!(b.admit(), Admission::Probe { .. }));
        assert_eq!(b.admit(), Admission::Wait, "one probe at a time; the others wait for it");
        b.record(false);
        assert_eq!(b.state(), State::Open);
        std::thread::sleep(Duration::from_millis(35));
        assert!(matches!(b.admit(), Admission::Probe { .. }));
        b.record(true);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.admit(), Admission::Allowed);
    }

    #[test]
    fn a_probe_whose_call_was_never_made_goes_back() {
        let b = Breaker::new("p", 1, Duration::from_millis(30));
        b.record(false);
        std::thread::sleep(Duration::from_millis(35));
        let probe = b.admit();
        assert!(matches!(probe, Admission::Probe { .. }));
        assert_eq!(b.admit(), Admission::Wait);
        let changes = b.changes();
        b.release(probe);
        assert!(changes.has_changed().unwrap(), "waiting calls are woken");
        assert_eq!(b.state(), State::Open);
        std::thread::sleep(Duration::from_millis(1));
        let again = b.admit();
        assert!(matches!(again, Admission::Probe { .. }), "probing again at once, not after another cooldown");
        b.release(Admission::Allowed);
        b.release(probe);
        assert_eq!(b.admit(), Admission::Wait, "releasing anything but the current probe changes nothing");
        b.record(true);
        assert_eq!(b.admit(), Admission::Allowed);
    }
}
