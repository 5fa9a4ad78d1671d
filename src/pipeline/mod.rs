//! One ticket through every stage, knowing no broker:
//! intake → ledger claim → triage → route → respond (chains, moderation bypass)
//! → ledger finish → publish → ledger mark published. The caller acks afterwards.
//!
//! - this file: the unit protocol (claim, finish, publish, mark published, release,
//!   the dead letter of a message that keeps failing);
//! - `answer.rs`: triage, routing and the reply chains with the moderation bypass;
//! - `output.rs`: the reply, dead letter and rejection documents.

use std::sync::Arc;

use async_trait::async_trait;

mod answer;
mod output;

use crate::broker::{Message, Publisher};
pub use crate::dispatch::HandleError;
use crate::dispatch::{Attempt, Handler};
use crate::intake::{self, Rejection};
use crate::ledger::{Claim, Ledger, LedgerError};
use crate::moderation::Moderator;
use crate::observe::Completion;
pub use crate::observe::Handled;
use crate::providers::pricing::PriceTable;
use crate::providers::Providers;
use crate::routing::budget::Budgets;
use crate::settings::Settings;
use crate::ticket::{DeadLetter, ErrorKind, Output, Ticket};
use crate::triage::{prompt, Analyzer};

/// Everything the stages need, built once per process.
pub struct Pipeline {
    settings: Arc<Settings>,
    analyzer: Arc<Analyzer>,
    providers: Providers,
    prices: PriceTable,
    moderator: Moderator,
    triage_system: String,
    ledger: Arc<dyn Ledger>,
    publisher: Arc<dyn Publisher>,
    worker_id: String,
    budgets: Arc<Budgets>,
}

impl Pipeline {
    pub fn new(
        settings: Arc<Settings>,
        analyzer: Arc<Analyzer>,
        providers: Providers,
        ledger: Arc<dyn Ledger>,
        publisher: Arc<dyn Publisher>,
    ) -> Self {
        let prices = PriceTable::from_settings(&settings);
        let moderator = Moderator::new(&settings.moderation);
        let triage_system = prompt::triage_system(&settings.triage.categories);
        let worker_id = settings.worker_id();
        let budgets = Arc::new(Budgets::new(settings.budgets.clone(), settings.budget_zone()));
        Pipeline {
            settings,
            analyzer,
            providers,
            prices,
            moderator,
            triage_system,
            ledger,
            publisher,
            worker_id,
            budgets,
        }
    }

    /// The same pipeline drawing on `budgets` (shared with the other replicas)
    /// instead of caps of its own.
    pub fn with_budgets(mut self, budgets: Arc<Budgets>) -> Self {
        self.budgets = budgets;
        self
    }

    /// A pipeline that can triage but never publishes or records (for `explain`).
    pub fn for_explain(settings: Arc<Settings>) -> Result<Self, crate::providers::BuildError> {
        let analyzer = Arc::new(crate::triage::Analyzer::new(&settings.triage));
        let providers = Providers::from_settings(&settings, analyzer.clone())?;
        let ledger = Arc::new(crate::ledger::memory::MemoryLedger::new());
        let publisher = Arc::new(crate::broker::memory::MemoryPublisher::new());
        Ok(Pipeline::new(settings, analyzer, providers, ledger, publisher))
    }

    /// Each delivery claims under a name of its own (`worker#seq`), the same for
    /// every attempt at it: a claim retried after a lost response or a failed attempt
    /// is recognised as its own, while a second delivery of the same unit is not.
    fn claimer(&self, attempt: &Attempt) -> String {
        format!("{}#{}", self.worker_id, attempt.seq)
    }

    /// Handles one message up to the point where it may be acked. Cancellation
    /// (`attempt.cancel`) stops the provider calls and releases the claim; a step
    /// that still waits `CANCEL_GRACE` later (the ledger or the broker is down) is
    /// dropped where it stands, and the claim's lease expires instead.
    pub async fn handle(&self, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError> {
        tokio::select! {
            biased;
            r = self.handle_unit(message, attempt) => r,
            _ = cancelled_for_good(attempt) => Err(HandleError::Cancelled),
        }
    }

    async fn handle_unit(&self, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError> {
        let ticket = match self.intake(message) {
            Ok(ticket) => ticket,
            Err(rejection) => {
                tracing::info!(source = ?message.source, kind = rejection.kind.as_str(), error = %rejection.message, "rejected input");
                let dead_letter = self.rejected(message, rejection);
                let kind = dead_letter.error.kind;
                self.record_dead_letter(&dead_letter).await?;
                let output = Output::DeadLetter { dead_letter, costs: Vec::new() };
                self.publisher.publish(&output).await?;
                return Ok(Completion::of(Handled::DeadLettered(kind), &output));
            }
        };
        // Every line logged while working on the ticket carries its ids.
        let span = tracing::info_span!("ticket", ticket_id = %ticket.ticket_id, unit_id = %ticket.unit_id);
        tracing::Instrument::instrument(self.work(&ticket, message, attempt), span).await
    }

    /// Claim, answer, record and publish one ticket.
    async fn work(&self, ticket: &Ticket, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError> {
        let claimer = self.claimer(attempt);
        let claim = self.ledger.claim(&ticket.unit_id, &ticket.ticket_id, message.replay_count, &claimer).await?;
        let (attempts, prior_cost_usd) = match claim {
            Claim::Fresh { attempts, prior_cost_usd } => (attempts, prior_cost_usd),
            Claim::Done => return Ok(Completion::nothing(Handled::Duplicate)),
            Claim::Unpublished(mut output) => {
                // A stored output's records carry no baseline price: price them again.
                self.prices.fill_baselines(&mut output);
                self.publisher.publish(&output).await?;
                self.mark_published(&ticket.unit_id).await?;
                return Ok(Completion::of(Handled::Republished, &output));
            }
            Claim::Busy => return Err(HandleError::Busy(ticket.unit_id.clone())),
        };
        let output = tokio::select! {
            biased;
            _ = attempt.cancel.cancelled() => {
                self.release(&ticket.unit_id, &claimer).await;
                return Err(HandleError::Cancelled);
            }
            output = self.answer(ticket, message, attempts, prior_cost_usd) => output,
        };
        let handled = match &output {
            Output::Reply { reply, .. } => Handled::Replied(reply.status),
            Output::DeadLetter { dead_letter, .. } => Handled::DeadLettered(dead_letter.error.kind),
        };
        if let Err(e) = self.ledger.finish(&ticket.unit_id, &claimer, &output).await {
            self.release(&ticket.unit_id, &claimer).await;
            return Err(e.into());
        }
        // The ledger now holds the output as unpublished: if publishing fails, a
        // redelivery republishes it instead of calling providers again.
        if let Err(e) = self.publisher.publish(&output).await {
            self.release(&ticket.unit_id, &claimer).await;
            return Err(e.into());
        }
        self.mark_published(&ticket.unit_id).await?;
        Ok(Completion::of(handled, &output))
    }

    /// Ends a message that keeps failing: an `internal` dead letter, recorded where
    /// the ledger takes it and published in any case. A ledger that refuses it (text
    /// PostgreSQL cannot store, a unit in a state it cannot finish from) is logged,
    /// not retried: the dead letter on the topic is what operators replay.
    pub async fn give_up(&self, message: &Message, attempt: &Attempt, reason: &str) -> Result<Completion, HandleError> {
        tokio::select! {
            biased;
            r = self.dead_letter_unit(message, attempt, reason) => r,
            _ = cancelled_for_good(attempt) => Err(HandleError::Cancelled),
        }
    }

    async fn dead_letter_unit(
        &self,
        message: &Message,
        attempt: &Attempt,
        reason: &str,
    ) -> Result<Completion, HandleError> {
        let claimer = self.claimer(attempt);
        let ticket = self.intake(message).ok();
        let ids = (ticket.as_ref().map(|t| t.ticket_id.clone()), ticket.as_ref().map(|t| t.unit_id.clone()));
        let dead_letter =
            self.dead_letter(message, &message.payload, ids, ErrorKind::Internal, reason.to_owned(), attempt.failures);
        let output = Output::DeadLetter { dead_letter, costs: Vec::new() };
        let mut finished = false;
        if let Some(t) = &ticket {
            match self.ledger.finish(&t.unit_id, &claimer, &output).await {
                Ok(()) => finished = true,
                Err(e @ LedgerError::Unavailable(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(unit_id = %t.unit_id, error = %e, "the ledger did not take the internal dead letter as the unit's outcome")
                }
            }
        }
        if !finished {
            if let Output::DeadLetter { dead_letter, .. } = &output {
                self.record_dead_letter(dead_letter).await?;
            }
        }
        self.publisher.publish(&output).await?;
        if let (true, Some(t)) = (finished, &ticket) {
            self.mark_published(&t.unit_id).await?;
        }
        Ok(Completion::of(Handled::DeadLettered(ErrorKind::Internal), &output))
    }

    fn intake(&self, message: &Message) -> Result<Ticket, Rejection> {
        intake::parse_cut(&message.payload, message.full_len, self.settings.limits.max_message_bytes)
    }

    /// Records a dead letter that is no unit's outcome. Only an outage is an error:
    /// a ledger that refuses the record (a NUL byte in text PostgreSQL cannot store)
    /// must not keep the dead letter from being published.
    async fn record_dead_letter(&self, dead_letter: &DeadLetter) -> Result<(), HandleError> {
        match self.ledger.record_rejected(dead_letter).await {
            Ok(()) => Ok(()),
            Err(e @ LedgerError::Unavailable(_)) => Err(e.into()),
            Err(e) => {
                tracing::warn!(source = ?dead_letter.source, error = %e, "the ledger refused a dead letter; publishing it anyway");
                Ok(())
            }
        }
    }

    /// Records a confirmed publish. Once the output is out, only an outage is worth
    /// retrying for: any other failure is logged, and the delivery is acked rather
    /// than handled again (which would publish the same output again). The unit
    /// stays finished-but-unpublished in the ledger, so a redelivery republishes it:
    /// at least once, never lost.
    async fn mark_published(&self, unit_id: &str) -> Result<(), HandleError> {
        match self.ledger.mark_published(unit_id).await {
            Ok(()) => Ok(()),
            Err(e @ LedgerError::Unavailable(_)) => Err(e.into()),
            Err(e) => {
                tracing::warn!(unit_id, error = %e, "published, but the ledger did not record it; a redelivery would publish it again");
                Ok(())
            }
        }
    }

    /// Releases the claim an abandoned delivery may still hold.
    pub async fn abandon(&self, message: &Message, attempt: &Attempt) {
        if let Ok(ticket) = self.intake(message) {
            self.release(&ticket.unit_id, &self.claimer(attempt)).await;
        }
    }

    async fn release(&self, unit_id: &str, claimer: &str) {
        if let Err(e) = self.ledger.release(unit_id, claimer).await {
            tracing::warn!(unit_id, error = %e, "could not release a claim; its lease will expire");
        }
    }
}

#[async_trait]
impl Handler for Pipeline {
    async fn handle(&self, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError> {
        Pipeline::handle(self, message, attempt).await
    }

    async fn give_up(&self, message: &Message, attempt: &Attempt, reason: &str) -> Result<Completion, HandleError> {
        Pipeline::give_up(self, message, attempt, reason).await
    }

    async fn abandon(&self, message: &Message, attempt: &Attempt) {
        Pipeline::abandon(self, message, attempt).await
    }
}

/// How long a cancelled attempt may take to wind down (release its claim) before it
/// is dropped.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn cancelled_for_good(attempt: &Attempt) {
    attempt.cancel.cancelled().await;
    tokio::time::sleep(CANCEL_GRACE).await;
}

/// How long a unit may be held from the start of its work: three quarters of its
/// ledger lease, so that a quarter stays for recording and publishing the outcome
/// before another worker could take the unit over. Waits on our own rate limiters
/// move a unit's deadline, but never past its hold.
pub fn unit_hold(settings: &crate::settings::Settings) -> std::time::Duration {
    std::time::Duration::from_millis(settings.database.lease_ms * 3 / 4)
}
