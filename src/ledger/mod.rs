//! The ledger: the memory of which units of work were claimed, answered, paid for and
//! published, so that redelivery and replay never answer or pay twice.
//!
//! Protocol for one unit: [`Ledger::claim`] → work → [`Ledger::finish`] (outcome and
//! costs, not yet published) → publish → [`Ledger::mark_published`] → ack. A crash
//! anywhere leaves a state from which redelivery does the right thing.
//!
//! The work in between is journaled: each provider call's intent before it is sent
//! ([`Ledger::call_sent`]) and its end as it completes ([`Ledger::call_ended`]). The
//! next claim of an unfinished unit returns its journal, so the unit resumes where it
//! stopped: no finished call is paid for twice, and a call cut off in flight is
//! published as `lost` instead of vanishing.

pub mod batch;
pub mod connect;
pub mod meeting;
pub mod memory;
pub mod postgres;
pub mod resilient;

use async_trait::async_trait;

use crate::ticket::{CostRecord, Output};

/// A provider call in the journal of an unfinished unit, as its next claim finds it.
#[derive(Debug, Clone)]
pub struct JournaledCall {
    /// Its cost record; outcome `lost` (the estimate made before sending) when its
    /// answer never came back.
    pub record: CostRecord,
    /// What the model answered, for an `ok` call: a resumed unit uses it instead of
    /// calling again.
    pub answer: Option<String>,
    /// Already recorded and published, with the unit's dead letter: a replay reuses
    /// its answer, but the call is not the replay's to publish again.
    pub settled: bool,
}

/// What the worker should do with a unit of work it just received.
#[derive(Debug, Clone)]
pub enum Claim {
    /// Do the work. `prior_cost_usd` is what earlier attempts of this unit already
    /// spent and recorded (a replay after an outage); it is added to the reply's
    /// `cost_usd`. `journal`: the calls earlier owners made and did not finish the
    /// unit with, in the order sent: resume from them.
    /// `age`: how long since the unit was first claimed.
    Fresh { attempts: u32, prior_cost_usd: f64, journal: Vec<JournaledCall>, age: std::time::Duration },
    /// Already finished and published: acknowledge and move on.
    Done,
    /// Finished, but publishing was never confirmed: publish this stored output.
    Unpublished(Box<Output>),
    /// Another worker holds a live lease on it: hand the message back for later.
    Busy,
}

/// What to do with an input that never became a ticket, by its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// First seen: record its dead letter, publish it, mark it published.
    New,
    /// Seen, but its dead letter's publish was never confirmed (its worker is gone):
    /// publish it again and mark it, without recording it twice.
    Unpublished,
    /// Its dead letter is out: ack this copy with no new output.
    Done,
    /// Another worker is publishing its dead letter right now.
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

    /// Records the outcome and its cost records, and drops the unit's journal (its
    /// calls are among the output's cost records; a dead letter's are kept, settled,
    /// for a replay to reuse); the unit counts as finished but unpublished. Fails with [`LedgerError::LeaseLost`] when `worker_id` no longer
    /// holds the unit (its lease expired and another worker took it over).
    async fn finish(&self, unit_id: &str, worker_id: &str, output: &Output) -> Result<(), LedgerError>;

    /// Journals a provider call that `owner` is about to send for its unit:
    /// `estimate` is the call's cost record as it stands if the answer never comes
    /// back (outcome `lost`). Fenced like [`Ledger::finish`]: [`LedgerError::LeaseLost`]
    /// when `owner` no longer holds the unit, and then the call must not be sent.
    async fn call_sent(&self, owner: &str, estimate: &CostRecord) -> Result<(), LedgerError>;

    /// Journals how a sent call of `unit_id` ended: its cost record and, for an `ok`
    /// call, the model's answer. `None`: the call never reached the provider, and its
    /// intent is dropped. Not fenced: whoever holds the unit, the call was made.
    async fn call_ended(
        &self,
        unit_id: &str,
        call_id: &str,
        record: Option<&CostRecord>,
        answer: Option<&str>,
    ) -> Result<(), LedgerError>;

    /// The journal of an unfinished unit (what [`Claim::Fresh`] returns, less the
    /// settled calls), for ending it without another claim.
    async fn journal(&self, unit_id: &str) -> Result<Vec<JournaledCall>, LedgerError>;

    /// Records that the output was confirmed published.
    async fn mark_published(&self, unit_id: &str) -> Result<(), LedgerError>;

    /// Gives a claim back without finishing it (shutdown, or a publish that failed).
    async fn release(&self, unit_id: &str, worker_id: &str) -> Result<(), LedgerError>;

    /// Claims the rejected input `key` (derived from its bytes) for `worker_id`, so
    /// that a redelivered copy of it is dead-lettered once.
    async fn claim_rejected(&self, key: &str, worker_id: &str) -> Result<Rejected, LedgerError>;

    /// Records that the dead letter of rejected input `key` was confirmed published.
    async fn rejected_published(&self, key: &str) -> Result<(), LedgerError>;

    /// Records a dead letter that belongs to no unit of work (input that never became a
    /// ticket), for the audit trail and the report.
    async fn record_rejected(&self, dead_letter: &crate::ticket::DeadLetter) -> Result<(), LedgerError>;

    /// Checks that the ledger can take writes now ([`resilient::Resilient`]'s probe).
    async fn ping(&self) -> Result<(), LedgerError> {
        Ok(())
    }
}
