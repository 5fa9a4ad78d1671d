//! The documents a unit of work ends as: a reply, a dead letter, or the dead letter
//! of input that never became a ticket. Assembly only: no I/O, no decisions.

use std::time::Instant;

use super::answer::Triaged;
use super::Pipeline;
use crate::broker::Message;
use crate::intake::Rejection;
use crate::moderation::Verdict;
use crate::ticket::{
    encode_payload, now_rfc3339, CostRecord, DeadLetter, DeadLetterError, ErrorKind, ModerationView, Output, Reply,
    ReplyStatus, RouteView, Ticket, SCHEMA_VERSION,
};
use crate::vocab::HUMAN;

/// One ticket's unit of work as the ledger granted it.
pub(super) struct Unit<'a> {
    pub ticket: &'a Ticket,
    pub message: &'a Message,
    /// Ledger attempts at the unit, replays included.
    pub attempts: u32,
    /// What earlier attempts (before a replay) already spent.
    pub prior_cost_usd: f64,
    pub started: Instant,
}

/// How a ticket was answered (or handed to a person).
pub(super) struct Answer {
    pub status: ReplyStatus,
    pub text: Option<String>,
    pub route: RouteView,
}

impl Answer {
    /// A handoff to a person, with the reasons and the reply attempts made before it.
    pub fn human(reasons: Vec<String>, attempts: u32) -> Self {
        Answer { status: ReplyStatus::NeedsHuman, text: None, route: human_route(reasons, attempts) }
    }
}

pub(super) fn human_route(reasons: Vec<String>, attempts: u32) -> RouteView {
    RouteView { tier: HUMAN.into(), provider: None, model: None, reasons, attempts }
}

impl Pipeline {
    pub(super) fn reply_output(&self, unit: &Unit<'_>, t: &Triaged, answer: Answer) -> Output {
        let moderation = (!t.calls.refused_by.is_empty()).then(|| {
            let passed = !matches!(t.verdict, Some(Verdict::Flagged { .. }));
            ModerationView {
                refused_by: t.calls.refused_by.clone(),
                check: if passed { "passed" } else { "flagged" }.into(),
                bypassed: passed && answer.status == ReplyStatus::Answered,
            }
        });
        let ticket = unit.ticket;
        Output::Reply {
            reply: Reply {
                schema_version: SCHEMA_VERSION,
                ticket_id: ticket.ticket_id.clone(),
                unit_id: ticket.unit_id.clone(),
                conversation_id: ticket.conversation_id.clone(),
                status: answer.status,
                reply: answer.text,
                triage: t.triage.view(),
                route: answer.route,
                moderation,
                cost_usd: unit.prior_cost_usd + t.calls.total_cost(),
                latency_ms: unit.started.elapsed().as_millis() as u64,
                metadata: ticket.metadata.clone(),
                processed_at: now_rfc3339(),
                worker_id: self.worker_id.clone(),
            },
            costs: t.calls.costs.clone(),
        }
    }

    /// The unit failed: a dead letter carrying the costs of the calls it made.
    pub(super) fn failed(&self, unit: &Unit<'_>, costs: Vec<CostRecord>, kind: ErrorKind, error: String) -> Output {
        tracing::warn!(ticket_id = %unit.ticket.ticket_id, kind = kind.as_str(), error = %error, "ticket dead-lettered");
        let ids = (Some(unit.ticket.ticket_id.clone()), Some(unit.ticket.unit_id.clone()));
        let dead_letter = self.dead_letter(unit.message, &unit.message.payload, ids, kind, error, unit.attempts);
        Output::DeadLetter { dead_letter, costs }
    }

    /// Dead letter for input that never became a ticket. An oversized payload is kept
    /// only up to the size limit, so a dead letter is never itself too large to publish.
    pub(super) fn rejected(&self, message: &Message, rejection: Rejection) -> DeadLetter {
        let limit = self.settings.limits.max_message_bytes;
        let (bytes, text) = if rejection.kind == ErrorKind::TooLarge && message.payload.len() > limit {
            (&message.payload[..limit], format!("{}; payload cut to the first {limit} bytes", rejection.message))
        } else {
            (&message.payload[..], rejection.message)
        };
        self.dead_letter(message, bytes, (rejection.ticket_id, None), rejection.kind, text, 1)
    }

    /// A dead letter of `message` with `payload` (all or the first part of it) and
    /// the `(ticket_id, unit_id)` known.
    pub(super) fn dead_letter(
        &self,
        message: &Message,
        payload: &[u8],
        (ticket_id, unit_id): (Option<String>, Option<String>),
        kind: ErrorKind,
        error: String,
        attempts: u32,
    ) -> DeadLetter {
        let (payload, payload_encoding) = encode_payload(payload);
        DeadLetter {
            schema_version: SCHEMA_VERSION,
            ticket_id,
            unit_id,
            error: DeadLetterError { kind, message: error },
            attempts,
            replay_count: message.replay_count,
            source: message.source.clone(),
            failed_at: now_rfc3339(),
            worker_id: self.worker_id.clone(),
            payload,
            payload_encoding,
        }
    }
}
