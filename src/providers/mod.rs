//! LLM providers: one trait, one file per kind, and the outcome classification of
//! SPEC §4 that drives retries, failover and moderation bypass.
//!
//! - [`openai`], [`dashscope`], [`anthropic`]: the real adapters over reqwest, with
//!   [`http`] for what they share.
//! - [`simulated`]: built-in offline provider for the embedded default and tests.
//! - [`limits`]: per-provider request and token rate limits (governor).
//! - [`breaker`]: per-provider circuit breakers.
//! - [`pricing`]: cost of a call from its token usage.
//! - [`chain`]: a model chain with retries, backoff and failover.
//! - [`admission`]: how many tickets the rate limits can serve in flight.

pub mod account;
pub mod admission;
pub mod anthropic;
pub mod breaker;
pub mod chain;
pub mod dashscope;
pub mod http;
pub mod limits;
pub mod openai;
pub mod pricing;
pub mod simulated;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::settings::{ProviderKind, ProviderSettings, Settings};
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

impl Usage {
    /// Usage estimated with [`estimate_tokens`] when no provider counted it: the
    /// request's system and user text as input (none of it cached), `output` as output.
    pub fn estimate(request: &ChatRequest, output: &str) -> Usage {
        Usage {
            input_tokens: estimate_tokens(&request.system) + estimate_tokens(&request.user),
            cached_input_tokens: 0,
            output_tokens: estimate_tokens(output),
        }
    }
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

/// A provider with its rate limits and circuit breaker.
pub struct ProviderHandle {
    pub adapter: Arc<dyn Provider>,
    /// `None` for the simulated kind, which has no account to protect.
    pub limits: Option<Arc<limits::ProviderLimits>>,
    pub breaker: breaker::Breaker,
}

/// All configured providers by name.
#[derive(Clone)]
pub struct Providers {
    by_name: BTreeMap<String, Arc<ProviderHandle>>,
}

/// A provider that cannot be built from its settings.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("provider `{name}`: the API key variable {env} is not set (or empty)")]
    MissingKey { name: String, env: String },
    #[error("{}", .0.join("; "))]
    MissingKeys(Vec<String>),
    #[error("HTTP client: {0}")]
    Client(String),
}

impl Providers {
    /// Builds every configured provider.
    pub fn from_settings(settings: &Settings, analyzer: Arc<Analyzer>) -> Result<Self, BuildError> {
        let missing = missing_keys(settings);
        if !missing.is_empty() {
            return Err(BuildError::MissingKeys(missing));
        }
        let mut by_name = BTreeMap::new();
        for (name, p) in &settings.providers {
            let adapter: Arc<dyn Provider> = match p.kind {
                ProviderKind::Simulated => Arc::new(simulated::Simulated::new(name, p, analyzer.clone())),
                ProviderKind::Openai => Arc::new(openai::OpenAi::new(name, p)?),
                ProviderKind::Dashscope => Arc::new(dashscope::DashScope::new(name, p)?),
                ProviderKind::Anthropic => Arc::new(anthropic::Anthropic::new(name, p)?),
            };
            let limits = (p.kind != ProviderKind::Simulated).then(|| limits_for(name, p, settings));
            by_name.insert(name.clone(), Arc::new(Self::handle(name, adapter, limits, settings)));
        }
        Ok(Providers { by_name })
    }

    /// Builds from explicit adapters (tests and embedding); `limited` names the ones
    /// whose configured rate limits apply.
    pub fn from_adapters(adapters: BTreeMap<String, Arc<dyn Provider>>, settings: &Settings, limited: &[&str]) -> Self {
        let by_name = adapters
            .into_iter()
            .map(|(name, adapter)| {
                let limits = settings
                    .providers
                    .get(&name)
                    .filter(|_| limited.contains(&name.as_str()))
                    .map(|p| limits_for(&name, p, settings));
                let handle = Self::handle(&name, adapter, limits, settings);
                (name, Arc::new(handle))
            })
            .collect();
        Providers { by_name }
    }

    fn handle(
        name: &str,
        adapter: Arc<dyn Provider>,
        limits: Option<Arc<limits::ProviderLimits>>,
        s: &Settings,
    ) -> ProviderHandle {
        let breaker =
            breaker::Breaker::new(name, s.breaker.failure_threshold, Duration::from_millis(s.breaker.cooldown_ms));
        ProviderHandle { adapter, limits, breaker }
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ProviderHandle>> {
        self.by_name.get(name)
    }
}

/// Every provider of a real kind whose API key variable is unset or empty, one
/// line each, so that all of them are named at once.
pub fn missing_keys(settings: &Settings) -> Vec<String> {
    settings
        .providers
        .iter()
        .filter(|(_, p)| p.kind != ProviderKind::Simulated)
        .filter(|(_, p)| std::env::var(p.api_key_env.trim()).map_or(true, |k| k.trim().is_empty()))
        .map(|(name, p)| {
            BuildError::MissingKey { name: name.clone(), env: p.api_key_env.trim().to_owned() }.to_string()
        })
        .collect()
}

fn limits_for(name: &str, p: &ProviderSettings, s: &Settings) -> Arc<limits::ProviderLimits> {
    Arc::new(limits::ProviderLimits::new(
        name,
        p.requests_per_minute,
        p.tokens_per_minute,
        s.limits.rate_limit_headroom,
    ))
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
