//! The mock server's configuration: which providers it serves under which wire style,
//! and the latency, errors, rate limits, content filter and outages each one shows.
//!
//! A TOML file lists providers under `[providers.<name>]`; the name is the path
//! prefix (`/<name>/v1/...`). A file without a `providers` table serves the five
//! default providers; a file with one serves exactly the providers it lists.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Everything the mock server serves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockConfig {
    /// Providers by name; the name is the URL path prefix. Defaults to the five
    /// providers of [`MockConfig::default`] when the table is missing.
    #[serde(default = "default_providers")]
    pub providers: BTreeMap<String, MockProvider>,
    /// When set, paid calls (answers and refusals) are also counted per tag: the word
    /// that follows this prefix in a request's user text (e.g. `ref:` and a ticket
    /// reading `ref:T-17 ...`), by provider and stage. A test that tags its tickets
    /// checks the provider's own count of calls per ticket against the cost records
    /// (`GET /admin/calls`).
    #[serde(default)]
    pub tag_prefix: Option<String>,
}

/// Which provider API a mock provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    /// OpenAI Chat Completions: `POST /<name>/v1/chat/completions`, content-filter
    /// refusals as `finish_reason: "content_filter"`.
    Openai,
    /// DashScope's OpenAI-compatible mode: the same endpoint and success shape, but
    /// refusals as HTTP 400 `data_inspection_failed` and its own error codes.
    Dashscope,
    /// Anthropic Messages: `POST /<name>/v1/messages`, refusals as
    /// `stop_reason: "refusal"`, overload as HTTP 529.
    Anthropic,
}

/// One mock provider and the behaviour it simulates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MockProvider {
    /// Wire style: `openai`, `dashscope` or `anthropic`.
    pub style: Style,
    /// Mean added latency of an accepted request, in milliseconds.
    #[serde(default)]
    pub latency_ms: u64,
    /// The latency varies uniformly by up to this much either way, in milliseconds.
    #[serde(default)]
    pub jitter_ms: u64,
    /// Share of requests (0..=1) answered with a transient error (503, or 529 for
    /// the anthropic style).
    #[serde(default)]
    pub error_rate: f64,
    /// Share of requests (0..=1) answered 429 at random, with a one-second
    /// `retry-after`, whatever the load: a provider shedding load of its own.
    #[serde(default)]
    pub throttle_rate: f64,
    /// Accepted requests per sliding 60 seconds; above it the provider answers 429 in
    /// its style. 0 means unlimited.
    #[serde(default)]
    pub requests_per_minute: u32,
    /// Words that trip the content filter: a case-insensitive substring match on the
    /// system and user text.
    #[serde(default)]
    pub filter_words: Vec<String>,
    /// Words that hold a request (a case-insensitive substring match on the system
    /// and user text) until `POST /admin/release`: a ticket that takes as long as a
    /// test wants.
    #[serde(default)]
    pub hold_words: Vec<String>,
    /// Windows, in seconds since server start, in which every request gets the
    /// style's overload/unavailable error.
    #[serde(default)]
    pub outages: Vec<Outage>,
}

/// A scheduled outage, in seconds since the server started: `start_s <= t < end_s`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    /// Start of the outage, seconds since server start.
    pub start_s: f64,
    /// End of the outage (exclusive), seconds since server start.
    pub end_s: f64,
}

impl MockProvider {
    /// A provider of the given style with no latency, errors, limits, filter or outages.
    pub fn new(style: Style) -> Self {
        MockProvider {
            style,
            latency_ms: 0,
            jitter_ms: 0,
            error_rate: 0.0,
            throttle_rate: 0.0,
            requests_per_minute: 0,
            filter_words: Vec::new(),
            hold_words: Vec::new(),
            outages: Vec::new(),
        }
    }
}

impl Default for MockConfig {
    /// The five providers of ticketflow's default configuration: `qwen` (dashscope
    /// style, with the qwen filter words of `config/default.toml`), `openai`,
    /// `anthropic`, `mistral` and `deepseek`; no latency and no limits.
    fn default() -> Self {
        MockConfig { providers: default_providers(), tag_prefix: None }
    }
}

fn default_providers() -> BTreeMap<String, MockProvider> {
    let qwen_words =
        super::default_settings().providers.get("qwen").map(|p| p.filter_words.clone()).unwrap_or_default();
    BTreeMap::from([
        ("qwen".to_owned(), MockProvider { filter_words: qwen_words, ..MockProvider::new(Style::Dashscope) }),
        ("openai".to_owned(), MockProvider::new(Style::Openai)),
        ("anthropic".to_owned(), MockProvider::new(Style::Anthropic)),
        ("mistral".to_owned(), MockProvider::new(Style::Openai)),
        ("deepseek".to_owned(), MockProvider::new(Style::Openai)),
    ])
}

impl MockConfig {
    /// Reads and validates a TOML file. Missing fields take their defaults; unknown
    /// keys and invalid values are errors, all listed in the message.
    pub fn from_toml_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let config: MockConfig = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(format!("{}: invalid mock configuration:\n  - {}", path.display(), problems.join("\n  - ")))
        }
    }

    /// Every problem with the values, one line each; empty when the config is usable.
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.tag_prefix.as_deref().is_some_and(|t| t.trim().is_empty()) {
            problems.push("tag_prefix must not be empty".to_owned());
        }
        for (name, p) in &self.providers {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
                problems.push(format!(
                    "providers.{name}: a provider name is a path segment: letters, digits, '-', '_' or '.'"
                ));
            }
            if name == "admin" || name == "healthz" {
                problems.push(format!("providers.{name}: the name is reserved for the server's own endpoints"));
            }
            if !(0.0..=1.0).contains(&p.error_rate) {
                problems.push(format!("providers.{name}.error_rate must be between 0 and 1"));
            }
            if !(0.0..=1.0).contains(&p.throttle_rate) {
                problems.push(format!("providers.{name}.throttle_rate must be between 0 and 1"));
            }
            if p.filter_words.iter().any(|w| w.trim().is_empty()) {
                problems.push(format!("providers.{name}.filter_words: a word must not be empty"));
            }
            for (i, o) in p.outages.iter().enumerate() {
                if !o.start_s.is_finite() || !o.end_s.is_finite() || o.start_s < 0.0 || o.end_s < o.start_s {
                    problems.push(format!(
                        "providers.{name}.outages[{i}]: need finite 0 <= start_s <= end_s, got {}..{}",
                        o.start_s, o.end_s
                    ));
                }
            }
        }
        problems
    }
}
