//! The `openai` kind: OpenAI's `/chat/completions` and every endpoint that speaks it
//! (DeepSeek, Mistral, OpenRouter, TokenMix, a LiteLLM proxy, vLLM or Ollama serving a
//! fine-tuned Qwen). DashScope's compatible mode reuses the request and response
//! handling here with its own error classification (see `dashscope.rs`).

use async_trait::async_trait;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use super::http::{self, ApiKey};
use super::{ChatRequest, Outcome, Provider, Usage};
use crate::settings::ProviderSettings;

/// An OpenAI-compatible provider.
pub struct OpenAi {
    name: String,
    client: reqwest::Client,
    url: reqwest::Url,
    authorization: reqwest::header::HeaderValue,
}

impl OpenAi {
    pub fn new(name: &str, settings: &ProviderSettings) -> Result<Self, super::BuildError> {
        Ok(OpenAi {
            name: name.to_owned(),
            client: http::client(settings)?,
            url: http::endpoint(&settings.base_url, "chat/completions")?,
            authorization: ApiKey::from_env(name, settings)?.header("Bearer ")?,
        })
    }

    /// Sends the request and returns what came back, for the caller to classify.
    pub(super) async fn exchange(&self, request: &ChatRequest) -> Result<http::Received, Outcome> {
        let builder = self
            .client
            .post(self.url.clone())
            .header(reqwest::header::AUTHORIZATION, self.authorization.clone())
            .json(&WireRequest::from(request));
        http::send(builder).await
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }
}

#[async_trait]
impl Provider for OpenAi {
    async fn complete(&self, request: &ChatRequest) -> Outcome {
        match self.exchange(request).await {
            Ok(r) => prefix(&self.name, classify(r.status, &r.headers, &r.body)),
            Err(outcome) => prefix(&self.name, outcome),
        }
    }
}

/// Puts the provider name in front of an outcome's detail.
pub(super) fn prefix(name: &str, outcome: Outcome) -> Outcome {
    let p = |d: String| format!("{name}: {d}");
    match outcome {
        Outcome::Refused { usage, detail } => Outcome::Refused { usage, detail: p(detail) },
        Outcome::RateLimited { retry_after, detail } => Outcome::RateLimited { retry_after, detail: p(detail) },
        Outcome::Transient { detail, timeout, reached } => Outcome::Transient { detail: p(detail), timeout, reached },
        Outcome::Permanent { detail } => Outcome::Permanent { detail: p(detail) },
        ok => ok,
    }
}

#[derive(Serialize)]
struct WireRequest<'a> {
    model: &'a str,
    messages: [WireMessage<'a>; 2],
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<ResponseFormat>,
}

#[derive(Serialize)]
struct WireMessage<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: &'static str,
}

impl<'a> From<&'a ChatRequest> for WireRequest<'a> {
    fn from(r: &'a ChatRequest) -> Self {
        WireRequest {
            model: &r.model,
            messages: [
                WireMessage { role: "system", content: &r.system },
                WireMessage { role: "user", content: &r.user },
            ],
            max_tokens: r.max_output_tokens,
            response_format: r.json_mode.then_some(ResponseFormat { kind: "json_object" }),
        }
    }
}

#[derive(Deserialize)]
struct WireResponse {
    #[serde(default)]
    choices: Vec<WireChoice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireChoice {
    #[serde(default)]
    message: Option<WireChoiceMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct WireChoiceMessage {
    #[serde(default)]
    content: Option<String>,
    /// Set instead of `content` when the model itself refuses (structured outputs).
    #[serde(default)]
    refusal: Option<String>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
    /// OpenAI: cached prompt tokens.
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    /// DeepSeek: prompt tokens served from its context cache.
    #[serde(default)]
    prompt_cache_hit_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Self {
        let cached = u
            .prompt_tokens_details
            .and_then(|d| d.cached_tokens)
            .or(u.prompt_cache_hit_tokens)
            .unwrap_or(0)
            .min(u.prompt_tokens);
        Usage { input_tokens: u.prompt_tokens, cached_input_tokens: cached, output_tokens: u.completion_tokens }
    }
}

/// The error object of an OpenAI-style error body. `code` is a string at OpenAI and a
/// number at OpenRouter, so it stays a JSON value.
#[derive(Deserialize, Default)]
pub(super) struct WireError {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub code: Option<serde_json::Value>,
    /// OpenRouter: why a moderation filter flagged the input.
    #[serde(default)]
    pub metadata: Option<serde_json::Value>,
}

impl WireError {
    pub fn code_str(&self) -> Option<&str> {
        self.code.as_ref().and_then(|c| c.as_str())
    }

    pub fn describe(&self, status: u16) -> String {
        let code = match &self.code {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => self.kind.clone().unwrap_or_default(),
        };
        format!("HTTP {status} {code}: {}", self.message.as_deref().unwrap_or(""))
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    error: Option<WireError>,
}

/// The `error` object of an error body, if the body has one.
pub(super) fn error_of(body: &[u8]) -> Option<WireError> {
    serde_json::from_slice::<ErrorBody>(body).ok().and_then(|b| b.error)
}

/// Classifies an OpenAI-compatible response.
pub fn classify(status: u16, headers: &HeaderMap, body: &[u8]) -> Outcome {
    if (200..300).contains(&status) {
        return classify_success(body);
    }
    classify_error(status, headers, body, error_of(body))
}

/// Classifies an OpenAI-compatible error response (`status` outside 2xx) whose
/// `error` object was already read from `body` with [`error_of`].
pub(super) fn classify_error(status: u16, headers: &HeaderMap, body: &[u8], error: Option<WireError>) -> Outcome {
    let detail = match &error {
        Some(e) => e.describe(status),
        None => format!("HTTP {status}: {}", http::excerpt(body)),
    };
    match (status, &error) {
        // OpenRouter: the input was flagged by a moderation filter in front of the model.
        (403, Some(e)) if is_moderation(e) => Outcome::Refused { usage: None, detail },
        // OpenRouter: out of credits; OpenAI: quota exhausted. Retrying cannot help.
        (402, _) => Outcome::Permanent { detail },
        (429, Some(e)) if e.code_str() == Some("insufficient_quota") => Outcome::Permanent { detail },
        _ => http::by_status(status, headers, detail),
    }
}

fn is_moderation(e: &WireError) -> bool {
    let flagged_metadata =
        e.metadata.as_ref().is_some_and(|m| m.get("reasons").is_some() || m.get("flagged_input").is_some());
    let message = e.message.as_deref().unwrap_or("").to_lowercase();
    flagged_metadata || message.contains("flagged") || message.contains("moderation")
}

fn classify_success(body: &[u8]) -> Outcome {
    let parsed: WireResponse = match http::parse_success(body) {
        Ok(p) => p,
        Err(outcome) => return outcome,
    };
    let usage = parsed.usage.map(Usage::from);
    let Some(choice) = parsed.choices.into_iter().next() else {
        return http::transient("response has no choices".into());
    };
    let message = choice.message.unwrap_or(WireChoiceMessage { content: None, refusal: None });
    if choice.finish_reason.as_deref() == Some("content_filter") {
        return Outcome::Refused { usage, detail: "finish_reason content_filter".into() };
    }
    if let Some(refusal) = message.refusal.filter(|r| !r.is_empty()) {
        return Outcome::Refused { usage, detail: format!("model refusal: {}", http::excerpt(refusal.as_bytes())) };
    }
    match message.content.filter(|c| !c.trim().is_empty()) {
        Some(text) => Outcome::Ok { text, usage },
        None => http::transient(format!(
            "empty completion (finish_reason {})",
            choice.finish_reason.as_deref().unwrap_or("none")
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;
    use std::time::Duration;

    fn ok_body(content: &str, finish: &str, usage: &str) -> Vec<u8> {
        format!(
            r#"{{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"gpt-4o","choices":[{{"index":0,"message":{{"role":"assistant","content":{content}}},"finish_reason":"{finish}"}}],"usage":{usage}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn request_uses_json_mode_only_when_asked() {
        let mut r = ChatRequest {
            model: "gpt-4o".into(),
            stage: crate::ticket::Stage::Triage,
            system: "sys".into(),
            user: "<ticket>x</ticket>".into(),
            json_mode: true,
            max_output_tokens: 200,
        };
        let v = serde_json::to_value(WireRequest::from(&r)).unwrap();
        assert_eq!(v["response_format"]["type"], "json_object");
        assert_eq!(v["messages"][0]["role"], "system");
        assert_eq!(v["messages"][1]["content"], "<ticket>x</ticket>");
        assert_eq!(v["max_tokens"], 200);
        r.json_mode = false;
        assert!(serde_json::to_value(WireRequest::from(&r)).unwrap().get("response_format").is_none());
    }

    #[test]
    fn usage_with_openai_and_deepseek_cache_fields() {
        let openai = ok_body(
            r#""hi""#,
            "stop",
            r#"{"prompt_tokens":1000,"completion_tokens":50,"total_tokens":1050,"prompt_tokens_details":{"cached_tokens":600}}"#,
        );
        match classify(200, &HeaderMap::new(), &openai) {
            Outcome::Ok { text, usage } => {
                assert_eq!(text, "hi");
                assert_eq!(usage, Some(Usage { input_tokens: 1000, cached_input_tokens: 600, output_tokens: 50 }));
            }
            other => panic!("{other:?}"),
        }
        let deepseek = ok_body(
            r#""hi""#,
            "stop",
            r#"{"prompt_tokens":900,"completion_tokens":10,"prompt_cache_hit_tokens":800,"prompt_cache_miss_tokens":100}"#,
        );
        let Outcome::Ok { usage, .. } = classify(200, &HeaderMap::new(), &deepseek) else { panic!() };
        assert_eq!(usage.unwrap().cached_input_tokens, 800);
    }

    #[test]
    fn content_filter_and_model_refusals() {
        let filtered = ok_body("null", "content_filter", r#"{"prompt_tokens":10,"completion_tokens":0}"#);
        assert!(matches!(classify(200, &HeaderMap::new(), &filtered), Outcome::Refused { usage: Some(_), .. }));
        let refusal = br#"{"choices":[{"message":{"role":"assistant","content":null,"refusal":"I can't help with that."},"finish_reason":"stop"}]}"#;
        assert!(matches!(classify(200, &HeaderMap::new(), refusal), Outcome::Refused { usage: None, .. }));
    }

    #[test]
    fn rate_limit_with_openai_reset_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset-requests", HeaderValue::from_static("1s"));
        h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("6m0s"));
        let body = br#"{"error":{"message":"Rate limit reached for requests","type":"requests","param":null,"code":"rate_limit_exceeded"}}"#;
        match classify(429, &h, body) {
            Outcome::RateLimited { retry_after, detail } => {
                assert_eq!(retry_after, Some(Duration::from_secs(360)));
                assert!(detail.contains("rate_limit_exceeded"));
            }
            other => panic!("{other:?}"),
        }
        let quota = br#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#;
        assert!(matches!(classify(429, &HeaderMap::new(), quota), Outcome::Permanent { .. }));
    }

    #[test]
    fn openrouter_credit_and_moderation_errors() {
        let credits =
            br#"{"error":{"code":402,"message":"Insufficient credits. Add more using https://openrouter.ai/credits"}}"#;
        assert!(matches!(classify(402, &HeaderMap::new(), credits), Outcome::Permanent { .. }));
        let flagged = br#"{"error":{"code":403,"message":"Your chosen model requires moderation and your input was flagged","metadata":{"reasons":["violence"],"flagged_input":"...","provider_name":"OpenAI","model_slug":"openai/gpt-4o"}}}"#;
        assert!(matches!(classify(403, &HeaderMap::new(), flagged), Outcome::Refused { usage: None, .. }));
        let forbidden = br#"{"error":{"message":"Project does not have access to model","type":"invalid_request_error","code":"model_not_found"}}"#;
        assert!(matches!(classify(403, &HeaderMap::new(), forbidden), Outcome::Permanent { .. }));
    }

    #[test]
    fn status_classes_and_garbage() {
        let h = HeaderMap::new();
        for status in [400u16, 401, 403, 404, 422] {
            assert!(matches!(classify(status, &h, b"{}"), Outcome::Permanent { .. }), "{status}");
        }
        for status in [408u16, 409, 500, 502, 503, 504] {
            assert!(matches!(classify(status, &h, b"<html>bad gateway</html>"), Outcome::Transient { .. }), "{status}");
        }
        assert!(matches!(classify(200, &h, br#"{"choices":[{"message":{"content":"trunc"#), Outcome::Transient { .. }));
        assert!(matches!(classify(200, &h, b"<html>proxy login</html>"), Outcome::Transient { .. }));
        assert!(matches!(classify(200, &h, br#"{"choices":[]}"#), Outcome::Transient { .. }));
        let no_usage = ok_body(r#""fine""#, "stop", "null");
        assert!(matches!(classify(200, &h, &no_usage), Outcome::Ok { usage: None, .. }));
    }
}
