//! One delivery from its first attempt to its settlement: attempts under the
//! disposition function, retries in the lane, the dead letter after too many
//! failures, observers told once, and exactly one ack or nack.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures_util::FutureExt as _;
use tokio_util::sync::CancellationToken;

use super::disposition::{dispose, Disposition, Failure, HandleError, RetryPolicy};
use super::{Attempt, Handler};
use crate::broker::Delivery;
use crate::observe::{Completion, Observer};

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Acked,
    /// Abandoned (shutdown, revoked lane) and handed back to the broker.
    HandedBack,
    /// Neither its work nor its dead letter could be finished: rejected without
    /// requeue, logged as an error.
    Rejected,
}

/// What a task needs besides its delivery.
pub(super) struct TaskContext<H> {
    /// Where the task gives its slot up while its delivery waits on another worker.
    pub sched: Arc<super::state::Sched>,
    pub handler: Arc<H>,
    pub observers: Arc<[Arc<dyn Observer>]>,
    pub policy: RetryPolicy,
    /// Cooperative cancellation: the handler releases its claim and returns.
    pub cancel: CancellationToken,
    /// Immediate abort (a second signal): the attempt is dropped where it stands.
    pub abort: CancellationToken,
}

/// How long releasing what an abandoned delivery holds may take (the ledger may be
/// down: then its lease expires instead).
const ABANDON_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

pub(super) async fn run<H: Handler>(ctx: TaskContext<H>, delivery: Delivery, seq: u64) -> Settled {
    let Delivery { message, acker } = delivery;
    let mut failures = 0u32;
    let mut tries = 0u32;
    let mut giving_up: Option<String> = None;
    loop {
        tries += 1;
        let attempt = Attempt { seq, failures, cancel: ctx.cancel.clone() };
        let work = async {
            match &giving_up {
                None => ctx.handler.handle(&message, &attempt).await,
                Some(reason) => ctx.handler.give_up(&message, &attempt, reason).await,
            }
        };
        let result: Result<Completion, Failure> = tokio::select! {
            biased;
            _ = ctx.abort.cancelled() => Err(Failure::Handle(HandleError::Cancelled)),
            r = AssertUnwindSafe(work).catch_unwind() => match r {
                Ok(r) => r.map_err(Failure::Handle),
                Err(panic) => Err(Failure::Panicked(panic_message(&panic))),
            },
        };
        let disposition = match (&giving_up, dispose(&result, failures, &ctx.policy)) {
            // The dead letter itself failed for a reason that waiting cannot fix:
            // nothing else is left to try.
            (Some(_), Disposition::RetryLater { counted: true, .. } | Disposition::DeadLetter { .. }) => None,
            (_, d) => Some(d),
        };
        match (disposition, result) {
            (Some(Disposition::Ack), Ok(mut completion)) => {
                completion.attempts = tries;
                for o in ctx.observers.iter() {
                    // An observer's bug must not leave the delivery unsettled.
                    if std::panic::catch_unwind(AssertUnwindSafe(|| o.completed(&completion))).is_err() {
                        tracing::error!("an observer panicked on a completion");
                    }
                }
                if let Err(e) = acker.ack().await {
                    tracing::error!(source = ?message.source, error = %e, "could not ack; the message will be redelivered and found done");
                }
                return Settled::Acked;
            }
            (Some(Disposition::RetryLater { delay, counted }), Err(e)) => {
                if counted {
                    failures += 1;
                    tracing::warn!(source = ?message.source, error = %e, failures, retry_in_ms = delay.as_millis() as u64, "attempt failed; retrying in its lane");
                } else {
                    tracing::info!(source = ?message.source, error = %e, retry_in_ms = delay.as_millis() as u64, "waiting before another attempt");
                }
                // A unit another worker holds (a dead one's lease runs out in
                // seconds) waits outside the in-flight budget, so that the rest of
                // what was delivered is worked on meanwhile.
                let parked = waits_on_another_worker(&e).then(|| ctx.sched.park());
                let waited = async {
                    tokio::time::sleep(delay).await;
                    if let Some(parked) = parked {
                        parked.resume().await;
                    }
                };
                tokio::select! {
                    biased;
                    _ = ctx.cancel.cancelled() => {}
                    _ = ctx.abort.cancelled() => {}
                    _ = waited => continue,
                }
                if !ctx.abort.is_cancelled() {
                    let _ = tokio::time::timeout(ABANDON_GRACE, ctx.handler.abandon(&message, &attempt)).await;
                }
                return hand_back(acker, &message).await;
            }
            (Some(Disposition::DeadLetter { reason }), Err(e)) => {
                failures += 1;
                tracing::error!(source = ?message.source, error = %e, "giving up on a message: it becomes an internal dead letter");
                giving_up = Some(reason);
            }
            (Some(Disposition::Abandon), _) => return hand_back(acker, &message).await,
            (None, Err(e)) => {
                tracing::error!(source = ?message.source, error = %e, reason = giving_up.as_deref().unwrap_or(""), "the dead letter of a failing message cannot be published; rejecting the message");
                if let Err(e) = acker.nack(false).await {
                    tracing::error!(source = ?message.source, error = %e, "could not reject the message");
                }
                return Settled::Rejected;
            }
            (d, r) => {
                // dispose() maps Ok to Ack and errors to the other arms; nothing else exists.
                tracing::error!(disposition = ?d, ok = r.is_ok(), "impossible disposition; handing the message back");
                return hand_back(acker, &message).await;
            }
        }
    }
}

/// The unit is held by another worker, alive or not: nothing to do but wait.
fn waits_on_another_worker(e: &Failure) -> bool {
    use crate::ledger::LedgerError;
    matches!(e, Failure::Handle(HandleError::Busy(_) | HandleError::Ledger(LedgerError::LeaseLost(_))))
}

async fn hand_back(acker: Box<dyn crate::broker::Acker>, message: &crate::broker::Message) -> Settled {
    if let Err(e) = acker.nack(true).await {
        tracing::warn!(source = ?message.source, error = %e, "could not hand a message back; the broker redelivers it");
    }
    Settled::HandedBack
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic".to_owned()
    }
}
