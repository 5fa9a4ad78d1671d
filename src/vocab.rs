//! The shared vocabulary of triage and routing: the values a triage answer and a
//! routing rule may use, and the handoff target. A leaf: it depends on nothing, so
//! settings, triage and routing can all speak it without depending on each other.

/// The handoff target: no model answers, a person does.
pub const HUMAN: &str = "human";

pub const COMPLEXITIES: &[&str] = &["simple", "complex"];
pub const SENTIMENTS: &[&str] = &["positive", "neutral", "negative", "angry"];
pub const RISKS: &[&str] = &["none", "legal", "safety"];
