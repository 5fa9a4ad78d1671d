//! Triage, routing and the reply: the stages that call providers. Never fails:
//! every failure is a handoff or a dead letter of the right kind.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::journal::{self, LedgerJournal};
use super::output::{human_route, Answer, Unit};
use super::Pipeline;
use crate::broker::Message;
use crate::ledger::{JournaledCall, LedgerError};
use crate::moderation::Verdict;
use crate::providers::chain::{ChainResult, ChainRunner, UnitCalls};
use crate::providers::{estimate_tokens, ChatRequest, Usage};
use crate::routing::{self, Facts};
use crate::settings::TierSettings;
use crate::ticket::{ErrorKind, Output, ReplyStatus, RouteView, Stage, Ticket};
use crate::triage::{self, parse::parse_triage, prompt, Triage};
use crate::vocab::HUMAN;

/// A ticket after its first stage: what triage found and the calls made so far.
pub(super) struct Triaged {
    pub signals: triage::Signals,
    pub triage: Triage,
    pub calls: UnitCalls,
    /// Our own moderation verdict, once a refusal asked for it (once per ticket).
    pub verdict: Option<Verdict>,
    /// The ticket as delimited data, the user message of every call.
    pub ticket_data: String,
    /// No triage model could be asked for our own pacing (the heuristics stood in).
    pub triage_paced: bool,
}

impl Pipeline {
    /// Triage, route and respond for `claimer`'s claim (its attempts and prior
    /// cost), resuming from the `journal` the claim returned: the unit's output, and
    /// whether it is an outage dead letter that our own pacing caused (see
    /// [`UnitCalls::paced_out`]). An error only when the journal stopped the unit's
    /// calls (the lease was lost).
    pub async fn answer(
        &self,
        ticket: &Ticket,
        message: &Message,
        (attempts, prior_cost_usd): (u32, f64),
        (claimer, journal): (&str, Vec<JournaledCall>),
    ) -> Result<(Output, bool), LedgerError> {
        let started = Instant::now();
        let unit = Unit { ticket, message, attempts, prior_cost_usd, started };
        let journaled = LedgerJournal::new(self.ledger.clone(), &ticket.unit_id, claimer);
        let mut t = self.triaged(ticket, started, Some((journaled.clone(), journal))).await;
        let output = if t.triage_paced {
            // Heuristics would stand in only because our own limiter had no room:
            // better to wait for it than to answer on a guess.
            let error = "triage: no room under our own rate limits before the ticket's hold ended".to_owned();
            self.failed(&unit, std::mem::take(&mut t.calls.costs), ErrorKind::ProvidersExhausted, error)
        } else {
            self.decide(&unit, &mut t).await
        };
        let paced = t.calls.paced_out
            && matches!(&output, Output::DeadLetter { dead_letter, .. } if dead_letter.error.kind == ErrorKind::ProvidersExhausted);
        match journaled.failure() {
            Some(e) => Err(e),
            None => Ok((output, paced)),
        }
    }

    /// Route and respond after triage.
    async fn decide(&self, unit: &Unit<'_>, t: &mut Triaged) -> Output {
        let ticket = unit.ticket;
        if let Some(Verdict::Flagged { reason }) = &t.verdict {
            let answer = Answer::human(vec!["moderation:flagged".into(), reason.clone()], 0);
            return self.reply_output(unit, t, answer);
        }

        let facts = Facts { ticket, triage: &t.triage, signals: &t.signals };
        let mut decision = routing::route(&self.settings.routing.rules, &facts);
        let mut hold = None;
        if self.budgets.capped(&decision.target) {
            // Triage so far plus the dearest reply the tier can make.
            let most = self.reply_request(t, &decision.target).map_or(0.0, |(tier, request)| {
                let usage = Usage {
                    input_tokens: estimate_tokens(&request.system) + estimate_tokens(&request.user),
                    cached_input_tokens: 0,
                    output_tokens: u64::from(request.max_output_tokens),
                };
                tier.chain.iter().chain(&tier.bypass_chain).map(|m| self.prices.get(m).cost(&usage)).fold(0.0, f64::max)
            });
            match self.budgets.reserve(&decision.target, t.calls.total_cost() + most).await {
                Ok(held) => hold = held,
                Err(degraded) => {
                    decision.reasons.push(degraded.reason);
                    decision.target = degraded.target;
                }
            }
        }
        let output = self.respond(unit, t, decision).await;
        if let Some(hold) = hold {
            // Carried calls were counted by the attempt that made them.
            hold.settle(output.costs().iter().skip(t.calls.carried).map(|c| c.cost_usd).sum());
        }
        output
    }

    /// The tier `target` and the reply request it would be sent.
    fn reply_request(&self, t: &Triaged, target: &str) -> Option<(&TierSettings, ChatRequest)> {
        let tier = self.settings.tiers.get(target)?;
        let system = prompt::reply_system(
            &t.triage.category,
            self.settings.policies.get(&t.triage.category).map(String::as_str),
            &tier.instruction,
            &t.triage.language,
        );
        let request = ChatRequest {
            model: String::new(),
            stage: Stage::Reply,
            system,
            user: t.ticket_data.clone(),
            json_mode: false,
            max_output_tokens: 800,
        };
        Some((tier, request))
    }

    /// The reply of the tier routed to, with the moderation bypass after a refusal.
    async fn respond(&self, unit: &Unit<'_>, t: &mut Triaged, decision: routing::Decision) -> Output {
        if decision.target == HUMAN {
            return self.reply_output(unit, t, Answer::human(decision.reasons, 0));
        }
        let Some((tier, request)) = self.reply_request(t, &decision.target) else {
            // Validation rejects unknown targets; reaching this is a bug worth a dead letter.
            let error = format!("route target `{}` is not a configured tier", decision.target);
            return self.failed(unit, std::mem::take(&mut t.calls.costs), ErrorKind::Internal, error);
        };
        let runner = self.runner();
        let ticket = unit.ticket;
        let mut reasons = decision.reasons;
        let mut result = runner.run(Stage::Reply, &tier.chain, request.clone(), &mut t.calls).await;
        let mut attempts = attempts_of(&result);
        if matches!(result, ChainResult::Refused { .. }) {
            match self.moderate(ticket, t, &runner).await {
                Verdict::Flagged { reason } => {
                    reasons.extend(["moderation:flagged".into(), reason]);
                    return self.reply_output(unit, t, Answer::human(reasons, attempts));
                }
                Verdict::Passed => {
                    reasons.push("moderation:bypass".into());
                    result = runner.run(Stage::Reply, &tier.bypass_chain, request, &mut t.calls).await;
                    attempts += attempts_of(&result);
                }
            }
        }
        match result {
            ChainResult::Answered { text, .. } if prompt::leaks_instructions(&text) => {
                tracing::warn!(ticket_id = %ticket.ticket_id, "reply repeats our instructions; handing the ticket to a person");
                reasons.push("guard:reply_revealed_instructions".into());
                self.reply_output(unit, t, Answer::human(reasons, attempts))
            }
            ChainResult::Answered { provider, model, text, .. } => {
                let route = RouteView {
                    tier: decision.target,
                    provider: Some(provider),
                    model: Some(model),
                    reasons,
                    attempts,
                };
                let text = crate::reply_text::normalize(&text, &t.triage.language);
                self.reply_output(unit, t, Answer { status: ReplyStatus::Answered, text: Some(text), route })
            }
            ChainResult::Refused { .. } => {
                // Refused everywhere although our own check passed: a person decides.
                reasons.push("moderation:refused_by_every_provider".into());
                self.reply_output(unit, t, Answer { route: human_route(reasons, attempts), ..Answer::human(vec![], 0) })
            }
            ChainResult::Exhausted { errors, .. } => {
                let error = format!("every model of tier `{}` failed: {}", decision.target, errors.join("; "));
                self.failed(unit, std::mem::take(&mut t.calls.costs), ErrorKind::ProvidersExhausted, error)
            }
            ChainResult::Rejected { errors, .. } => {
                let error =
                    format!("every model of tier `{}` rejected the request: {}", decision.target, errors.join("; "));
                self.failed(unit, std::mem::take(&mut t.calls.costs), ErrorKind::Rejected, error)
            }
        }
    }

    /// Triage alone, as `ticketflow explain` shows it: local signals, the triage
    /// result (with the refusal handling of the real pipeline) and the calls it made.
    pub async fn triage_ticket(&self, ticket: &Ticket) -> (triage::Signals, Triage, UnitCalls) {
        let t = self.triaged(ticket, Instant::now(), None).await;
        (t.signals, t.triage, t.calls)
    }

    pub(super) fn runner(&self) -> ChainRunner<'_> {
        ChainRunner { providers: &self.providers, prices: &self.prices, retry: &self.settings.retry }
    }

    /// The first stage of every ticket: local signals, then triage (with the refusal
    /// handling), under the ticket's deadline counted from `started`; with a journal,
    /// each call journaled and the unit resumed from the calls already journaled.
    async fn triaged(
        &self,
        ticket: &Ticket,
        started: Instant,
        journaled: Option<(Arc<LedgerJournal>, Vec<JournaledCall>)>,
    ) -> Triaged {
        let deadline = started + Duration::from_millis(self.settings.limits.ticket_deadline_ms);
        let hold_until = started + super::unit_hold(&self.settings);
        let mut calls = UnitCalls::new(&ticket.ticket_id, &ticket.unit_id, deadline).with_hold_until(hold_until);
        if let Some((journal, earlier)) = journaled {
            calls = calls.with_journal(journal);
            journal::resume(&mut calls, earlier, &self.prices);
        }
        let (signals, heuristic) = self.analyzer.analyze(ticket);
        let mut t = Triaged {
            signals,
            triage: heuristic,
            calls,
            verdict: None,
            ticket_data: prompt::ticket_data(ticket),
            triage_paced: false,
        };
        t.triage = self.triage(ticket, &mut t).await;
        t
    }

    /// The triage chain, its bypass after a refusal, and the heuristics (already in
    /// `t.triage`) whenever no model gives a usable answer.
    async fn triage(&self, ticket: &Ticket, t: &mut Triaged) -> Triage {
        let runner = self.runner();
        let request = ChatRequest {
            model: String::new(),
            stage: Stage::Triage,
            system: self.triage_system.clone(),
            user: t.ticket_data.clone(),
            json_mode: true,
            max_output_tokens: 200,
        };
        let mut result = runner.run(Stage::Triage, &self.settings.triage.chain, request.clone(), &mut t.calls).await;
        if matches!(result, ChainResult::Refused { .. }) {
            if let Verdict::Flagged { .. } = self.moderate(ticket, t, &runner).await {
                return t.triage.clone();
            }
            result = runner.run(Stage::Triage, &self.settings.triage.bypass_chain, request, &mut t.calls).await;
        }
        match result {
            ChainResult::Answered { text, .. } => parse_triage(&text, &self.analyzer.categories, &t.triage, &t.signals)
                .unwrap_or_else(|| {
                    tracing::info!(ticket_id = %ticket.ticket_id, "triage answer unusable; heuristics decide");
                    t.triage.clone()
                }),
            other => {
                t.triage_paced = t.calls.paced_out && matches!(other, ChainResult::Exhausted { .. });
                tracing::info!(ticket_id = %ticket.ticket_id, result = ?std::mem::discriminant(&other), paced = t.triage_paced, "triage models failed; heuristics decide");
                t.triage.clone()
            }
        }
    }

    /// Our own moderation check, run at most once per ticket.
    async fn moderate(&self, ticket: &Ticket, t: &mut Triaged, runner: &ChainRunner<'_>) -> Verdict {
        if let Some(v) = &t.verdict {
            return v.clone();
        }
        let verdict = self.moderator.check(ticket, &t.ticket_data, runner, &mut t.calls).await;
        tracing::info!(ticket_id = %ticket.ticket_id, verdict = ?verdict, "moderation check after a refusal");
        t.verdict = Some(verdict.clone());
        verdict
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
