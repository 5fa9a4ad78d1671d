//! One disposition function: every way an attempt at a delivery can end maps here,
//! and only here, to what happens to the delivery next.
//!
//! | attempt ended with | disposition |
//! |---|---|
//! | a completion (reply, dead letter, duplicate, republish) | ack |
//! | cancellation (shutdown, revoked lane) | abandon: hand it back, unacked |
//! | the unit busy in another worker, a lease lost to one | retry later, not counted, its in-flight slot given up meanwhile |
//! | our own rate limits had no room for the unit in time | retry later, not counted: pacing is ours |
//! | the unit taken over too often (its workers keep dying on it) | an `internal` dead letter at once |
//! | the database or the broker unavailable | retry later, not counted: outages are waited out |
//! | anything else (a stored output that cannot be read, a statement the database refuses, a broker that refuses an output, a panic) | retry later, counted; once `max_attempts` are spent, an `internal` dead letter |
//!
//! Retries happen in the delivery's lane (its task waits and tries again), never by
//! requeueing through the broker: Kafka cannot requeue one message, and a message
//! that goes round a RabbitMQ queue loses its place before later turns of its
//! conversation.

use std::time::Duration;

use rand::Rng;

use crate::broker::BrokerError;
use crate::ledger::LedgerError;

/// Why an attempt did not end in a completion.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Publish(#[from] BrokerError),
    #[error("unit {0} is being processed by another worker")]
    Busy(String),
    /// Our own rate limiters (or the account's share) had no room for the unit
    /// before its hold ended: it waits and resumes, it has not failed.
    #[error("unit {0} waits for room under our own rate limits")]
    Paced(String),
    /// The unit was claimed anew this often without finishing: its workers died or
    /// let go of it while working on it (a ticket that crashes its worker).
    #[error("unit {unit_id} was taken over {takeovers} times without finishing (its workers died or let go of it while working on it)")]
    TakenOver { unit_id: String, takeovers: u32 },
    /// The attempt was cancelled (shutdown, revoked lane); its claim is released.
    #[error("cancelled")]
    Cancelled,
}

/// How an attempt ended, panics included.
#[derive(Debug)]
pub enum Failure {
    Handle(HandleError),
    Panicked(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Handle(e) => write!(f, "{e}"),
            Failure::Panicked(msg) => write!(f, "panicked: {msg}"),
        }
    }
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Disposition {
    Ack,
    /// Try again after `delay`. `counted` attempts move the delivery towards its dead letter.
    RetryLater {
        delay: Duration,
        counted: bool,
    },
    /// Give up: publish an `internal` dead letter naming `reason`, then ack.
    DeadLetter {
        reason: String,
    },
    /// Hand the delivery back unacked.
    Abandon,
}

/// Bounds on retrying a delivery.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Counted failures after which a delivery becomes an `internal` dead letter.
    pub max_attempts: u32,
    /// Delay before the first retry; doubles per counted failure, with full jitter.
    pub base_delay: Duration,
    pub max_delay: Duration,
}

impl RetryPolicy {
    pub fn from_settings(limits: &crate::settings::Limits) -> Self {
        RetryPolicy {
            max_attempts: limits.max_delivery_attempts.max(1),
            base_delay: Duration::from_millis(limits.delivery_retry_base_ms),
            max_delay: Duration::from_millis(limits.delivery_retry_max_ms),
        }
    }
}

/// The disposition of an attempt that ended with `result`, after `failures` counted
/// failures before it.
pub fn dispose<T>(result: &Result<T, Failure>, failures: u32, policy: &RetryPolicy) -> Disposition {
    let error = match result {
        Ok(_) => return Disposition::Ack,
        Err(e) => e,
    };
    let uncounted = |base: Duration| Disposition::RetryLater { delay: jitter(base), counted: false };
    match error {
        Failure::Handle(HandleError::Cancelled) => Disposition::Abandon,
        Failure::Handle(e @ HandleError::TakenOver { .. }) => Disposition::DeadLetter { reason: e.to_string() },
        Failure::Handle(HandleError::Busy(_) | HandleError::Ledger(LedgerError::LeaseLost(_))) => {
            uncounted(Duration::from_millis(500))
        }
        Failure::Handle(HandleError::Paced(_)) => uncounted(Duration::from_secs(1)),
        Failure::Handle(
            HandleError::Ledger(LedgerError::Unavailable(_)) | HandleError::Publish(BrokerError::Publish(_)),
        ) => uncounted(Duration::from_secs(1)),
        Failure::Handle(_) | Failure::Panicked(_) => {
            if failures + 1 >= policy.max_attempts {
                Disposition::DeadLetter { reason: format!("failed {} attempts; last error: {error}", failures + 1) }
            } else {
                let exp = policy.base_delay.saturating_mul(1u32 << failures.min(16));
                Disposition::RetryLater { delay: jitter(exp.min(policy.max_delay)), counted: true }
            }
        }
    }
}

/// Uniform in [d/2, d]: spreads retries without ever retrying at once.
fn jitter(d: Duration) -> Duration {
    let ms = d.as_millis() as u64;
    Duration::from_millis(if ms < 2 { ms } else { rand::thread_rng().gen_range(ms / 2..=ms) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 3, base_delay: Duration::from_millis(100), max_delay: Duration::from_secs(1) }
    }

    fn err(e: HandleError) -> Result<(), Failure> {
        Err(Failure::Handle(e))
    }

    #[test]
    fn every_outcome_has_one_disposition() {
        let p = policy();
        assert_eq!(dispose(&Ok(()), 0, &p), Disposition::Ack);
        assert_eq!(dispose(&err(HandleError::Cancelled), 0, &p), Disposition::Abandon);
        let taken = err(HandleError::TakenOver { unit_id: "u".into(), takeovers: 5 });
        assert!(
            matches!(dispose(&taken, 0, &p), Disposition::DeadLetter { reason } if reason.contains("taken over 5 times"))
        );
        for infra in [
            HandleError::Busy("u".into()),
            HandleError::Paced("u".into()),
            HandleError::Ledger(LedgerError::Unavailable("down".into())),
            HandleError::Ledger(LedgerError::LeaseLost("u".into())),
            HandleError::Publish(BrokerError::Publish("no confirm".into())),
        ] {
            // However many failures came before: outages are waited out, never dead-lettered.
            assert!(matches!(dispose(&err(infra), 100, &p), Disposition::RetryLater { counted: false, .. }));
        }
    }

    #[test]
    fn permanent_failures_are_bounded() {
        let p = policy();
        let bad = || err(HandleError::Ledger(LedgerError::Other("invalid byte sequence".into())));
        assert!(matches!(dispose(&bad(), 0, &p), Disposition::RetryLater { counted: true, .. }));
        assert!(matches!(dispose(&bad(), 1, &p), Disposition::RetryLater { counted: true, .. }));
        match dispose(&bad(), 2, &p) {
            Disposition::DeadLetter { reason } => {
                assert!(reason.contains("3 attempts") && reason.contains("invalid byte sequence"), "{reason}")
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
        let panicked: Result<(), Failure> = Err(Failure::Panicked("boom".into()));
        assert!(matches!(dispose(&panicked, 2, &p), Disposition::DeadLetter { .. }));
        let refused = err(HandleError::Publish(BrokerError::Refused("too large".into())));
        assert!(matches!(dispose(&refused, 2, &p), Disposition::DeadLetter { .. }));
    }

    #[test]
    fn counted_delays_grow_and_stay_capped() {
        let p = policy();
        let bad = || err(HandleError::Ledger(LedgerError::Other("x".into())));
        let p = RetryPolicy { max_attempts: 100, ..p };
        for failures in 0..40 {
            let Disposition::RetryLater { delay, .. } = dispose(&bad(), failures, &p) else { panic!() };
            assert!(delay <= p.max_delay, "{delay:?}");
            assert!(delay >= Duration::from_millis(50), "{delay:?}");
        }
    }
}
