//! Wire formats of the three provider styles: request bodies read into one prompt,
//! and every response the mock sends (success, refusal, 429, overload, 401, 404,
//! 400, 500) in the shape each provider documents.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::config::Style;
use crate::providers::Usage;

/// A request body of either endpoint, reduced to what the content generator needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The model named in the request, echoed in the response.
    pub model: String,
    /// System text: the system (or developer) messages, or Anthropic's `system`.
    pub system: String,
    /// The user messages joined.
    pub user: String,
    /// `response_format: {"type": "json_object"}` was requested.
    pub json_mode: bool,
    /// `max_tokens` (or `max_completion_tokens`), when given.
    pub max_tokens: Option<u32>,
}

/// Message content: a string, or a list of content blocks of which the text ones count.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Blocks(Vec<Block>),
}

#[derive(Debug, Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

impl Content {
    fn push_to(&self, out: &mut String) {
        let mut push = |text: &str| {
            if !out.is_empty() {
                out.push_str("\n\n");
            }
            out.push_str(text);
        };
        match self {
            Content::Text(text) => push(text),
            Content::Blocks(blocks) => {
                for b in blocks.iter().filter(|b| b.kind == "text") {
                    push(b.text.as_deref().unwrap_or(""));
                }
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct ChatCompletionBody {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    response_format: Option<ResponseFormat>,
}

#[derive(Debug, Deserialize)]
struct ChatMessage {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct ResponseFormat {
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Debug, Deserialize)]
struct MessagesBody {
    model: String,
    max_tokens: u32,
    #[serde(default)]
    system: Option<Content>,
    messages: Vec<AnthropicMessage>,
}

#[derive(Debug, Deserialize)]
struct AnthropicMessage {
    role: String,
    content: Content,
}

/// Reads an OpenAI/DashScope chat completions body.
pub fn parse_chat_completion(body: &[u8]) -> Result<Prompt, String> {
    let b: ChatCompletionBody = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let (mut system, mut user) = (String::new(), String::new());
    for m in &b.messages {
        let out = match m.role.as_str() {
            "system" | "developer" => &mut system,
            "user" => &mut user,
            _ => continue,
        };
        if let Some(c) = &m.content {
            c.push_to(out);
        }
    }
    Ok(Prompt {
        model: b.model,
        system,
        user,
        json_mode: b.response_format.is_some_and(|f| f.kind == "json_object"),
        max_tokens: b.max_tokens.or(b.max_completion_tokens),
    })
}

/// Reads an Anthropic messages body.
pub fn parse_messages(body: &[u8]) -> Result<Prompt, String> {
    let b: MessagesBody = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let mut system = String::new();
    if let Some(s) = &b.system {
        s.push_to(&mut system);
    }
    let mut user = String::new();
    for m in b.messages.iter().filter(|m| m.role == "user") {
        m.content.push_to(&mut user);
    }
    Ok(Prompt { model: b.model, system, user, json_mode: false, max_tokens: Some(b.max_tokens) })
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn compact_uuid() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, Json(body)).into_response()
}

/// An OpenAI-shaped error object; DashScope adds its `id` and `request_id`.
fn openai_like_error(style: Style, status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let mut body = json!({ "error": { "message": message, "type": kind, "param": null, "code": code } });
    if style == Style::Dashscope {
        body["id"] = json!(format!("chatcmpl-{}", compact_uuid()));
        body["request_id"] = json!(uuid());
    }
    json_response(status, body)
}

fn anthropic_error(status: StatusCode, kind: &str, message: &str) -> Response {
    json_response(status, json!({ "type": "error", "error": { "type": kind, "message": message } }))
}

fn openai_usage(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
        "prompt_tokens_details": { "cached_tokens": u.cached_input_tokens },
    })
}

fn anthropic_usage(u: &Usage) -> Value {
    json!({
        "input_tokens": u.input_tokens.saturating_sub(u.cached_input_tokens),
        "output_tokens": u.output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": u.cached_input_tokens,
    })
}

fn chat_completion(model: &str, content: Option<&str>, finish_reason: &str, usage: &Usage) -> Response {
    json_response(
        StatusCode::OK,
        json!({
            "id": format!("chatcmpl-{}", compact_uuid()),
            "object": "chat.completion",
            "created": chrono::Utc::now().timestamp(),
            "model": model,
            "choices": [{
                "index": 0,
                "message": { "role": "assistant", "content": content },
                "finish_reason": finish_reason,
            }],
            "usage": openai_usage(usage),
        }),
    )
}

fn anthropic_message(model: &str, content: Value, stop_reason: &str, usage: &Usage) -> Response {
    json_response(
        StatusCode::OK,
        json!({
            "id": format!("msg_{}", compact_uuid()),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": null,
            "usage": anthropic_usage(usage),
        }),
    )
}

/// A completed answer.
pub fn success(style: Style, model: &str, text: &str, usage: &Usage) -> Response {
    match style {
        Style::Openai | Style::Dashscope => chat_completion(model, Some(text), "stop", usage),
        Style::Anthropic => anthropic_message(model, json!([{ "type": "text", "text": text }]), "end_turn", usage),
    }
}

/// A content-filter refusal: a filtered completion (OpenAI, Anthropic, both billed)
/// or DashScope's 400 `data_inspection_failed` (not billed, so `usage` is unused).
pub fn refusal(style: Style, model: &str, usage: &Usage) -> Response {
    match style {
        Style::Openai => chat_completion(model, None, "content_filter", usage),
        Style::Dashscope => openai_like_error(
            style,
            StatusCode::BAD_REQUEST,
            "Input data may contain inappropriate content.",
            "data_inspection_failed",
            Some("data_inspection_failed"),
        ),
        Style::Anthropic => anthropic_message(model, json!([]), "refusal", usage),
    }
}

/// 429 over the requests-per-minute limit; `reset` is the time until a slot frees.
pub fn rate_limited(style: Style, limit: u32, reset: Duration) -> Response {
    let retry_after = reset.as_millis().div_ceil(1000).max(1);
    let mut response = match style {
        Style::Openai => openai_like_error(
            style,
            StatusCode::TOO_MANY_REQUESTS,
            &format!(
                "Rate limit reached for requests per minute (RPM): Limit {limit}, Used {limit}. Please try again in {}.",
                go_duration(reset)
            ),
            "requests",
            Some("rate_limit_exceeded"),
        ),
        Style::Dashscope => openai_like_error(
            style,
            StatusCode::TOO_MANY_REQUESTS,
            "You exceeded your current requests list.",
            "limit_requests",
            Some("limit_requests"),
        ),
        Style::Anthropic => anthropic_error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        ),
    };
    let headers = response.headers_mut();
    set(headers, "retry-after", retry_after.to_string());
    match style {
        Style::Openai | Style::Dashscope => {
            set(headers, "x-ratelimit-limit-requests", limit.to_string());
            set(headers, "x-ratelimit-remaining-requests", "0".to_owned());
            set(headers, "x-ratelimit-reset-requests", go_duration(reset));
        }
        Style::Anthropic => {
            let at = chrono::Utc::now() + chrono::Duration::from_std(reset).unwrap_or_default();
            set(headers, "anthropic-ratelimit-requests-limit", limit.to_string());
            set(headers, "anthropic-ratelimit-requests-remaining", "0".to_owned());
            set(headers, "anthropic-ratelimit-requests-reset", at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        }
    }
    response
}

fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    // Our values are digits, durations and timestamps: always valid header values.
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// An injected transient error or an outage: 503 overloaded, or Anthropic's 529.
pub fn unavailable(style: Style) -> Response {
    match style {
        Style::Openai | Style::Dashscope => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": {
                "message": "The server is overloaded or not ready yet.",
                "type": "server_error",
                "param": null,
                "code": null,
            } }),
        ),
        Style::Anthropic => {
            // 529 is Anthropic's own status; it is in the valid range, so this never fails.
            let status = StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            anthropic_error(status, "overloaded_error", "Overloaded")
        }
    }
}

/// 401: missing or empty API key (or, for Anthropic, a missing `anthropic-version`).
pub fn unauthorized(style: Style, anthropic_message: &str) -> Response {
    match style {
        Style::Openai | Style::Dashscope => openai_like_error(
            style,
            StatusCode::UNAUTHORIZED,
            "Incorrect API key provided.",
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        Style::Anthropic => anthropic_error(StatusCode::UNAUTHORIZED, "authentication_error", anthropic_message),
    }
}

/// 404: no such provider, or an endpoint its style does not serve.
pub fn not_found(style: Style, method: &str, path: &str) -> Response {
    match style {
        Style::Openai | Style::Dashscope => openai_like_error(
            style,
            StatusCode::NOT_FOUND,
            &format!("Invalid URL ({method} {path})"),
            "invalid_request_error",
            None,
        ),
        Style::Anthropic => anthropic_error(StatusCode::NOT_FOUND, "not_found_error", "Not found"),
    }
}

/// 400: a body that is not JSON or not a valid request.
pub fn bad_request(style: Style, detail: &str) -> Response {
    match style {
        Style::Openai => openai_like_error(
            style,
            StatusCode::BAD_REQUEST,
            &format!("We could not parse the JSON body of your request: {detail}"),
            "invalid_request_error",
            None,
        ),
        Style::Dashscope => openai_like_error(
            style,
            StatusCode::BAD_REQUEST,
            &format!("The request body is not valid: {detail}"),
            "invalid_request_error",
            Some("invalid_parameter_error"),
        ),
        Style::Anthropic => anthropic_error(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            &format!("invalid request body: {detail}"),
        ),
    }
}

/// 500: the content generator could not answer (e.g. a triage request without ticket data).
pub fn internal(style: Style) -> Response {
    match style {
        Style::Openai | Style::Dashscope => openai_like_error(
            style,
            StatusCode::INTERNAL_SERVER_ERROR,
            "The server had an error while processing your request.",
            "server_error",
            None,
        ),
        Style::Anthropic => anthropic_error(StatusCode::INTERNAL_SERVER_ERROR, "api_error", "Internal server error"),
    }
}

/// A duration as Go prints it, at millisecond precision rounded up, the way OpenAI's
/// `x-ratelimit-reset-*` headers carry it: "850ms", "1s", "1.2s", "6m0s", "1h0m0s".
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, minutes, sec_ms) = (ms / 3_600_000, (ms / 60_000) % 60, ms % 60_000);
    let secs = if sec_ms % 1000 == 0 {
        (sec_ms / 1000).to_string()
    } else {
        format!("{}.{:03}", sec_ms / 1000, sec_ms % 1000).trim_end_matches('0').to_owned()
    };
    match (hours, minutes) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m}m{secs}s"),
        (h, m) => format!("{h}h{m}m{secs}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations_match_openai_headers() {
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(go_duration(Duration::from_micros(849_001)), "850ms");
        assert_eq!(go_duration(Duration::from_secs(1)), "1s");
        assert_eq!(go_duration(Duration::from_millis(1200)), "1.2s");
        assert_eq!(go_duration(Duration::from_millis(59_999)), "59.999s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_millis(60_500)), "1m0.5s");
        assert_eq!(go_duration(Duration::from_secs(3600)), "1h0m0s");
    }

    #[test]
    fn content_blocks_and_roles() {
        let p = parse_chat_completion(
            br#"{"model":"m","messages":[{"role":"system","content":"S1"},{"role":"developer","content":[{"type":"text","text":"S2"}]},
                {"role":"user","content":"U1"},{"role":"assistant","content":"A"},{"role":"user","content":"U2"}],
                "max_completion_tokens":7,"response_format":{"type":"json_object"},"temperature":0}"#,
        )
        .unwrap();
        assert_eq!(p.system, "S1\n\nS2");
        assert_eq!(p.user, "U1\n\nU2");
        assert!(p.json_mode);
        assert_eq!(p.max_tokens, Some(7));
        let p = parse_messages(
            br#"{"model":"m","max_tokens":5,"system":[{"type":"text","text":"S","cache_control":{"type":"ephemeral"}}],
                "messages":[{"role":"user","content":[{"type":"text","text":"U"}]}]}"#,
        )
        .unwrap();
        assert_eq!((p.system.as_str(), p.user.as_str(), p.max_tokens), ("S", "U", Some(5)));
        assert!(parse_messages(br#"{"model":"m","messages":[]}"#).is_err(), "max_tokens is required");
        assert!(parse_chat_completion(b"{not json").is_err());
    }
}
