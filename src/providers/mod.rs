//! LLM providers: one trait, one file per kind, and the outcome classification of
//! SPEC §4 that drives retries, failover and moderation bypass.
//!
//! - [`simulated`]: built-in offline provider for the embedded default and tests.
//! - [`pricing`]: cost of a call from its token usage.
//! - [`chain`]: a model chain with retries, backoff and failover.

pub mod chain;
pub mod pricing;
pub mod simulated;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::settings::{ProviderKind, Settings};
use crate::ticket::Stage;
use crate::triage::Analyzer;

/// One chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// Model name as the provider knows it.
    pub model: String,
    pub stage: Stage,
    pub system: String,
    /// The user message: the ticket as delimited data.
    pub user: String,
    /// Ask for a JSON object (provider JSON mode where there is one).
    pub json_mode: bool,
    pub max_output_tokens: u32,
}

/// Token usage of a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// All input tokens, cached ones included.
    pub input_tokens: u64,
    /// The part of `input_tokens` served from the provider's prompt cache.
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
}

/// Every way a provider call can end (SPEC §4).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Ok {
        text: String,
        usage: Option<Usage>,
    },
    /// Content filter. `usage` is `None` when the refusal came as an error (DashScope 400).
    Refused {
        usage: Option<Usage>,
        detail: String,
    },
    RateLimited {
        retry_after: Option<Duration>,
        detail: String,
    },
    /// Timeouts, 5xx, overload, connection errors. `reached` is false when the request
    /// never got to the provider (connection refused), so nothing is billed or recorded.
    Transient {
        detail: String,
        timeout: bool,
        reached: bool,
    },
    /// Bad request, auth, not found, spend limit: retrying cannot help.
    Permanent {
        detail: String,
    },
}

/// A provider adapter.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Sends one request and classifies what came back. Never panics, never errors:
    /// every failure is an [`Outcome`].
    async fn complete(&self, request: &ChatRequest) -> Outcome;
}

/// All configured providers by name.
#[derive(Clone)]
pub struct Providers {
    by_name: BTreeMap<String, Arc<dyn Provider>>,
}

/// A provider that cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("provider `{name}`: kind `{kind}` is not available in this build yet; use `simulated` or see the README's provider section")]
    KindUnavailable { name: String, kind: &'static str },
}

impl Providers {
    /// Builds every configured provider.
    pub fn from_settings(settings: &Settings, analyzer: Arc<Analyzer>) -> Result<Self, BuildError> {
        let mut by_name: BTreeMap<String, Arc<dyn Provider>> = BTreeMap::new();
        for (name, p) in &settings.providers {
            let provider: Arc<dyn Provider> = match p.kind {
                ProviderKind::Simulated => Arc::new(simulated::Simulated::new(name, p, analyzer.clone())),
                kind => return Err(BuildError::KindUnavailable { name: name.clone(), kind: kind.as_str() }),
            };
            by_name.insert(name.clone(), provider);
        }
        Ok(Providers { by_name })
    }

    /// Builds from explicit adapters (tests and embedding).
    pub fn from_map(by_name: BTreeMap<String, Arc<dyn Provider>>) -> Self {
        Providers { by_name }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Provider>> {
        self.by_name.get(name)
    }
}

/// Rough token count for text without a tokenizer: about four Latin characters per
/// token, about one token per CJK or Thai character. Used only where a provider gives
/// no usage, and then flagged `estimated`.
pub fn estimate_tokens(text: &str) -> u64 {
    let (ascii, other) =
        text.chars().fold((0u64, 0u64), |(a, o), c| if c.is_ascii() { (a + 1, o) } else { (a, o + 1) });
    ascii.div_ceil(4) + other
}

#[cfg(test)]
mod tests {
    use super::estimate_tokens;

    #[test]
    fn token_estimate_is_plausible() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcd"), 1);
        assert_eq!(estimate_tokens("abcde"), 2);
        assert_eq!(estimate_tokens("我的订单"), 4);
    }
}
