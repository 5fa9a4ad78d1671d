//! The `dashscope` kind: Alibaba's Qwen models (qwen-turbo-latest, qwen-plus, qwen-max,
//! qwen2.5-72b-instruct) through DashScope's OpenAI-compatible mode. Requests and
//! successful responses are OpenAI's; errors are DashScope's own. Its content filter
//! ("data inspection") answers HTTP 400 with `data_inspection_failed`: that is a
//! refusal to route around, not a bad request, and it comes without usage.

use async_trait::async_trait;
use reqwest::header::HeaderMap;

use super::openai::{self, OpenAi};
use super::{http, ChatRequest, Outcome, Provider};
use crate::settings::ProviderSettings;

/// Error codes of DashScope's content filter.
const INSPECTION_CODES: &[&str] = &["data_inspection_failed", "DataInspectionFailed"];
/// Error codes of DashScope's throttling.
const THROTTLING_CODES: &[&str] = &[
    "limit_requests",
    "limit_tokens",
    "Throttling",
    "Throttling.RateQuota",
    "Throttling.AllocationQuota",
    "Throttling.User",
];
/// Error codes that no retry can fix: an overdue account, a revoked key.
const ACCOUNT_CODES: &[&str] = &["Arrearage", "InvalidApiKey", "invalid_api_key", "AccessDenied"];

/// A DashScope (Qwen) provider.
pub struct DashScope {
    inner: OpenAi,
}

impl DashScope {
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, super::BuildError> {
        Ok(DashScope { inner: OpenAi::new(name, settings)? })
    }
}

#[async_trait]
impl Provider for DashScope {
    async fn complete(&self, request: &ChatRequest) -> Outcome {
        let outcome = match self.inner.exchange(request).await {
            Ok(r) => classify(r.status, &r.headers, &r.body),
            Err(outcome) => outcome,
        };
        openai::prefix(self.inner.name(), outcome)
    }
}

/// Classifies a DashScope compatible-mode response.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8]) -> Outcome {
    if (200..300).contains(&status) {
        return openai::classify(status, headers, body);
    }
    let Some(error) = openai::error_of(body) else {
        return openai::classify_error(status, headers, body, None);
    };
    let code = error.code_str().or(error.kind.as_deref()).unwrap_or("");
    if INSPECTION_CODES.contains(&code) || error.kind.as_deref().is_some_and(|k| INSPECTION_CODES.contains(&k)) {
        Outcome::Refused { usage: None, detail: error.describe(status) }
    } else if THROTTLING_CODES.contains(&code) {
        Outcome::RateLimited { retry_after: http::retry_after(headers), detail: error.describe(status) }
    } else if ACCOUNT_CODES.contains(&code) {
        Outcome::Permanent { detail: error.describe(status) }
    } else {
        openai::classify_error(status, headers, body, Some(error))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_inspection_is_a_refusal_in_both_spellings() {
        let snake = br#"{"error":{"code":"data_inspection_failed","message":"Input data may contain inappropriate content.","param":null,"type":"data_inspection_failed"},"id":"chatcmpl-1","request_id":"r1"}"#;
        let camel = br#"{"error":{"code":"DataInspectionFailed","message":"Output data may contain inappropriate content.","type":"DataInspectionFailed"}}"#;
        for body in [&snake[..], camel] {
            assert!(matches!(classify(400, &HeaderMap::new(), body), Outcome::Refused { usage: None, .. }));
        }
    }

    #[test]
    fn other_400s_stay_bad_requests_and_throttling_is_rate_limited() {
        let bad = br#"{"error":{"code":"invalid_parameter_error","message":"max_tokens must be less than 8192","type":"invalid_request_error"}}"#;
        assert!(matches!(classify(400, &HeaderMap::new(), bad), Outcome::Permanent { .. }));
        let throttled = br#"{"error":{"code":"limit_requests","message":"You exceeded your current requests list.","type":"limit_requests"}}"#;
        assert!(matches!(classify(429, &HeaderMap::new(), throttled), Outcome::RateLimited { .. }));
        let overdue = br#"{"error":{"code":"Arrearage","message":"Access denied, please make sure your account is in good standing.","type":"Arrearage"}}"#;
        assert!(matches!(classify(400, &HeaderMap::new(), overdue), Outcome::Permanent { .. }));
        assert!(matches!(classify(503, &HeaderMap::new(), b"upstream connect error"), Outcome::Transient { .. }));
    }
}
