//! One ticket through every stage, knowing no broker:
//! intake → ledger claim → triage → route → respond (chains, moderation bypass)
//! → ledger finish → publish → ledger mark published. The caller acks afterwards.
//!
//! - this file: the unit protocol (claim, finish, publish, mark published, release,
//!   the dead letter of a message that keeps failing);
//! - `answer.rs`: triage, routing and the reply chains with the moderation bypass;
//! - `journal.rs`: each call journaled in the ledger, and a unit resumed from it;
//! - `output.rs`: the reply, dead letter and rejection documents.

use std::sync::Arc;

use async_trait::async_trait;

mod answer;
mod journal;
mod output;

use crate::broker::{Message, Publisher};
pub use crate::dispatch::HandleError;
use crate::dispatch::{Attempt, Handler};
use crate::intake::{self, Rejection};
use crate::ledger::{Claim, Ledger, LedgerError, Rejected};
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
            Err(rejection) => return self.reject(message, attempt, rejection).await,
        };
        // Every line logged while working on the ticket carries its ids.
        let span = tracing::info_span!("ticket", ticket_id = %ticket.ticket_id, unit_id = %ticket.unit_id);
        tracing::Instrument::instrument(self.work(&ticket, message, attempt), span).await
    }

    /// Dead-letters input that never became a ticket, once: a copy redelivered after
    /// its dead letter was published (a lost ack) is acked with no new output.
    async fn reject(
        &self,
        message: &Message,
        attempt: &Attempt,
        rejection: Rejection,
    ) -> Result<Completion, HandleError> {
        let key = rejected_key(message);
        let claimer = self.claimer(attempt);
        let first = match self.ledger.claim_rejected(&key, &claimer).await? {
            Rejected::Done => return Ok(Completion::nothing(Handled::Duplicate)),
            Rejected::Busy => return Err(HandleError::Busy(key)),
            Rejected::New => true,
            Rejected::Unpublished => false,
        };
        tracing::info!(source = ?message.source, kind = rejection.kind.as_str(), error = %rejection.message, again = !first, "rejected input");
        let dead_letter = self.rejected(message, rejection);
        let kind = dead_letter.error.kind;
        if first {
            self.record_dead_letter(&dead_letter).await?;
        }
        let output = Output::DeadLetter { dead_letter, costs: Vec::new() };
        self.publisher.publish(&output).await?;
        match self.ledger.rejected_published(&key).await {
            Ok(()) => {}
            Err(e @ LedgerError::Unavailable(_)) => return Err(e.into()),
            Err(e) => tracing::warn!(key, error = %e, "published, but the ledger did not record it"),
        }
        Ok(Completion::of(Handled::DeadLettered(kind), &output))
    }

    /// Claim, answer, record and publish one ticket.
    async fn work(&self, ticket: &Ticket, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError> {
        let claimer = self.claimer(attempt);
        let claim = self.ledger.claim(&ticket.unit_id, &ticket.ticket_id, message.replay_count, &claimer).await?;
        let (attempts, prior_cost_usd, journal, age) = match claim {
            Claim::Fresh { attempts, prior_cost_usd, journal, age } => (attempts, prior_cost_usd, journal, age),
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
        // Every claim after the first of a replay is a takeover: a worker died, was
        // cut off or let go while working on the unit. A ticket that keeps killing
        // its worker must end, not be paid for again at every restart.
        let takeovers = attempts.saturating_sub(1 + message.replay_count);
        if takeovers >= self.settings.limits.max_delivery_attempts {
            return Err(HandleError::TakenOver { unit_id: ticket.unit_id.clone(), takeovers });
        }
        let output = tokio::select! {
            biased;
            _ = attempt.cancel.cancelled() => {
                self.release(&ticket.unit_id, &claimer).await;
                return Err(HandleError::Cancelled);
            }
            output = self.answer(ticket, message, (attempts, prior_cost_usd), (&claimer, journal)) => output,
        };
        // The journal stopped the calls: the lease was lost, or the ledger failed.
        let (mut output, paced) = match output {
            Ok(output) => output,
            Err(e) => {
                self.release(&ticket.unit_id, &claimer).await;
                return Err(e.into());
            }
        };
        if paced {
            // Our own limiters had no room in time: not the ticket's failure. It waits
            // in its lane (its claim and journal kept) and resumes with a fresh
            // deadline, up to its maximum age.
            let max_age = std::time::Duration::from_millis(self.settings.limits.max_ticket_age_ms);
            if age < max_age {
                return Err(HandleError::Paced(ticket.unit_id.clone()));
            }
            if let Output::DeadLetter { dead_letter, .. } = &mut output {
                dead_letter.error.message.push_str(&format!(
                    " (the ticket waited {} s on our own rate limits, past limits.max_ticket_age_ms)",
                    age.as_secs()
                ));
            }
        }
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
        let mut output = Output::DeadLetter { dead_letter, costs: Vec::new() };
        let mut finished = false;
        if let Some(t) = &ticket {
            // The calls the unit made are its outcome's cost records.
            let journal = match self.ledger.journal(&t.unit_id).await {
                Ok(journal) => journal,
                Err(e @ LedgerError::Unavailable(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(unit_id = %t.unit_id, error = %e, "could not read the unit's journal for its dead letter");
                    Vec::new()
                }
            };
            if let Output::DeadLetter { costs, .. } = &mut output {
                costs.extend(journal.into_iter().map(|c| c.record));
            }
            self.prices.fill_baselines(&mut output);
            match self.ledger.finish(&t.unit_id, &claimer, &output).await {
                Ok(()) => finished = true,
                Err(e @ LedgerError::Unavailable(_)) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(unit_id = %t.unit_id, error = %e, "the ledger did not take the internal dead letter as the unit's outcome");
                    // Its calls stay journaled for the unit's owner to publish.
                    if let Output::DeadLetter { costs, .. } = &mut output {
                        costs.clear();
                    }
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

/// The ledger key of an input that never became a ticket. Where the source's offset
/// names the message for good (Kafka), its topic, partition and offset; otherwise
/// (RabbitMQ) its bytes (all the source kept, and its full length) and queue: there,
/// two messages of the same bytes are one rejected input. The replay count is part of
/// it. A redelivered copy has the same key; a replay of its dead letter does not.
fn rejected_key(message: &Message) -> String {
    let s = &message.source;
    if message.stable_offset {
        return format!("{}/{}/{}:{}", s.topic, s.partition, s.offset, message.replay_count);
    }
    let hash = xxhash_rust::xxh3::xxh3_128(&message.payload);
    let len = message.full_len.unwrap_or(message.payload.len() as u64);
    format!("{}:{}:{len}:{hash:032x}", s.topic, message.replay_count)
}

/// How long a cancelled attempt may take to wind down (release its claim) before it
/// is dropped.
const CANCEL_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

async fn cancelled_for_good(attempt: &Attempt) {
    attempt.cancel.cancelled().await;
    tokio::time::sleep(CANCEL_GRACE).await;
}

/// How long one attempt at a unit may be held from the start of its work: its
/// deadline plus the time it may wait on our own rate limiters. Waits on those
/// limiters move a unit's deadline, but never past its hold. (The ledger lease is
/// renewed while the unit is held, so it does not bound this.)
pub fn unit_hold(settings: &crate::settings::Settings) -> std::time::Duration {
    std::time::Duration::from_millis(settings.limits.ticket_deadline_ms.saturating_add(settings.limits.limiter_wait_ms))
}
