//! Prices per model and the cost of a call (SPEC §3.3).

use std::collections::HashMap;

use super::Usage;
use crate::settings::{ModelSettings, Settings};

/// USD prices of one model, per million tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Price {
    pub input: f64,
    pub cached_input: f64,
    pub output: f64,
}

impl From<&ModelSettings> for Price {
    fn from(m: &ModelSettings) -> Self {
        Price { input: m.input_usd_per_mtok, cached_input: m.cached_input_usd_per_mtok, output: m.output_usd_per_mtok }
    }
}

impl Price {
    /// Cost of `usage`: uncached input at the input price, cached input at the cached
    /// price, output at the output price; rounded to [`crate::ticket::USD_DECIMALS`],
    /// so that what is recorded is what is published.
    pub fn cost(&self, usage: &Usage) -> f64 {
        let cached = usage.cached_input_tokens.min(usage.input_tokens);
        let uncached = usage.input_tokens - cached;
        crate::ticket::round_usd(
            (uncached as f64 * self.input
                + cached as f64 * self.cached_input
                + usage.output_tokens as f64 * self.output)
                / 1_000_000.0,
        )
    }
}

/// The price of an unknown model.
const FREE: Price = Price { input: 0.0, cached_input: 0.0, output: 0.0 };

/// The price table, keyed by `provider/model`.
#[derive(Debug, Clone)]
pub struct PriceTable {
    prices: HashMap<String, Price>,
    baseline: Price,
    pub version: String,
}

impl PriceTable {
    pub fn from_settings(s: &Settings) -> Self {
        let mut prices = HashMap::new();
        for (provider, p) in &s.providers {
            for (model, m) in &p.models {
                prices.insert(format!("{provider}/{model}"), Price::from(m));
            }
        }
        let baseline = prices.get(&s.pricing.baseline_model).copied().unwrap_or(FREE);
        PriceTable { prices, baseline, version: s.pricing.pricing_version.clone() }
    }

    /// Price of `provider` and `model`; zero for an unknown model (validation rejects those).
    pub fn price(&self, provider: &str, model: &str) -> Price {
        self.get(&format!("{provider}/{model}"))
    }

    /// Price of a `provider/model` entry as written in a chain; zero for an unknown model.
    pub fn get(&self, entry: &str) -> Price {
        self.prices.get(entry).copied().unwrap_or(FREE)
    }

    /// Prices the baseline of the answering call among the cost records of `output`
    /// (records read back from a stored output carry none).
    pub fn fill_baselines(&self, output: &mut crate::ticket::Output) {
        let costs = match output {
            crate::ticket::Output::Reply { costs, .. } | crate::ticket::Output::DeadLetter { costs, .. } => costs,
        };
        costs.iter_mut().for_each(|c| self.fill_baseline(c));
    }

    /// Prices the baseline of `record` if it answered its unit (a record read back
    /// from the ledger carries none).
    pub fn fill_baseline(&self, record: &mut crate::ticket::CostRecord) {
        if record.is_answer() {
            record.baseline_cost_usd = self.baseline_cost(&Usage {
                input_tokens: record.input_tokens,
                cached_input_tokens: record.cached_input_tokens,
                output_tokens: record.output_tokens,
            });
        }
    }

    /// What the same tokens would cost on the baseline premium model. Cache hits are
    /// priced as cached there too, so savings come from routing, not from caching.
    /// Only a unit's answering reply call has a baseline ([`crate::ticket::CostRecord::is_answer`]).
    pub fn baseline_cost(&self, usage: &Usage) -> f64 {
        self.baseline.cost(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cost_splits_cached_input() {
        let p = Price { input: 2.5, cached_input: 1.25, output: 10.0 };
        let u = Usage { input_tokens: 1000, cached_input_tokens: 400, output_tokens: 100 };
        let expected = (600.0 * 2.5 + 400.0 * 1.25 + 100.0 * 10.0) / 1e6;
        assert!((p.cost(&u) - expected).abs() < 1e-15);
    }

    #[test]
    fn cached_tokens_above_input_are_capped() {
        let p = Price { input: 1.0, cached_input: 0.5, output: 0.0 };
        let u = Usage { input_tokens: 10, cached_input_tokens: 50, output_tokens: 0 };
        assert!((p.cost(&u) - 5.0 / 1e6).abs() < 1e-15);
    }
}
