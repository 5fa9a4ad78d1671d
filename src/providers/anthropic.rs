//! The `anthropic` kind: Claude's Messages API (`POST /v1/messages`).
//!
//! Usage: Anthropic's `input_tokens` excludes prompt-cache reads and writes, so the
//! input we record is their sum, with cache reads as the cached share. Errors:
//! 429 `rate_limit_error` with `retry-after` is rate limiting, except a spend-limit
//! 429 (`enforced_spend_limit_reached`), which is permanent; 529 `overloaded_error`
//! is transient; `stop_reason: "refusal"` is a refusal.

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use super::http::{self, ApiKey};
use super::openai::prefix;
use super::{ChatRequest, Outcome, Provider, Usage};
use crate::settings::ProviderSettings;

const API_VERSION: &str = "2023-06-01";

/// A Claude provider.
pub struct Anthropic {
    name: String,
    client: reqwest::Client,
    url: reqwest::Url,
    key: reqwest::header::HeaderValue,
}

impl Anthropic {
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, super::BuildError> {
        Ok(Anthropic {
            name: name.to_owned(),
            client: http::client(settings)?,
            url: http::endpoint(&settings.base_url, "messages")?,
            key: ApiKey::from_env(name, settings)?.header("")?,
        })
    }
}

#[async_trait]
impl Provider for Anthropic {
    async fn complete(&self, request: &ChatRequest) -> Outcome {
        let builder = self
            .client
            .post(self.url.clone())
            .header("x-api-key", self.key.clone())
            .header("anthropic-version", API_VERSION)
            .json(&WireRequest::from(request));
        let outcome = match http::send(builder).await {
            Ok(r) => classify(r.status, &r.headers, &r.body),
            Err(outcome) => outcome,
        };
        prefix(&self.name, outcome)
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    system: &'a str,
    messages: [WireMessage<'a>; 1],
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

impl<'a> From<&'a ChatRequest> for WireRequest<'a> {
    fn from(r: &'a ChatRequest) -> Self {
        // The Messages API has no JSON mode; the triage prompt asks for JSON and the
        // triage parser is lenient about what surrounds it.
        WireRequest {
            model: &r.model,
            max_tokens: r.max_output_tokens,
            system: &r.system,
            messages: [WireMessage { role: "user", content: &r.user }],
        }
    }
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    content: Vec<WireBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireBlock {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        let read = u.cache_read_input_tokens.unwrap_or(0);
        let written = u.cache_creation_input_tokens.unwrap_or(0);
        Usage {
            input_tokens: u.input_tokens + read + written,
            cached_input_tokens: read,
            output_tokens: u.output_tokens,
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    error: WireError,
}

#[derive(Deserialize)]
struct WireError {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Option<ErrorDetails>,
}

#[derive(Deserialize)]
struct ErrorDetails {
    #[serde(default)]
    error_code: Option<String>,
}

/// Classifies a Messages API response.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8]) -> Outcome {
    if (200..300).contains(&status) {
        return classify_success(body);
    }
    let Ok(ErrorBody { error }) = serde_json::from_slice::<ErrorBody>(body) else {
        return http::by_status(status, headers, format!("HTTP {status}: {}", http::excerpt(body)));
    };
    let detail = format!("HTTP {status} {}: {}", error.kind, error.message);
    let spend_limit =
        error.details.as_ref().and_then(|d| d.error_code.as_deref()) == Some("enforced_spend_limit_reached");
    match (status, error.kind.as_str()) {
        (429, _) if spend_limit => Outcome::Permanent { detail },
        (_, "rate_limit_error") => Outcome::RateLimited { retry_after: http::retry_after(headers), detail },
        (_, "overloaded_error") | (_, "api_error") => http::transient(detail),
        (
            _,
            "invalid_request_error"
            | "authentication_error"
            | "permission_error"
            | "not_found_error"
            | "request_too_large"
            | "billing_error",
        ) => Outcome::Permanent { detail },
        _ => http::by_status(status, headers, detail),
    }
}

fn classify_success(body: &[u8]) -> Outcome {
    let parsed: WireResponse = match http::parse_success(body) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    let usage = parsed.usage.map(Usage::from);
    if parsed.stop_reason.as_deref() == Some("refusal") {
        return Outcome::Refused { usage, detail: "stop_reason refusal".into() };
    }
    let text: String = parsed.content.iter().filter(|b| b.kind == "text").filter_map(|b| b.text.as_deref()).collect();
    if text.trim().is_empty() {
        return http::transient(format!(
            "empty completion (stop_reason {})",
            parsed.stop_reason.as_deref().unwrap_or("none")
        ));
    }
    Outcome::Ok { text, usage }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use std::time::Duration;

    #[test]
    fn request_shape() {
        let r = ChatRequest {
            model: "claude-sonnet-4-5".into(),
            stage: crate::ticket::Stage::Reply,
            system: "sys".into(),
            user: "u".into(),
            json_mode: true,
            max_output_tokens: 800,
        };
        let v = serde_json::to_value(WireRequest::from(&r)).unwrap();
        assert_eq!(v["system"], "sys");
        assert_eq!(v["max_tokens"], 800);
        assert_eq!(v["messages"][0]["role"], "user");
        assert!(v.get("response_format").is_none());
    }

    #[test]
    fn success_with_cache_usage() {
        let body = br#"{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Hello"},{"type":"text","text":" there"}],"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":100,"output_tokens":20,"cache_creation_input_tokens":50,"cache_read_input_tokens":400}}"#;
        match classify(200, &HeaderMap::new(), body) {
            Outcome::Ok { text, usage } => {
                assert_eq!(text, "Hello there");
                assert_eq!(usage, Some(Usage { input_tokens: 550, cached_input_tokens: 400, output_tokens: 20 }));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusal_is_billed_with_usage() {
        let body = br#"{"content":[],"stop_reason":"refusal","usage":{"input_tokens":100,"output_tokens":3}}"#;
        assert!(matches!(classify(200, &HeaderMap::new(), body), Outcome::Refused { usage: Some(_), .. }));
    }

    #[test]
    fn rate_limit_overload_and_spend_limit() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("17"));
        let limited = br#"{"type":"error","error":{"type":"rate_limit_error","message":"Number of request tokens has exceeded your per-minute rate limit"}}"#;
        assert_eq!(
            classify(429, &h, limited),
            Outcome::RateLimited {
                retry_after: Some(Duration::from_secs(17)),
                detail: "HTTP 429 rate_limit_error: Number of request tokens has exceeded your per-minute rate limit"
                    .into()
            }
        );
        let spend = br#"{"type":"error","error":{"type":"rate_limit_error","message":"You have reached your specified workspace API usage limits.","details":{"error_code":"enforced_spend_limit_reached"}}}"#;
        assert!(matches!(classify(429, &h, spend), Outcome::Permanent { .. }));
        let overloaded = br#"{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}"#;
        assert!(matches!(classify(529, &HeaderMap::new(), overloaded), Outcome::Transient { .. }));
        let auth = br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key"}}"#;
        assert!(matches!(classify(401, &HeaderMap::new(), auth), Outcome::Permanent { .. }));
        assert!(matches!(classify(502, &HeaderMap::new(), b"<html>502</html>"), Outcome::Transient { .. }));
        assert!(matches!(classify(200, &HeaderMap::new(), b"{\"content\":[{\"type\":\"te"), Outcome::Transient { .. }));
    }
}
