//! Routing rules and budgets as configured: plain data. What they mean (matching,
//! shadowed-rule detection, spend tracking) lives in `routing`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One routing rule.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rule {
    /// Reason code written to `route.reasons` when the rule fires.
    pub name: String,
    /// Conditions; an empty table always matches.
    #[serde(default)]
    pub when: Condition,
    /// A tier name from `[tiers]`, or `human`.
    pub target: String,
}

/// Conditions over triage fields, local signals and ticket fields. Every field that
/// is set must hold (AND); a list means "any of these values".
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Condition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub complexity: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sentiment: Option<Vec<String>>,
    /// ISO 639-1 language codes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<Vec<String>>,
    /// Local signal: code or a stack trace in the customer's messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub has_code: Option<bool>,
    /// Local signal: an API integration question (keyword flag `api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_question: Option<bool>,
    /// Local signal: at least this many customer messages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_customer_turns: Option<usize>,
    /// Any of these configured keyword flags fired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_tier: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Vec<String>>,
    /// Top-level `metadata` keys and the values that match.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<BTreeMap<String, Vec<String>>>,
    /// All of these sub-conditions hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<Condition>>,
    /// At least one of these sub-conditions holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<Condition>>,
    /// This sub-condition does not hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<Condition>>,
}

/// The cap of one tier.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BudgetSettings {
    /// USD per day (in `limits.budget_time_zone`) for the tickets routed to this tier
    /// (every call of those tickets), shared by every replica.
    pub daily_usd: f64,
    /// Where tickets go once the cap is spent: another tier (e.g. `cheap`) or `human`.
    pub when_spent: String,
}
