//! One ticket through every stage, knowing no broker:
//! intake → ledger claim → triage → route → respond (chains, moderation bypass)
//! → ledger finish → publish → ledger mark published. The caller acks afterwards.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::broker::{BrokerError, Delivery, Publisher};
use crate::intake::{self, Rejection};
use crate::ledger::{Claim, Ledger, LedgerError};
use crate::moderation::{self, Moderator, Verdict};
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

/// How long a delivery whose unit is busy elsewhere waits for it before being handed back.
const BUSY_WAIT: Duration = Duration::from_secs(5);

/// What became of a delivery. Every variant means the delivery may be acked.
#[derive(Debug, Clone, PartialEq)]
pub enum Handled {
    Replied(ReplyStatus),
    DeadLettered(ErrorKind),
    /// Already answered and published earlier: nothing to do.
    Duplicate,
    /// Already answered earlier but never confirmed published: published now.
    Republished,
}

/// Why a delivery must not be acked: it is handed back to the broker.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Publish(#[from] BrokerError),
    #[error("unit {0} is being processed by another worker")]
    Busy(String),
}

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
    /// Numbers this worker's claims: each delivery claims under a name of its own
    /// (`worker#n`), so that a claim retried after a lost response is recognised as
    /// its own, while a second delivery of the same unit in this process is not.
    claims: std::sync::atomic::AtomicU64,
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
            claims: std::sync::atomic::AtomicU64::new(0),
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

    /// Handles one delivery up to the point where it may be acked.
    pub async fn handle(&self, delivery: &Delivery) -> Result<Handled, HandleError> {
        let limit = self.settings.limits.max_message_bytes;
        let parsed = match delivery.full_len {
            Some(full) if full > limit as u64 => Err(Rejection {
                kind: ErrorKind::TooLarge,
                message: format!("message is {full} bytes, limit is {limit}"),
                ticket_id: None,
            }),
            _ => intake::parse(&delivery.payload, limit),
        };
        let ticket = match parsed {
            Ok(ticket) => ticket,
            Err(rejection) => {
                tracing::info!(source = ?delivery.source, kind = rejection.kind.as_str(), error = %rejection.message, "rejected input");
                let dead_letter = self.rejected(delivery, rejection);
                self.ledger.record_rejected(&dead_letter).await?;
                let kind = dead_letter.error.kind;
                self.publisher.publish(&Output::DeadLetter { dead_letter, costs: Vec::new() }).await?;
                return Ok(Handled::DeadLettered(kind));
            }
        };
        let claimer = format!("{}#{}", self.worker_id, self.claims.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let claim = self.claim(&ticket, delivery.replay_count, &claimer).await?;
        let (attempts, prior_cost_usd) = match claim {
            Claim::Fresh { attempts, prior_cost_usd } => (attempts, prior_cost_usd),
            Claim::Done => return Ok(Handled::Duplicate),
            Claim::Unpublished(output) => {
                self.publisher.publish(&output).await?;
                self.ledger.mark_published(&ticket.unit_id).await?;
                return Ok(Handled::Republished);
            }
            Claim::Busy => return Err(HandleError::Busy(ticket.unit_id.clone())),
        };
        let output = self.answer(&ticket, delivery, attempts, prior_cost_usd).await;
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
        Ok(handled)
    }

    /// Claims the unit, waiting a little while another worker holds it.
    async fn claim(&self, ticket: &Ticket, replay_count: u32, claimer: &str) -> Result<Claim, HandleError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(10);
        loop {
            let claim = self.ledger.claim(&ticket.unit_id, &ticket.ticket_id, replay_count, claimer).await?;
            if !matches!(claim, Claim::Busy) || started.elapsed() >= BUSY_WAIT {
                return Ok(claim);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }

    async fn release(&self, unit_id: &str, claimer: &str) {
        if let Err(e) = self.ledger.release(unit_id, claimer).await {
            tracing::warn!(unit_id, error = %e, "could not release a claim; its lease will expire");
        }
    }

    /// Triage, route and respond: the unit's output. Never fails: every failure is a
    /// dead letter of the right kind.
    pub async fn answer(&self, ticket: &Ticket, delivery: &Delivery, attempts: u32, prior_cost_usd: f64) -> Output {
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
            let message = format!("route target `{}` is not a configured tier", decision.target);
            return self.failed(ticket, delivery, ErrorKind::Internal, message, unit, attempts);
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
                let message = format!("every model of tier `{}` failed: {}", decision.target, errors.join("; "));
                self.failed(ticket, delivery, ErrorKind::ProvidersExhausted, message, unit, attempts)
            }
            ChainResult::Rejected { errors, .. } => {
                let message =
                    format!("every model of tier `{}` rejected the request: {}", decision.target, errors.join("; "));
                self.failed(ticket, delivery, ErrorKind::Rejected, message, unit, attempts)
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
        let mut unit = UnitCalls::new(&ticket.ticket_id, &ticket.unit_id, deadline);
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
        delivery: &Delivery,
        kind: ErrorKind,
        message: String,
        unit: UnitCalls,
        attempts: u32,
    ) -> Output {
        tracing::warn!(ticket_id = %ticket.ticket_id, kind = kind.as_str(), error = %message, "ticket dead-lettered");
        let (payload, payload_encoding) = encode_payload(&delivery.payload);
        Output::DeadLetter {
            dead_letter: DeadLetter {
                schema_version: SCHEMA_VERSION,
                ticket_id: Some(ticket.ticket_id.clone()),
                unit_id: Some(ticket.unit_id.clone()),
                error: DeadLetterError { kind, message },
                attempts,
                replay_count: delivery.replay_count,
                source: delivery.source.clone(),
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
    fn rejected(&self, delivery: &Delivery, rejection: Rejection) -> DeadLetter {
        let limit = self.settings.limits.max_message_bytes;
        let (bytes, message) = if rejection.kind == ErrorKind::TooLarge && delivery.payload.len() > limit {
            (&delivery.payload[..limit], format!("{}; payload cut to the first {limit} bytes", rejection.message))
        } else {
            (&delivery.payload[..], rejection.message)
        };
        let (payload, payload_encoding) = encode_payload(bytes);
        DeadLetter {
            schema_version: SCHEMA_VERSION,
            ticket_id: rejection.ticket_id,
            unit_id: None,
            error: DeadLetterError { kind: rejection.kind, message },
            attempts: 1,
            replay_count: delivery.replay_count,
            source: delivery.source.clone(),
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
