//! One ticket through every stage, knowing no broker:
//! intake → ledger claim → triage → route → respond (chains, moderation bypass)
//! → ledger finish → publish → ledger mark published. The caller acks afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::broker::{Message, Publisher};
pub use crate::dispatch::HandleError;
use crate::dispatch::{Attempt, Handler};
use crate::intake::{self, Rejection};
use crate::ledger::{Claim, Ledger, LedgerError};
use crate::moderation::{self, Moderator, Verdict};
use crate::observe::Completion;
pub use crate::observe::Handled;
use crate::providers::chain::{ChainResult, ChainRunner, UnitCalls};
use crate::providers::pricing::PriceTable;
use crate::providers::{ChatRequest, Providers};
use crate::routing::budget::Budgets;
use crate::routing::{self, Facts, HUMAN};
use crate::settings::{ModerationMode, Settings};
use crate::ticket::{
    encode_payload, now_rfc3339, DeadLetter, DeadLetterError, ErrorKind, ModerationView, Output, Reply, ReplyStatus,
    RouteView, Stage, Ticket, SCHEMA_VERSION,
};
use crate::triage::{self, parse::parse_triage, prompt, Analyzer, Triage};

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
    budgets: Budgets,
}

/// A ticket after its first stage.
struct Triaged {
    signals: triage::Signals,
    triage: Triage,
    unit: UnitCalls,
    moderation: ModerationState,
    ticket_data: String,
}

/// State of the moderation bypass for one ticket.
#[derive(Debug, Default)]
struct ModerationState {
    verdict: Option<Verdict>,
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
        let budgets = Budgets::new(settings.budgets.clone());
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

    /// Handles one message up to the point where it may be acked.
    pub async fn handle(&self, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError> {
        let ticket = match self.intake(message) {
            Ok(ticket) => ticket,
            Err(rejection) => {
                tracing::info!(source = ?message.source, kind = rejection.kind.as_str(), error = %rejection.message, "rejected input");
                let dead_letter = self.rejected(message, rejection);
                let kind = dead_letter.error.kind;
                self.record_dead_letter(&dead_letter).await?;
                let output = Output::DeadLetter { dead_letter, costs: Vec::new() };
                self.publisher.publish(&output).await?;
                return Ok(Completion::of(Handled::DeadLettered(kind), &output, &self.prices));
            }
        };
        let claimer = self.claimer(attempt);
        let claim = self.ledger.claim(&ticket.unit_id, &ticket.ticket_id, message.replay_count, &claimer).await?;
        let (attempts, prior_cost_usd) = match claim {
            Claim::Fresh { attempts, prior_cost_usd } => (attempts, prior_cost_usd),
            Claim::Done => return Ok(Completion::nothing(Handled::Duplicate)),
            Claim::Unpublished(output) => {
                self.publisher.publish(&output).await?;
                self.ledger.mark_published(&ticket.unit_id).await?;
                return Ok(Completion::of(Handled::Republished, &output, &self.prices));
            }
            Claim::Busy => return Err(HandleError::Busy(ticket.unit_id.clone())),
        };
        let output = tokio::select! {
            biased;
            _ = attempt.cancel.cancelled() => {
                self.release(&ticket.unit_id, &claimer).await;
                return Err(HandleError::Cancelled);
            }
            output = self.answer(&ticket, message, attempts, prior_cost_usd) => output,
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
        self.ledger.mark_published(&ticket.unit_id).await?;
        Ok(Completion::of(handled, &output, &self.prices))
    }

    /// Ends a message that keeps failing: an `internal` dead letter, recorded where
    /// the ledger takes it and published in any case. A ledger that refuses it (text
    /// PostgreSQL cannot store, a unit in a state it cannot finish from) is logged,
    /// not retried: the dead letter on the topic is what operators replay.
    pub async fn give_up(&self, message: &Message, attempt: &Attempt, reason: &str) -> Result<Completion, HandleError> {
        let claimer = self.claimer(attempt);
        let ticket = self.intake(message).ok();
        let (payload, payload_encoding) = encode_payload(&message.payload);
        let dead_letter = DeadLetter {
            schema_version: SCHEMA_VERSION,
            ticket_id: ticket.as_ref().map(|t| t.ticket_id.clone()),
            unit_id: ticket.as_ref().map(|t| t.unit_id.clone()),
            error: DeadLetterError { kind: ErrorKind::Internal, message: reason.to_owned() },
            attempts: attempt.failures,
            replay_count: message.replay_count,
            source: message.source.clone(),
            failed_at: now_rfc3339(),
            worker_id: self.worker_id.clone(),
            payload,
            payload_encoding,
        };
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
            self.ledger.mark_published(&t.unit_id).await?;
        }
        Ok(Completion::of(Handled::DeadLettered(ErrorKind::Internal), &output, &self.prices))
    }

    fn intake(&self, message: &Message) -> Result<Ticket, Rejection> {
        let limit = self.settings.limits.max_message_bytes;
        match message.full_len {
            Some(full) if full > limit as u64 => Err(Rejection {
                kind: ErrorKind::TooLarge,
                message: format!("message is {full} bytes, limit is {limit}"),
                ticket_id: None,
            }),
            _ => intake::parse(&message.payload, limit),
        }
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

    async fn release(&self, unit_id: &str, claimer: &str) {
        if let Err(e) = self.ledger.release(unit_id, claimer).await {
            tracing::warn!(unit_id, error = %e, "could not release a claim; its lease will expire");
        }
    }

    /// Triage, route and respond: the unit's output. Never fails: every failure is a
    /// dead letter of the right kind.
    pub async fn answer(&self, ticket: &Ticket, message: &Message, attempts: u32, prior_cost_usd: f64) -> Output {
        let started = Instant::now();
        let Triaged { signals, triage, mut unit, mut moderation, ticket_data } = self.triaged(ticket, started).await;
        let runner = self.runner();
        let finish =
            |unit: &UnitCalls, status, reply: Option<String>, route: RouteView, moderation: &ModerationState| {
                self.reply_output(ticket, &triage, unit, status, reply, route, moderation, prior_cost_usd, started)
            };
        if let Some(Verdict::Flagged { reason }) = &moderation.verdict {
            let route = human_route(vec!["moderation:flagged".into(), reason.clone()]);
            return finish(&unit, ReplyStatus::NeedsHuman, None, route, &moderation);
        }

        let facts = Facts { ticket, triage: &triage, signals: &signals };
        let mut decision = routing::route(&self.settings.routing.rules, &facts);
        if let Some(degraded) = self.budgets.check(&decision.target) {
            decision.reasons.push(degraded.reason);
            decision.target = degraded.target;
        }
        if decision.target == HUMAN {
            return finish(&unit, ReplyStatus::NeedsHuman, None, human_route(decision.reasons), &moderation);
        }
        let Some(tier) = self.settings.tiers.get(&decision.target) else {
            // Validation rejects unknown targets; reaching this is a bug worth a dead letter.
            let error = format!("route target `{}` is not a configured tier", decision.target);
            return self.failed(ticket, message, ErrorKind::Internal, error, unit, attempts);
        };
        let system = prompt::reply_system(
            &triage.category,
            self.settings.policies.get(&triage.category).map(String::as_str),
            &tier.instruction,
            &triage.language,
        );
        let request = ChatRequest {
            model: String::new(),
            stage: Stage::Reply,
            system,
            user: ticket_data,
            json_mode: false,
            max_output_tokens: 800,
        };
        let mut reasons = decision.reasons;
        let mut result = runner.run(Stage::Reply, &tier.chain, request.clone(), &mut unit).await;
        let mut reply_attempts = attempts_of(&result);
        if matches!(result, ChainResult::Refused { .. }) {
            match self.moderate(ticket, &request.user, &runner, &mut unit, &mut moderation).await {
                Verdict::Flagged { reason } => {
                    reasons.extend(["moderation:flagged".into(), reason]);
                    let route = RouteView { attempts: reply_attempts, ..human_route(reasons) };
                    return finish(&unit, ReplyStatus::NeedsHuman, None, route, &moderation);
                }
                Verdict::Passed => {
                    reasons.push("moderation:bypass".into());
                    result = runner.run(Stage::Reply, &tier.bypass_chain, request, &mut unit).await;
                    reply_attempts += attempts_of(&result);
                }
            }
        }
        let route_for = |provider: Option<String>, model: Option<String>, reasons: Vec<String>| RouteView {
            tier: decision.target.clone(),
            provider,
            model,
            reasons,
            attempts: reply_attempts,
        };
        match result {
            ChainResult::Answered { text, .. } if prompt::leaks_instructions(&text) => {
                tracing::warn!(ticket_id = %ticket.ticket_id, "reply repeats our instructions; handing the ticket to a person");
                reasons.push("guard:reply_revealed_instructions".into());
                let route = RouteView { attempts: reply_attempts, ..human_route(reasons) };
                finish(&unit, ReplyStatus::NeedsHuman, None, route, &moderation)
            }
            ChainResult::Answered { provider, model, text, .. } => {
                let route = route_for(Some(provider), Some(model), reasons);
                let text = crate::reply_text::normalize(&text, &triage.language);
                finish(&unit, ReplyStatus::Answered, Some(text), route, &moderation)
            }
            ChainResult::Refused { .. } => {
                // Refused everywhere although our own check passed: a person decides.
                reasons.push("moderation:refused_by_every_provider".into());
                let route = RouteView { attempts: reply_attempts, ..human_route(reasons) };
                finish(&unit, ReplyStatus::NeedsHuman, None, route, &moderation)
            }
            ChainResult::Exhausted { errors, .. } => {
                let error = format!("every model of tier `{}` failed: {}", decision.target, errors.join("; "));
                self.failed(ticket, message, ErrorKind::ProvidersExhausted, error, unit, attempts)
            }
            ChainResult::Rejected { errors, .. } => {
                let error =
                    format!("every model of tier `{}` rejected the request: {}", decision.target, errors.join("; "));
                self.failed(ticket, message, ErrorKind::Rejected, error, unit, attempts)
            }
        }
    }

    /// The triage stage: the triage chain, its bypass after a refusal, and the
    /// heuristics whenever no model gives a usable answer.
    #[allow(clippy::too_many_arguments)]
    async fn triage(
        &self,
        ticket: &Ticket,
        signals: &triage::Signals,
        heuristic: Triage,
        ticket_data: &str,
        runner: &ChainRunner<'_>,
        unit: &mut UnitCalls,
        moderation: &mut ModerationState,
    ) -> Triage {
        let request = ChatRequest {
            model: String::new(),
            stage: Stage::Triage,
            system: self.triage_system.clone(),
            user: ticket_data.to_owned(),
            json_mode: true,
            max_output_tokens: 200,
        };
        let mut result = runner.run(Stage::Triage, &self.settings.triage.chain, request.clone(), unit).await;
        if matches!(result, ChainResult::Refused { .. }) {
            if let Verdict::Flagged { .. } = self.moderate(ticket, ticket_data, runner, unit, moderation).await {
                return heuristic;
            }
            result = runner.run(Stage::Triage, &self.settings.triage.bypass_chain, request, unit).await;
        }
        match result {
            ChainResult::Answered { text, .. } => parse_triage(&text, &self.analyzer.categories, &heuristic, signals)
                .unwrap_or_else(|| {
                    tracing::info!(ticket_id = %ticket.ticket_id, "triage answer unusable; heuristics decide");
                    heuristic
                }),
            other => {
                tracing::info!(ticket_id = %ticket.ticket_id, result = ?std::mem::discriminant(&other), "triage models failed; heuristics decide");
                heuristic
            }
        }
    }

    /// Triage alone, as `ticketflow explain` shows it: local signals, the triage
    /// result (with the refusal handling of the real pipeline) and the calls it made.
    pub async fn triage_ticket(&self, ticket: &Ticket) -> (triage::Signals, Triage, UnitCalls) {
        let t = self.triaged(ticket, Instant::now()).await;
        (t.signals, t.triage, t.unit)
    }

    fn runner(&self) -> ChainRunner<'_> {
        ChainRunner { providers: &self.providers, prices: &self.prices, retry: &self.settings.retry }
    }

    /// The first stage of every ticket: local signals, then triage (with the refusal
    /// handling), under the ticket's deadline counted from `started`.
    async fn triaged(&self, ticket: &Ticket, started: Instant) -> Triaged {
        let deadline = started + Duration::from_millis(self.settings.limits.ticket_deadline_ms);
        // A quarter of the lease stays for recording and publishing the outcome.
        let hold_until = started + Duration::from_millis(self.settings.database.lease_ms * 3 / 4);
        let mut unit = UnitCalls::new(&ticket.ticket_id, &ticket.unit_id, deadline).with_hold_until(hold_until);
        let mut moderation = ModerationState::default();
        let ticket_data = prompt::ticket_data(ticket);
        let (signals, heuristic) = self.analyzer.analyze(ticket);
        let triage =
            self.triage(ticket, &signals, heuristic, &ticket_data, &self.runner(), &mut unit, &mut moderation).await;
        Triaged { signals, triage, unit, moderation, ticket_data }
    }

    /// Runs our own moderation check once per ticket.
    async fn moderate(
        &self,
        ticket: &Ticket,
        ticket_data: &str,
        runner: &ChainRunner<'_>,
        unit: &mut UnitCalls,
        state: &mut ModerationState,
    ) -> Verdict {
        if let Some(v) = &state.verdict {
            return v.clone();
        }
        let verdict = match self.settings.moderation.mode {
            ModerationMode::Local => self.moderator.check_locally(ticket),
            ModerationMode::Model => {
                let request = ChatRequest {
                    model: String::new(),
                    stage: Stage::Moderation,
                    system: moderation::MODERATION_SYSTEM.to_owned(),
                    user: ticket_data.to_owned(),
                    json_mode: true,
                    max_output_tokens: 60,
                };
                let result = runner.run(Stage::Moderation, &self.settings.moderation.chain, request, unit).await;
                let answered = match &result {
                    ChainResult::Answered { text, .. } => moderation::parse_answer(text),
                    _ => None,
                };
                answered.unwrap_or_else(|| match self.moderator.check_locally(ticket) {
                    Verdict::Flagged { reason } => {
                        Verdict::Flagged { reason: format!("{reason} (no moderation model answered)") }
                    }
                    Verdict::Passed => Verdict::Passed,
                })
            }
        };
        tracing::info!(ticket_id = %ticket.ticket_id, verdict = ?verdict, "moderation check after a refusal");
        state.verdict = Some(verdict.clone());
        verdict
    }

    #[allow(clippy::too_many_arguments)]
    fn reply_output(
        &self,
        ticket: &Ticket,
        triage: &Triage,
        unit: &UnitCalls,
        status: ReplyStatus,
        reply: Option<String>,
        route: RouteView,
        moderation: &ModerationState,
        prior_cost_usd: f64,
        started: Instant,
    ) -> Output {
        if status == ReplyStatus::Answered {
            self.budgets.record(&route.tier, unit.total_cost());
        }
        let moderation_view = (!unit.refused_by.is_empty()).then(|| {
            let passed = !matches!(moderation.verdict, Some(Verdict::Flagged { .. }));
            ModerationView {
                refused_by: unit.refused_by.clone(),
                check: if passed { "passed" } else { "flagged" }.into(),
                bypassed: passed && status == ReplyStatus::Answered,
            }
        });
        Output::Reply {
            reply: Reply {
                schema_version: SCHEMA_VERSION,
                ticket_id: ticket.ticket_id.clone(),
                unit_id: ticket.unit_id.clone(),
                conversation_id: ticket.conversation_id.clone(),
                status,
                reply,
                triage: triage.view(),
                route,
                moderation: moderation_view,
                cost_usd: prior_cost_usd + unit.total_cost(),
                latency_ms: started.elapsed().as_millis() as u64,
                metadata: ticket.metadata.clone(),
                processed_at: now_rfc3339(),
                worker_id: self.worker_id.clone(),
            },
            costs: unit.costs.clone(),
        }
    }

    fn failed(
        &self,
        ticket: &Ticket,
        message: &Message,
        kind: ErrorKind,
        error: String,
        unit: UnitCalls,
        attempts: u32,
    ) -> Output {
        tracing::warn!(ticket_id = %ticket.ticket_id, kind = kind.as_str(), error = %error, "ticket dead-lettered");
        let (payload, payload_encoding) = encode_payload(&message.payload);
        Output::DeadLetter {
            dead_letter: DeadLetter {
                schema_version: SCHEMA_VERSION,
                ticket_id: Some(ticket.ticket_id.clone()),
                unit_id: Some(ticket.unit_id.clone()),
                error: DeadLetterError { kind, message: error },
                attempts,
                replay_count: message.replay_count,
                source: message.source.clone(),
                failed_at: now_rfc3339(),
                worker_id: self.worker_id.clone(),
                payload,
                payload_encoding,
            },
            costs: unit.costs,
        }
    }

    /// Dead letter for input that never became a ticket. An oversized payload is kept
    /// only up to the size limit, so a dead letter is never itself too large to publish.
    fn rejected(&self, message: &Message, rejection: Rejection) -> DeadLetter {
        let limit = self.settings.limits.max_message_bytes;
        let (bytes, text) = if rejection.kind == ErrorKind::TooLarge && message.payload.len() > limit {
            (&message.payload[..limit], format!("{}; payload cut to the first {limit} bytes", rejection.message))
        } else {
            (&message.payload[..], rejection.message)
        };
        let (payload, payload_encoding) = encode_payload(bytes);
        DeadLetter {
            schema_version: SCHEMA_VERSION,
            ticket_id: rejection.ticket_id,
            unit_id: None,
            error: DeadLetterError { kind: rejection.kind, message: text },
            attempts: 1,
            replay_count: message.replay_count,
            source: message.source.clone(),
            failed_at: now_rfc3339(),
            worker_id: self.worker_id.clone(),
            payload,
            payload_encoding,
        }
    }
}

fn attempts_of(result: &ChainResult) -> u32 {
    match result {
        ChainResult::Answered { attempts, .. }
        | ChainResult::Refused { attempts }
        | ChainResult::Exhausted { attempts, .. }
        | ChainResult::Rejected { attempts, .. } => *attempts,
    }
}

fn human_route(reasons: Vec<String>) -> RouteView {
    RouteView { tier: HUMAN.into(), provider: None, model: None, reasons, attempts: 0 }
}

#[async_trait]
impl Handler for Pipeline {
    async fn handle(&self, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError> {
        Pipeline::handle(self, message, attempt).await
    }

    async fn give_up(&self, message: &Message, attempt: &Attempt, reason: &str) -> Result<Completion, HandleError> {
        Pipeline::give_up(self, message, attempt, reason).await
    }
}
