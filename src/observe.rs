//! The observation seam: every unit of work the dispatcher settles is reported once,
//! as a [`Completion`], to each [`Observer`] (the run summary of `process`, metrics,
//! rate-aware admission). Publishers only publish and the ledger only stores; what
//! is counted about a run is counted here.

use crate::ticket::{ErrorKind, Output, ReplyStatus};

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

/// The kind of output a completion published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    Reply(ReplyStatus),
    DeadLetter(ErrorKind),
}

/// One settled unit of work, as observers see it.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub handled: Handled,
    /// What was published now: `None` for a duplicate.
    pub published: Option<Published>,
    /// Reply tier (`human` for a handoff); `None` for dead letters and duplicates.
    pub tier: Option<String>,
    pub provider: Option<String>,
    pub model: Option<String>,
    /// What the published output's provider calls cost.
    pub cost_usd: f64,
    /// What the same calls' tokens would cost on the baseline premium model.
    pub baseline_cost_usd: f64,
    /// Provider calls recorded in the published output.
    pub provider_calls: u32,
    /// Time from the start of triage to the reply; `None` when nothing was answered.
    pub latency_ms: Option<u64>,
    /// Answered after a refusal, through the moderation bypass.
    pub bypassed: bool,
    /// Delivery attempts it took (1 unless a failure was retried in its lane).
    pub attempts: u32,
}

impl Completion {
    /// A completion that published nothing (a duplicate).
    pub fn nothing(handled: Handled) -> Self {
        Completion {
            handled,
            published: None,
            tier: None,
            provider: None,
            model: None,
            cost_usd: 0.0,
            baseline_cost_usd: 0.0,
            provider_calls: 0,
            latency_ms: None,
            bypassed: false,
            attempts: 1,
        }
    }

    /// The completion of a published `output`.
    pub fn of(handled: Handled, output: &Output) -> Self {
        let mut c = Completion::nothing(handled);
        for record in output.costs() {
            c.provider_calls += 1;
            c.cost_usd += record.cost_usd;
            c.baseline_cost_usd += record.baseline_cost_usd;
        }
        c.published = Some(match output {
            Output::Reply { reply, .. } => Published::Reply(reply.status),
            Output::DeadLetter { dead_letter, .. } => Published::DeadLetter(dead_letter.error.kind),
        });
        if let Output::Reply { reply, .. } = output {
            c.tier = Some(reply.route.tier.clone());
            c.provider = reply.route.provider.clone();
            c.model = reply.route.model.clone();
            c.latency_ms = Some(reply.latency_ms);
            c.bypassed = reply.moderation.as_ref().is_some_and(|m| m.bypassed);
        }
        c
    }
}

/// Something told about every completion. Called from the dispatcher's tasks: keep
/// it quick and never block.
pub trait Observer: Send + Sync {
    fn completed(&self, completion: &Completion);
}
