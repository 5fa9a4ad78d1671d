//! The end-of-run summary of `ticketflow process`: outcomes, tiers, providers,
//! spend against the all-premium baseline, and latency percentiles. Constant memory
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
            Published::Reply(status) => {
                let outcome = match status {
                    ReplyStatus::Answered => "answered",
                    ReplyStatus::NeedsHuman => "needs_human",
                };
                *self.outcomes.entry(outcome.into()).or_default() += 1;
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
            Published::DeadLetter(kind) => {
                *self.outcomes.entry(format!("dead_letter:{}", kind.as_str())).or_default() += 1;
            }
        }
    }

    /// Replies plus dead letters.
    pub fn total(&self) -> u64 {
        self.outcomes.values().sum()
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
        let mut out = String::new();
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["outcome", "tickets"]);
        for (k, v) in &self.outcomes {
            table.add_row(vec![Cell::new(k), Cell::new(v).set_alignment(CellAlignment::Right)]);
        }
        if self.bypassed > 0 {
            table.add_row(vec![
                Cell::new("  answered through moderation bypass"),
                Cell::new(self.bypassed).set_alignment(CellAlignment::Right),
            ]);
        }
        if self.duplicates > 0 {
            table.add_row(vec![
                Cell::new("duplicate (already answered)"),
                Cell::new(self.duplicates).set_alignment(CellAlignment::Right),
            ]);
        }
        out.push_str(&table.to_string());
        out.push('\n');
        for (title, map) in [("tier", &self.tiers), ("provider", &self.providers)] {
            let mut t = Table::new();
            t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![title, "replies"]);
            for (k, v) in map {
                t.add_row(vec![Cell::new(k), Cell::new(v).set_alignment(CellAlignment::Right)]);
            }
            out.push_str(&t.to_string());
            out.push('\n');
        }
        let savings = self.baseline_cost_usd - self.cost_usd;
        let pct = if self.baseline_cost_usd > 0.0 { savings / self.baseline_cost_usd * 100.0 } else { 0.0 };
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["figure", "value"]);
        let rows = [
            ("tickets", self.total().to_string()),
            ("provider calls", self.provider_calls.to_string()),
            ("total cost", format!("${:.6}", self.cost_usd)),
            ("all-premium baseline", format!("${:.6}", self.baseline_cost_usd)),
            ("savings", format!("${savings:.6} ({pct:.1}%)")),
            ("latency p50", format!("{} ms", self.latency_percentile(0.50))),
            ("latency p95", format!("{} ms", self.latency_percentile(0.95))),
            ("elapsed", format!("{elapsed_secs:.2} s")),
            ("throughput", format!("{:.0} tickets/s", self.total() as f64 / elapsed_secs.max(1e-9))),
        ];
        for (k, v) in rows {
            t.add_row(vec![Cell::new(k), Cell::new(v).set_alignment(CellAlignment::Right)]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
        out
    }
}

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
