//! Daily spend caps per tier. When a tier's cap for the current UTC day is spent,
//! tickets routed to it degrade to the configured fallback (the cheap tier or a
//! human) and the route's reasons say so.
//!
//! Spend is what this worker process has recorded today. With several replicas each
//! enforces the cap on its own spend: the figure is not yet shared through the ledger.

use std::collections::BTreeMap;
use std::sync::Mutex;

use chrono::{NaiveDate, Utc};

pub use crate::settings::BudgetSettings;

/// Today's spend per tier, checked before a reply is routed.
#[derive(Debug)]
pub struct Budgets {
    caps: BTreeMap<String, BudgetSettings>,
    spent: Mutex<(NaiveDate, BTreeMap<String, f64>)>,
}

/// A routing decision changed by a spent budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Degraded {
    pub target: String,
    pub reason: String,
}

impl Budgets {
    pub fn new(caps: BTreeMap<String, BudgetSettings>) -> Self {
        for tier in caps.keys() {
            crate::telemetry::budget_spent(tier, 0.0);
        }
        Budgets { caps, spent: Mutex::new((Utc::now().date_naive(), BTreeMap::new())) }
    }

    /// If `tier`'s cap is spent today, where the ticket goes instead.
    pub fn check(&self, tier: &str) -> Option<Degraded> {
        let cap = self.caps.get(tier)?;
        let spent = self.spent_today(tier);
        (spent >= cap.daily_usd).then(|| Degraded {
            target: cap.when_spent.clone(),
            reason: format!("budget:{tier}_spent->{}", cap.when_spent),
        })
    }

    /// Adds what a ticket routed to `tier` cost.
    pub fn record(&self, tier: &str, usd: f64) {
        if !self.caps.contains_key(tier) || usd.is_nan() || usd <= 0.0 {
            return;
        }
        if let Ok(mut guard) = self.spent.lock() {
            let today = Utc::now().date_naive();
            if guard.0 != today {
                *guard = (today, BTreeMap::new());
                for capped in self.caps.keys() {
                    crate::telemetry::budget_spent(capped, 0.0);
                }
            }
            let spent = guard.1.entry(tier.to_owned()).or_default();
            *spent += usd;
            crate::telemetry::budget_spent(tier, *spent);
        }
    }

    /// What `tier` has spent today.
    pub fn spent_today(&self, tier: &str) -> f64 {
        match self.spent.lock() {
            Ok(guard) if guard.0 == Utc::now().date_naive() => guard.1.get(tier).copied().unwrap_or(0.0),
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn degrades_once_the_cap_is_spent() {
        let caps =
            BTreeMap::from([("premium".to_string(), BudgetSettings { daily_usd: 1.0, when_spent: "cheap".into() })]);
        let b = Budgets::new(caps);
        assert_eq!(b.check("premium"), None);
        b.record("premium", 0.6);
        assert_eq!(b.check("premium"), None);
        b.record("premium", 0.4);
        let d = b.check("premium").unwrap();
        assert_eq!(d.target, "cheap");
        assert_eq!(d.reason, "budget:premium_spent->cheap");
        assert_eq!(b.check("cheap"), None, "tiers without a cap are never degraded");
        b.record("cheap", 100.0);
        assert_eq!(b.spent_today("cheap"), 0.0);
    }
}
