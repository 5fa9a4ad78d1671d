//! Routing: ordered, named, declarative rules; the first rule that matches picks the
//! target (a tier from `[tiers]` or `human`). Rule names land in `route.reasons`.
//! [`budget`] degrades a route whose tier has spent its daily cap.

pub mod budget;

use serde::Serialize;

use crate::settings::Settings;
pub use crate::settings::{Condition, Rule};
use crate::ticket::Ticket;
use crate::triage::{Signals, Triage};
pub use crate::vocab::HUMAN;
use crate::vocab::{COMPLEXITIES, RISKS, SENTIMENTS};

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
        if let Some(earlier) = rules[..i].iter().find(|e| e.when.covers(&rule.when)) {
            problems.push(format!(
                "{at}: can never fire: every ticket it matches is already taken by the earlier rule `{}`",
                earlier.name
            ));
        }
    }
    problems
}

impl Condition {
    /// True when every ticket matching `later` certainly matches `self` too, so a rule
    /// with `later` placed after one with `self` can never fire. Conservative: `any`
    /// and `not` in `self` are never assumed to cover anything.
    fn covers(&self, later: &Condition) -> bool {
        fn list(earlier: &Option<Vec<String>>, later: &Option<Vec<String>>) -> bool {
            match (earlier, later) {
                (None, _) => true,
                (Some(e), Some(l)) => l.iter().all(|v| e.contains(v)),
                (Some(_), None) => false,
            }
        }
        fn exact<T: PartialEq>(earlier: &Option<T>, later: &Option<T>) -> bool {
            earlier.is_none() || earlier == later
        }
        if self.any.is_some() || self.not.is_some() {
            return false;
        }
        list(&self.category, &later.category)
            && list(&self.complexity, &later.complexity)
            && list(&self.sentiment, &later.sentiment)
            && list(&self.language, &later.language)
            && list(&self.risk, &later.risk)
            && list(&self.flags, &later.flags)
            && list(&self.customer_tier, &later.customer_tier)
            && list(&self.channel, &later.channel)
            && exact(&self.has_code, &later.has_code)
            && exact(&self.api_question, &later.api_question)
            && match (self.min_customer_turns, later.min_customer_turns) {
                (None, _) => true,
                (Some(e), Some(l)) => l >= e,
                (Some(_), None) => false,
            }
            && match (&self.metadata, &later.metadata) {
                (None, _) => true,
                (Some(e), Some(l)) => {
                    e.iter().all(|(k, vs)| l.get(k).is_some_and(|lv| lv.iter().all(|v| vs.contains(v))))
                }
                (Some(_), None) => false,
            }
            && self.all.as_ref().is_none_or(|subs| subs.iter().all(|sub| sub.covers(later)))
    }
}

/// One rule as evaluated for a ticket, for `ticketflow explain`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleCheck {
    pub name: String,
    pub target: String,
    pub matched: bool,
}

/// Evaluates every rule (not only up to the first match) and routes as [`route`] does.
pub fn trace(rules: &[Rule], facts: &Facts<'_>) -> (Vec<RuleCheck>, Decision) {
    let checks: Vec<RuleCheck> = rules
        .iter()
        .map(|r| RuleCheck { name: r.name.clone(), target: r.target.clone(), matched: r.when.matches(facts) })
        .collect();
    let decision = match checks.iter().find(|c| c.matched) {
        Some(first) => matched(&first.name, &first.target),
        None => no_match(),
    };
    (checks, decision)
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
    match rules.iter().find(|r| r.when.matches(facts)) {
        Some(rule) => matched(&rule.name, &rule.target),
        None => no_match(),
    }
}

fn matched(name: &str, target: &str) -> Decision {
    Decision { target: target.to_owned(), reasons: vec![name.to_owned()] }
}

fn no_match() -> Decision {
    Decision { target: HUMAN.into(), reasons: vec!["no_rule_matched".into()] }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    fn rules(toml_rules: &str) -> Vec<String> {
        let mut s = crate::policy::load_from(None, &BTreeMap::new()).unwrap();
        #[derive(Deserialize)]
        struct R {
            rules: Vec<Rule>,
        }
        s.routing.rules = toml::from_str::<R>(toml_rules).unwrap().rules;
        validate_rules(&s.routing.rules, &s)
    }

    #[test]
    fn the_default_policy_has_no_shadowed_rule() {
        let s = crate::policy::load_from(None, &BTreeMap::new()).unwrap();
        assert!(validate_rules(&s.routing.rules, &s).is_empty());
    }

    #[test]
    fn shadowed_rules_are_reported() {
        let problems = rules(
            r#"
            [[rules]]
            name = "all-refunds"
            target = "premium"
            when = { category = ["refund_dispute", "billing"] }
            [[rules]]
            name = "angry-refunds"
            target = "empathy"
            when = { category = ["refund_dispute"], sentiment = ["angry"] }
            [[rules]]
            name = "catch-all"
            target = "cheap"
            [[rules]]
            name = "after-catch-all"
            target = "premium"
            when = { language = ["th"] }
            "#,
        );
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("angry-refunds") && problems[0].contains("`all-refunds`"));
        assert!(problems[1].contains("after-catch-all") && problems[1].contains("`catch-all`"));
    }

    #[test]
    fn narrower_earlier_rules_do_not_shadow() {
        let problems = rules(
            r#"
            [[rules]]
            name = "angry-refunds"
            target = "empathy"
            when = { category = ["refund_dispute"], sentiment = ["angry"] }
            [[rules]]
            name = "long-threads"
            target = "premium"
            when = { min_customer_turns = 3 }
            [[rules]]
            name = "longer-threads"
            target = "premium"
            when = { min_customer_turns = 2 }
            [[rules]]
            name = "refunds"
            target = "premium"
            when = { any = [{ category = ["refund_dispute"] }] }
            [[rules]]
            name = "rest"
            target = "cheap"
            "#,
        );
        assert!(problems.is_empty(), "{problems:?}");
    }

    #[test]
    fn unknown_values_and_targets_are_named() {
        let problems = rules(
            r#"
            [[rules]]
            name = "x"
            target = "platinum-tier"
            when = { category = ["lasers"], sentiment = ["furious"] }
            "#,
        );
        let all = problems.join("\n");
        assert!(all.contains("platinum-tier") && all.contains("lasers") && all.contains("furious"), "{all}");
    }
}
