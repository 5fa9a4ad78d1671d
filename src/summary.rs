//! The end-of-run summary of `ticketflow process`: outcomes, tiers, providers,
//! spend against the all-premium baseline (one premium reply call per answered
//! unit, no triage, no moderation), and latency percentiles. Constant memory
//! whatever the number of tickets (counters and one histogram).

use std::collections::BTreeMap;

use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use hdrhistogram::Histogram;

use crate::observe::{Completion, Observer, Published};
use crate::ticket::ReplyStatus;

/// Running totals of a run.
#[derive(Debug)]
pub struct Summary {
    pub outcomes: BTreeMap<String, u64>,
    pub tiers: BTreeMap<String, u64>,
    pub providers: BTreeMap<String, u64>,
    pub provider_calls: u64,
    pub cost_usd: f64,
    pub baseline_cost_usd: f64,
    pub duplicates: u64,
    /// Answered after a refusal, through the moderation bypass.
    pub bypassed: u64,
    latency_ms: Histogram<u64>,
}

impl Default for Summary {
    fn default() -> Self {
        Summary {
            outcomes: BTreeMap::new(),
            tiers: BTreeMap::new(),
            providers: BTreeMap::new(),
            provider_calls: 0,
            cost_usd: 0.0,
            baseline_cost_usd: 0.0,
            duplicates: 0,
            bypassed: 0,
            // 1 ms to 1 hour at 3 significant digits; the bounds are constants, so this cannot fail.
            latency_ms: Histogram::new_with_bounds(1, 3_600_000, 3).expect("valid histogram bounds"),
        }
    }
}

impl Summary {
    /// Adds one settled unit of work.
    pub fn add(&mut self, c: &Completion) {
        let Some(published) = c.published else {
            self.duplicates += 1;
            return;
        };
        self.provider_calls += u64::from(c.provider_calls);
        self.cost_usd += c.cost_usd;
        self.baseline_cost_usd += c.baseline_cost_usd;
        match published {
            Published::Reply(ReplyStatus::Answered) => {
                *self.outcomes.entry("answered".into()).or_default() += 1;
                // Tiers and providers count answered units only: `human` is not a tier.
                if let Some(tier) = &c.tier {
                    *self.tiers.entry(tier.clone()).or_default() += 1;
                }
                if let Some(p) = &c.provider {
                    *self.providers.entry(p.clone()).or_default() += 1;
                }
                if c.bypassed {
                    self.bypassed += 1;
                }
                self.latency_ms.saturating_record(c.latency_ms.unwrap_or(0).max(1));
            }
            Published::Reply(ReplyStatus::NeedsHuman) => {
                *self.outcomes.entry("needs_human".into()).or_default() += 1;
                self.latency_ms.saturating_record(c.latency_ms.unwrap_or(0).max(1));
            }
            Published::DeadLetter(kind) => {
                *self.outcomes.entry(format!("dead_letter:{}", kind.as_str())).or_default() += 1;
            }
        }
    }

    /// Replies plus dead letters.
    pub fn total(&self) -> u64 {
        self.outcomes.values().sum()
    }

    /// Every input: replies, dead letters and duplicates.
    pub fn tickets(&self) -> u64 {
        self.total() + self.duplicates
    }

    /// Units answered by a model.
    pub fn answered(&self) -> u64 {
        self.outcomes.get("answered").copied().unwrap_or(0)
    }

    /// What an answered ticket cost on average, every call included.
    pub fn cost_per_answered(&self) -> f64 {
        self.cost_usd / self.answered().max(1) as f64
    }

    pub fn latency_percentile(&self, q: f64) -> u64 {
        if self.latency_ms.is_empty() {
            0
        } else {
            self.latency_ms.value_at_quantile(q)
        }
    }

    /// Human-readable tables.
    pub fn render(&self, elapsed_secs: f64) -> String {
        let right = |v: String| Cell::new(v).set_alignment(CellAlignment::Right);
        let mut out = String::new();
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["outcome", "tickets"]);
        let mut rows: Vec<(String, u64)> = Vec::new();
        rows.push(("answered".into(), self.answered()));
        if self.bypassed > 0 {
            rows.push(("  of which through moderation bypass".into(), self.bypassed));
        }
        rows.extend(self.outcomes.iter().filter(|(k, _)| *k != "answered").map(|(k, v)| (k.clone(), *v)));
        if self.duplicates > 0 {
            rows.push(("duplicate (already answered)".into(), self.duplicates));
        }
        for (k, v) in rows {
            table.add_row(vec![Cell::new(k), right(v.to_string())]);
        }
        out.push_str(&table.to_string());
        out.push('\n');
        for (title, map) in [("tier", &self.tiers), ("provider", &self.providers)] {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![title, "answered", "share"]);
            for (k, v) in map {
                let share = *v as f64 / self.answered().max(1) as f64 * 100.0;
                t.add_row(vec![Cell::new(k), right(v.to_string()), right(format!("{share:.1}%"))]);
            }
            out.push_str(&t.to_string());
            out.push('\n');
        }
        let savings = self.baseline_cost_usd - self.cost_usd;
        let pct = if self.baseline_cost_usd > 0.0 { savings / self.baseline_cost_usd * 100.0 } else { 0.0 };
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["figure", "value"]);
        let rows = [
            ("tickets", self.tickets().to_string()),
            ("provider calls", self.provider_calls.to_string()),
            ("total cost", format!("${:.6}", self.cost_usd)),
            ("cost per answered ticket", format!("${:.6}", self.cost_per_answered())),
            (BASELINE_LABEL, format!("${:.6}", self.baseline_cost_usd)),
            ("savings", format!("${savings:.6} ({pct:.1}%)")),
            ("latency p50", format!("{} ms", self.latency_percentile(0.50))),
            ("latency p95", format!("{} ms", self.latency_percentile(0.95))),
            ("elapsed", format!("{elapsed_secs:.2} s")),
            ("throughput", format!("{:.0} tickets/s", self.tickets() as f64 / elapsed_secs.max(1e-9))),
        ];
        for (k, v) in rows {
            t.add_row(vec![Cell::new(k), right(v)]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
        out.push_str(BASELINE_NOTE);
        out.push('\n');
        out
    }
}

/// How the summary and the report name the baseline, and the note under their
/// figures that says what it is.
pub const BASELINE_LABEL: &str = "all-premium baseline";
pub const BASELINE_NOTE: &str = "all-premium baseline: what the answered tickets would have cost before, one \
reply each on pricing.baseline_model (no triage, no moderation), priced from the tokens of the reply call that \
answered them";

/// A [`Summary`] fed by the dispatcher's completions.
#[derive(Debug, Default)]
pub struct SummaryObserver(std::sync::Mutex<Summary>);

impl SummaryObserver {
    /// The totals so far.
    pub fn take(&self) -> Summary {
        self.0.lock().map(|mut s| std::mem::take(&mut *s)).unwrap_or_default()
    }
}

impl Observer for SummaryObserver {
    fn completed(&self, completion: &Completion) {
        if let Ok(mut s) = self.0.lock() {
            s.add(completion);
        }
    }
}
