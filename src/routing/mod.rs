//! Routing: ordered, named, declarative rules; the first rule that matches picks the
//! target (a tier from `[tiers]` or `human`). Rule names land in `route.reasons`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::settings::Settings;
use crate::ticket::Ticket;
use crate::triage::{Signals, Triage};

/// The handoff target: no model answers, a person does.
pub const HUMAN: &str = "human";

pub const COMPLEXITIES: &[&str] = &["simple", "complex"];
pub const SENTIMENTS: &[&str] = &["positive", "neutral", "negative", "angry"];
pub const RISKS: &[&str] = &["none", "legal", "safety"];

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

/// What a rule sees.
pub struct Facts<'a> {
    pub ticket: &'a Ticket,
    pub triage: &'a Triage,
    pub signals: &'a Signals,
}

fn one_of(allowed: &Option<Vec<String>>, value: &str) -> bool {
    allowed.as_ref().is_none_or(|list| list.iter().any(|v| v == value))
}

fn one_of_opt(allowed: &Option<Vec<String>>, value: Option<&str>) -> bool {
    match allowed {
        None => true,
        Some(list) => value.is_some_and(|v| list.iter().any(|a| a == v)),
    }
}

impl Condition {
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        one_of(&self.category, &f.triage.category)
            && one_of(&self.complexity, &f.triage.complexity)
            && one_of(&self.sentiment, &f.triage.sentiment)
            && one_of(&self.language, &f.triage.language)
            && one_of(&self.risk, &f.triage.risk)
            && self.has_code.is_none_or(|want| f.signals.has_code == want)
            && self.api_question.is_none_or(|want| f.signals.api_question == want)
            && self.min_customer_turns.is_none_or(|n| f.signals.customer_turns >= n)
            && self.flags.as_ref().is_none_or(|flags| flags.iter().any(|fl| f.signals.flags.contains(fl)))
            && one_of_opt(&self.customer_tier, f.ticket.customer_tier.as_deref())
            && one_of_opt(&self.channel, f.ticket.channel.as_deref())
            && self.metadata.as_ref().is_none_or(|wanted| {
                wanted.iter().all(|(key, values)| f.ticket.metadata_value(key).is_some_and(|v| values.contains(&v)))
            })
            && self.all.as_ref().is_none_or(|cs| cs.iter().all(|c| c.matches(f)))
            && self.any.as_ref().is_none_or(|cs| cs.iter().any(|c| c.matches(f)))
            && self.not.as_ref().is_none_or(|c| !c.matches(f))
    }

    fn check(&self, at: &str, s: &Settings, problems: &mut Vec<String>) {
        let mut enum_check = |field: &str, values: &Option<Vec<String>>, allowed: &[&str]| {
            for v in values.iter().flatten() {
                if !allowed.contains(&v.as_str()) {
                    problems.push(format!("{at}.{field}: unknown value `{v}` (allowed: {})", allowed.join(", ")));
                }
            }
        };
        let categories: Vec<&str> = s.triage.categories.iter().map(String::as_str).collect();
        enum_check("category", &self.category, &categories);
        enum_check("complexity", &self.complexity, COMPLEXITIES);
        enum_check("sentiment", &self.sentiment, SENTIMENTS);
        enum_check("risk", &self.risk, RISKS);
        let flags: Vec<&str> = s.triage.keywords.keys().map(String::as_str).collect();
        enum_check("flags", &self.flags, &flags);
        for (i, c) in self.all.iter().flatten().enumerate() {
            c.check(&format!("{at}.all[{i}]"), s, problems);
        }
        for (i, c) in self.any.iter().flatten().enumerate() {
            c.check(&format!("{at}.any[{i}]"), s, problems);
        }
        if let Some(c) = &self.not {
            c.check(&format!("{at}.not"), s, problems);
        }
    }
}

/// Load-time checks of the rule list.
pub fn validate_rules(rules: &[Rule], s: &Settings) -> Vec<String> {
    let mut problems = Vec::new();
    if rules.is_empty() {
        problems.push("routing.rules: at least one rule is required".into());
    }
    let mut seen = std::collections::HashSet::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("routing.rules[{i}] ({})", rule.name);
        if rule.name.trim().is_empty() {
            problems.push(format!("routing.rules[{i}]: name must not be empty"));
        }
        if !seen.insert(rule.name.as_str()) {
            problems.push(format!("{at}: duplicate rule name"));
        }
        if rule.target != HUMAN && !s.tiers.contains_key(&rule.target) {
            problems.push(format!("{at}: target `{}` is neither `human` nor a tier in [tiers]", rule.target));
        }
        rule.when.check(&format!("{at}.when"), s, &mut problems);
    }
    problems
}

/// The routing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Tier name or [`HUMAN`].
    pub target: String,
    pub reasons: Vec<String>,
}

/// Evaluates the rules in order. With no matching rule the ticket goes to a human:
/// an operator who wrote rules without a catch-all wants to see the gap, not a guess.
pub fn route(rules: &[Rule], facts: &Facts<'_>) -> Decision {
    for rule in rules {
        if rule.when.matches(facts) {
            return Decision { target: rule.target.clone(), reasons: vec![rule.name.clone()] };
        }
    }
    Decision { target: HUMAN.into(), reasons: vec!["no_rule_matched".into()] }
}
