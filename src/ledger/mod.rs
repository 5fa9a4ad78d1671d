//! The ledger: the memory of which units of work were claimed, answered, paid for and
//! published, so that redelivery and replay never answer or pay twice.
//!
//! Protocol for one unit: [`Ledger::claim`] → work → [`Ledger::finish`] (outcome and
//! costs, not yet published) → publish → [`Ledger::mark_published`] → ack. A crash
//! anywhere leaves a state from which redelivery does the right thing.

pub mod batch;
pub mod connect;
pub mod meeting;
pub mod memory;
pub mod postgres;
pub mod resilient;

use async_trait::async_trait;

use crate::ticket::Output;

/// What the worker should do with a unit of work it just received.
#[derive(Debug, Clone)]
pub enum Claim {
    /// Do the work. `prior_cost_usd` is what earlier attempts of this unit already
    /// spent (a replay after an outage); it is added to the reply's `cost_usd`.
    Fresh { attempts: u32, prior_cost_usd: f64 },
    /// Already finished and published: acknowledge and move on.
    Done,
    /// Finished, but publishing was never confirmed: publish this stored output.
    Unpublished(Box<Output>),
    /// Another worker holds a live lease on it: hand the message back for later.
    Busy,
}

/// A ledger failure: the message must not be acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// The database cannot be reached or cannot take writes now; retrying later helps.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    #[error("ledger error: {0}")]
    Other(String),
    #[error("lease on unit {0} was lost to another worker")]
    LeaseLost(String),
}

/// Storage of units of work. Implementations: [`memory::MemoryLedger`] (embedded mode,
/// tests) and PostgreSQL (worker).
#[async_trait]
pub trait Ledger: Send + Sync {
    /// Claims `unit_id` for `worker_id`: the name of one delivery attempt (the
    /// pipeline uses `worker#n`), which finish and release must repeat. The same name
    /// claiming again gets the unit again: a retry after the answer to a committed
    /// claim was lost. A dead-lettered unit becomes claimable again when it comes back
    /// with a higher `replay_count`.
    async fn claim(
        &self,
        unit_id: &str,
        ticket_id: &str,
        replay_count: u32,
        worker_id: &str,
    ) -> Result<Claim, LedgerError>;

    /// Records the outcome and its cost records; the unit counts as finished but
    /// unpublished. Fails with [`LedgerError::LeaseLost`] when `worker_id` no longer
    /// holds the unit (its lease expired and another worker took it over).
    async fn finish(&self, unit_id: &str, worker_id: &str, output: &Output) -> Result<(), LedgerError>;

    /// Records that the output was confirmed published.
    async fn mark_published(&self, unit_id: &str) -> Result<(), LedgerError>;

    /// Gives a claim back without finishing it (shutdown, or a publish that failed).
    async fn release(&self, unit_id: &str, worker_id: &str) -> Result<(), LedgerError>;

    /// Records a dead letter that belongs to no unit of work (input that never became a
    /// ticket), for the audit trail and the report.
    async fn record_rejected(&self, dead_letter: &crate::ticket::DeadLetter) -> Result<(), LedgerError>;

    /// Checks that the ledger can take writes now ([`resilient::Resilient`]'s probe).
    async fn ping(&self) -> Result<(), LedgerError> {
        Ok(())
    }
}
