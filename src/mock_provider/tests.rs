//! Tests of the mock server over real HTTP on loopback.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;
use crate::triage::prompt;

fn config(providers: &[(&str, MockProvider)]) -> MockConfig {
    MockConfig { providers: providers.iter().map(|(n, p)| (n.to_string(), p.clone())).collect(), tag_prefix: None }
}

fn provider(style: Style) -> MockProvider {
    MockProvider::new(style)
}

/// The user message of a ticket as ticketflow sends it.
fn ticket_user(text: &str) -> String {
    let raw = json!({ "ticket_id": "T-1", "messages": [{ "role": "customer", "text": text }] }).to_string();
    let ticket = crate::intake::parse(raw.as_bytes(), 1 << 20).unwrap();
    prompt::ticket_data(&ticket)
}

fn reply_system() -> String {
    prompt::reply_system("order_status", Some("Orders ship within 1 business day."), "", "en")
}

fn triage_system() -> String {
    prompt::triage_system(&default_settings().triage.categories)
}

fn openai_body(system: &str, user: &str, json_mode: bool) -> Value {
    let mut body = json!({
        "model": "m-1",
        "messages": [{ "role": "system", "content": system }, { "role": "user", "content": user }],
        "max_tokens": 300,
    });
    if json_mode {
        body["response_format"] = json!({ "type": "json_object" });
    }
    body
}

fn anthropic_body(system: &str, user: &str) -> Value {
    json!({
        "model": "claude-1",
        "max_tokens": 300,
        "system": system,
        "messages": [{ "role": "user", "content": [{ "type": "text", "text": user }] }],
    })
}

/// POSTs to a chat completions endpoint with a key.
async fn chat(base: &str, name: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/{name}/v1/chat/completions"))
        .bearer_auth("sk-test")
        .json(body)
        .send()
        .await
        .unwrap()
}

/// POSTs to a messages endpoint with a key and version.
async fn message(base: &str, name: &str, body: &Value) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}/{name}/v1/messages"))
        .header("x-api-key", "sk-ant-test")
        .header("anthropic-version", "2023-06-01")
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn status_and_json(response: reqwest::Response) -> (u16, Value) {
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> &'a str {
    response.headers().get(name).unwrap_or_else(|| panic!("no header {name}")).to_str().unwrap()
}

#[tokio::test]
async fn openai_success_and_refusal() {
    let p = MockProvider { filter_words: vec!["Forbidden Word".into()], ..provider(Style::Openai) };
    let (base, server) = spawn(config(&[("openai", p)])).await.unwrap();

    let (status, body) = status_and_json(
        chat(&base, "openai", &openai_body(&reply_system(), &ticket_user("Where is my order?"), false)).await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "m-1");
    assert!(body["created"].as_i64().unwrap() > 1_600_000_000);
    let choice = &body["choices"][0];
    assert_eq!((choice["index"].as_u64(), choice["finish_reason"].as_str()), (Some(0), Some("stop")));
    assert_eq!(choice["message"]["role"], "assistant");
    assert!(choice["message"]["content"].as_str().unwrap().contains("Your order is on its way"));
    let usage = &body["usage"];
    let (prompt_tokens, completion) =
        (usage["prompt_tokens"].as_u64().unwrap(), usage["completion_tokens"].as_u64().unwrap());
    assert!(prompt_tokens > 0 && completion > 0);
    assert_eq!(usage["total_tokens"].as_u64(), Some(prompt_tokens + completion));
    assert_eq!(usage["prompt_tokens_details"]["cached_tokens"], 0);

    // The filter looks at the ticket (user) text, case-insensitively, never at our instructions.
    let (status, body) = status_and_json(
        chat(&base, "openai", &openai_body("forbidden", &ticket_user("say the FORBIDDEN word"), false)).await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "content_filter");
    assert!(body["choices"][0]["message"]["content"].is_null());
    assert!(body["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
    assert_eq!(body["usage"]["completion_tokens"], 0);

    let s = &server.stats().providers["openai"];
    assert_eq!((s.requests, s.ok, s.refused, s.errors, s.rate_limited, s.outage), (2, 1, 1, 0, 0, 0));
}

#[tokio::test]
async fn dashscope_success_and_refusal() {
    let (base, server) = spawn(MockConfig::default()).await.unwrap();
    let (status, body) = status_and_json(
        chat(&base, "qwen", &openai_body(&reply_system(), &ticket_user("Where is my order?"), false)).await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["choices"][0]["message"]["content"].as_str().is_some_and(|t| !t.is_empty()));

    // The qwen default filter words of config/default.toml refuse innocent text.
    let user = ticket_user("The box arrived with water damage");
    let (status, body) = status_and_json(chat(&base, "qwen", &openai_body(&reply_system(), &user, false)).await).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "data_inspection_failed");
    assert_eq!(body["error"]["type"], "data_inspection_failed");
    assert_eq!(body["error"]["message"], "Input data may contain inappropriate content.");
    assert!(body["error"]["param"].is_null());
    assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert!(!body["request_id"].as_str().unwrap().is_empty());

    let s = &server.stats().providers["qwen"];
    assert_eq!((s.requests, s.ok, s.refused), (2, 1, 1));
}

#[tokio::test]
async fn anthropic_success_and_refusal() {
    let p = MockProvider { filter_words: vec!["forbidden".into()], ..provider(Style::Anthropic) };
    let (base, server) = spawn(config(&[("anthropic", p)])).await.unwrap();

    let (status, body) = status_and_json(
        message(&base, "anthropic", &anthropic_body(&reply_system(), &ticket_user("Where is my order?"))).await,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!((body["type"].as_str(), body["role"].as_str()), (Some("message"), Some("assistant")));
    assert_eq!(body["model"], "claude-1");
    assert_eq!(body["content"][0]["type"], "text");
    assert!(body["content"][0]["text"].as_str().unwrap().contains("Your order is on its way"));
    assert_eq!(body["stop_reason"], "end_turn");
    assert!(body["stop_sequence"].is_null());
    let usage = &body["usage"];
    assert!(usage["input_tokens"].as_u64().unwrap() > 0 && usage["output_tokens"].as_u64().unwrap() > 0);
    assert_eq!(
        (usage["cache_creation_input_tokens"].as_u64(), usage["cache_read_input_tokens"].as_u64()),
        (Some(0), Some(0))
    );

    let (status, body) =
        status_and_json(message(&base, "anthropic", &anthropic_body("", &ticket_user("a forbidden thing"))).await)
            .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stop_reason"], "refusal");
    assert_eq!(body["content"], json!([]));
    assert!(body["usage"]["input_tokens"].as_u64().unwrap() > 0);

    let s = &server.stats().providers["anthropic"];
    assert_eq!((s.requests, s.ok, s.refused), (2, 1, 1));
}

#[tokio::test]
async fn keys_paths_and_bodies_are_checked() {
    let (base, server) = spawn(MockConfig::default()).await.unwrap();
    let client = reqwest::Client::new();
    let body = openai_body(&reply_system(), &ticket_user("hello"), false);

    for auth in [None, Some("Bearer "), Some("Basic abc")] {
        let mut req = client.post(format!("{base}/openai/v1/chat/completions")).json(&body);
        if let Some(auth) = auth {
            req = req.header("authorization", auth);
        }
        let (status, err) = status_and_json(req.send().await.unwrap()).await;
        assert_eq!(status, 401, "{auth:?}");
        assert_eq!(
            err,
            json!({ "error": { "message": "Incorrect API key provided.", "type": "invalid_request_error", "param": null, "code": "invalid_api_key" } })
        );
    }

    let anthropic = anthropic_body("", &ticket_user("hello"));
    let url = format!("{base}/anthropic/v1/messages");
    let no_key = client.post(&url).header("anthropic-version", "2023-06-01").json(&anthropic);
    let no_version = client.post(&url).header("x-api-key", "k").json(&anthropic);
    for req in [no_key, no_version] {
        let (status, err) = status_and_json(req.send().await.unwrap()).await;
        assert_eq!(status, 401);
        assert_eq!(
            (err["type"].as_str(), err["error"]["type"].as_str()),
            (Some("error"), Some("authentication_error"))
        );
    }
    let (status, err) = status_and_json(
        client
            .post(&url)
            .header("x-api-key", "k")
            .header("anthropic-version", "2023-06-01")
            .json(&anthropic)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{err}");

    // Wrong endpoint for the style, unknown provider, unknown path: 404 in the right style.
    let (status, err) = status_and_json(message(&base, "openai", &anthropic).await).await;
    assert_eq!((status, err["error"]["type"].as_str()), (404, Some("invalid_request_error")));
    let (status, err) = status_and_json(chat(&base, "anthropic", &body).await).await;
    assert_eq!((status, err["error"]["type"].as_str()), (404, Some("not_found_error")));
    let (status, err) = status_and_json(chat(&base, "nobody", &body).await).await;
    assert_eq!((status, err["error"]["type"].as_str()), (404, Some("invalid_request_error")));
    let (status, err) = status_and_json(message(&base, "nobody", &anthropic).await).await;
    assert_eq!((status, err["type"].as_str()), (404, Some("error")));
    let (status, err) = status_and_json(client.get(format!("{base}/qwen/v1/models")).send().await.unwrap()).await;
    assert_eq!((status, err["error"]["type"].as_str()), (404, Some("invalid_request_error")));
    assert!(err["request_id"].is_string(), "dashscope errors carry a request id: {err}");

    // Malformed bodies: 400 invalid_request_error.
    let bad = client.post(format!("{base}/openai/v1/chat/completions")).bearer_auth("k").body("{not json").send();
    let (status, err) = status_and_json(bad.await.unwrap()).await;
    assert_eq!((status, err["error"]["type"].as_str()), (400, Some("invalid_request_error")));
    let bad = client.post(url).header("x-api-key", "k").header("anthropic-version", "2023-06-01").body("[]").send();
    let (status, err) = status_and_json(bad.await.unwrap()).await;
    assert_eq!((status, err["error"]["type"].as_str()), (400, Some("invalid_request_error")));

    // Only authenticated, well-formed requests count.
    let stats = server.stats();
    assert_eq!(stats.providers["openai"].requests, 0);
    assert_eq!(stats.providers["anthropic"].requests, 1);

    let health = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    assert_eq!(health.text().await.unwrap(), "ok");
}

#[tokio::test]
async fn requests_over_the_limit_get_429_in_each_style() {
    let limited = |style| MockProvider { requests_per_minute: 3, ..provider(style) };
    let cfg =
        config(&[("o", limited(Style::Openai)), ("d", limited(Style::Dashscope)), ("a", limited(Style::Anthropic))]);
    let (base, server) = spawn(cfg).await.unwrap();
    let body = openai_body(&reply_system(), &ticket_user("Where is my order?"), false);
    let abody = anthropic_body(&reply_system(), &ticket_user("Where is my order?"));

    for _ in 0..3 {
        assert_eq!(chat(&base, "o", &body).await.status(), 200);
        assert_eq!(chat(&base, "d", &body).await.status(), 200);
        assert_eq!(message(&base, "a", &abody).await.status(), 200);
    }

    for name in ["o", "d"] {
        let response = chat(&base, name, &body).await;
        assert_eq!(response.status(), 429);
        assert_eq!(header(&response, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&response, "x-ratelimit-remaining-requests"), "0");
        let reset = header(&response, "x-ratelimit-reset-requests").to_owned();
        // The oldest request leaves the window a little under 60 s from now.
        assert!(reset.ends_with('s') && reset.starts_with("59."), "{reset}");
        assert_eq!(header(&response, "retry-after"), "60");
        let err: Value = response.json().await.unwrap();
        if name == "o" {
            assert_eq!(err["error"]["type"], "requests");
            assert_eq!(err["error"]["code"], "rate_limit_exceeded");
            assert!(err["error"]["param"].is_null());
            let message = err["error"]["message"].as_str().unwrap();
            assert!(
                message.starts_with(
                    "Rate limit reached for requests per minute (RPM): Limit 3, Used 3. Please try again in 59."
                ),
                "{message}"
            );
        } else {
            assert_eq!(err["error"]["code"], "limit_requests");
            assert_eq!(err["error"]["type"], "limit_requests");
            assert_eq!(err["error"]["message"], "You exceeded your current requests list.");
            assert!(err["id"].is_string() && err["request_id"].is_string());
        }
    }
    let response = message(&base, "a", &abody).await;
    assert_eq!(response.status(), 429);
    assert_eq!(header(&response, "retry-after"), "60");
    assert_eq!(header(&response, "anthropic-ratelimit-requests-remaining"), "0");
    let err: Value = response.json().await.unwrap();
    assert_eq!(
        err,
        json!({ "type": "error", "error": { "type": "rate_limit_error", "message": "Number of request tokens has exceeded your per-minute rate limit" } })
    );

    // A second refused request is not admitted either.
    assert_eq!(chat(&base, "o", &body).await.status(), 429);
    let stats = server.stats();
    let o = &stats.providers["o"];
    assert_eq!((o.requests, o.ok, o.rate_limited, o.max_requests_in_any_60s), (5, 3, 2, 3));
    for name in ["d", "a"] {
        let s = &stats.providers[name];
        assert_eq!((s.requests, s.ok, s.rate_limited, s.max_requests_in_any_60s), (4, 3, 1, 3), "{name}");
    }

    // A reset empties the window: the limit is available again.
    server.reset();
    assert_eq!(chat(&base, "o", &body).await.status(), 200);
}

#[tokio::test]
async fn a_429_comes_at_once_without_the_latency() {
    let p = MockProvider { requests_per_minute: 1, latency_ms: 400, ..provider(Style::Openai) };
    let (base, _server) = spawn(config(&[("o", p)])).await.unwrap();
    let body = openai_body(&reply_system(), &ticket_user("Where is my order?"), false);
    let started = Instant::now();
    assert_eq!(chat(&base, "o", &body).await.status(), 200);
    assert!(started.elapsed() >= Duration::from_millis(400));
    let started = Instant::now();
    assert_eq!(chat(&base, "o", &body).await.status(), 429);
    assert!(started.elapsed() < Duration::from_millis(400));
}

#[tokio::test]
async fn outages_answer_503_or_529() {
    let scheduled = MockProvider { outages: vec![Outage { start_s: 0.0, end_s: 3600.0 }], ..provider(Style::Openai) };
    let cfg = config(&[("o", scheduled), ("d", provider(Style::Dashscope)), ("a", provider(Style::Anthropic))]);
    let (base, server) = spawn(cfg).await.unwrap();
    let client = reqwest::Client::new();
    let body = openai_body(&reply_system(), &ticket_user("Where is my order?"), false);
    let abody = anthropic_body(&reply_system(), &ticket_user("Where is my order?"));
    let overloaded = json!({ "error": { "message": "The server is overloaded or not ready yet.", "type": "server_error", "param": null, "code": null } });

    assert_eq!(status_and_json(chat(&base, "o", &body).await).await, (503, overloaded.clone()));

    // Through the admin endpoint.
    assert_eq!(chat(&base, "d", &body).await.status(), 200);
    let started = client.post(format!("{base}/admin/outage/d?seconds=60")).send().await.unwrap();
    assert_eq!(started.status(), 200);
    assert_eq!(status_and_json(chat(&base, "d", &body).await).await, (503, overloaded));
    assert_eq!(client.post(format!("{base}/admin/outage/nobody?seconds=1")).send().await.unwrap().status(), 404);
    assert_eq!(client.post(format!("{base}/admin/outage/d?seconds=-1")).send().await.unwrap().status(), 400);
    assert_eq!(client.post(format!("{base}/admin/outage/d")).send().await.unwrap().status(), 400);

    // Through the handle; 0 seconds ends it.
    server.start_outage("a", 60.0);
    let (status, err) = status_and_json(message(&base, "a", &abody).await).await;
    assert_eq!(
        (status, err),
        (529, json!({ "type": "error", "error": { "type": "overloaded_error", "message": "Overloaded" } }))
    );
    server.start_outage("a", 0.0);
    assert_eq!(message(&base, "a", &abody).await.status(), 200);

    let stats = server.stats();
    assert_eq!((stats.providers["o"].outage, stats.providers["o"].ok), (1, 0));
    assert_eq!((stats.providers["d"].outage, stats.providers["d"].ok), (1, 1));
    assert_eq!((stats.providers["a"].outage, stats.providers["a"].ok), (1, 1));
    // Requests during an outage were accepted by the rate limiter.
    assert_eq!(stats.providers["d"].max_requests_in_any_60s, 2);
}

#[tokio::test]
async fn error_rate_one_always_fails_transiently() {
    let failing = |style| MockProvider { error_rate: 1.0, ..provider(style) };
    let (base, server) =
        spawn(config(&[("o", failing(Style::Openai)), ("a", failing(Style::Anthropic))])).await.unwrap();
    let body = openai_body(&reply_system(), &ticket_user("Where is my order?"), false);
    let abody = anthropic_body(&reply_system(), &ticket_user("Where is my order?"));
    for _ in 0..5 {
        let (status, err) = status_and_json(chat(&base, "o", &body).await).await;
        assert_eq!((status, err["error"]["type"].as_str()), (503, Some("server_error")));
        let (status, err) = status_and_json(message(&base, "a", &abody).await).await;
        assert_eq!((status, err["error"]["type"].as_str()), (529, Some("overloaded_error")));
    }
    let stats = server.stats();
    for name in ["o", "a"] {
        let s = &stats.providers[name];
        assert_eq!((s.requests, s.errors, s.ok), (5, 5, 0), "{name}");
    }
}

#[tokio::test]
async fn stats_and_reset_over_http() {
    let (base, server) = spawn(MockConfig::default()).await.unwrap();
    let client = reqwest::Client::new();
    let body = openai_body(&reply_system(), &ticket_user("Where is my order?"), false);
    for _ in 0..3 {
        assert_eq!(chat(&base, "deepseek", &body).await.status(), 200);
    }
    let stats: Value = client.get(format!("{base}/admin/stats")).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = stats["providers"].as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(names, ["anthropic", "deepseek", "mistral", "openai", "qwen"]);
    let deepseek = &stats["providers"]["deepseek"];
    for (key, want) in [
        ("requests", 3),
        ("ok", 3),
        ("rate_limited", 0),
        ("refused", 0),
        ("errors", 0),
        ("outage", 0),
        ("max_requests_in_any_60s", 3),
        ("max_sent_in_any_60s", 3),
    ] {
        assert_eq!(deepseek[key].as_u64(), Some(want), "{key}");
    }
    assert_eq!(serde_json::from_value::<MockStats>(stats).unwrap(), server.stats());

    let reset = client.post(format!("{base}/admin/reset")).send().await.unwrap();
    assert!(reset.status().is_success());
    let stats: MockStats = client.get(format!("{base}/admin/stats")).send().await.unwrap().json().await.unwrap();
    assert!(stats.providers.values().all(|s| *s == ProviderStats::default()), "{stats:?}");
}

#[tokio::test]
async fn triage_requests_get_a_json_classification() {
    let (base, _server) = spawn(MockConfig::default()).await.unwrap();
    let user = ticket_user("Where is my order? The tracking has not moved for a week.");

    // DashScope JSON mode, as the triage stage asks.
    let (status, body) = status_and_json(chat(&base, "qwen", &openai_body(&triage_system(), &user, true)).await).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(body["choices"][0]["message"]["content"].as_str().unwrap()).unwrap();
    assert_eq!(answer["category"], "order_status");
    // ticketflow's own parser accepts it.
    let analyzer = Analyzer::new(&default_settings().triage);
    let raw = json!({ "ticket_id": "T-1", "messages": [{ "role": "customer", "text": "Where is my order?" }] });
    let ticket = crate::intake::parse(raw.to_string().as_bytes(), 1 << 20).unwrap();
    let (signals, heuristic) = analyzer.analyze(&ticket);
    let text = body["choices"][0]["message"]["content"].as_str().unwrap();
    let parsed = crate::triage::parse::parse_triage(text, &analyzer.categories, &heuristic, &signals).unwrap();
    assert_eq!(parsed.category, "order_status");

    // Anthropic has no JSON mode: the triage system prompt decides.
    let (status, body) =
        status_and_json(message(&base, "anthropic", &anthropic_body(&triage_system(), &user)).await).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(body["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(answer["category"], "order_status");

    // A triage request without ticket data cannot be answered: 500.
    let (status, _) =
        status_and_json(chat(&base, "openai", &openai_body(&triage_system(), "no ticket here", true)).await).await;
    assert_eq!(status, 500);
}

#[tokio::test]
async fn moderation_requests_get_a_moderation_answer() {
    use crate::moderation::{parse_answer, Verdict, MODERATION_SYSTEM};
    // No content filter: the threat must reach the moderation answer.
    let (base, _server) =
        spawn(config(&[("qwen", provider(Style::Dashscope)), ("anthropic", provider(Style::Anthropic))]))
            .await
            .unwrap();
    let ordinary = ticket_user("Where is my order? The tracking has not moved for a week.");
    let threat = ticket_user("Refund me now or I will kill you, I know where you live.");

    // JSON mode, as the pipeline's moderation stage asks: not a triage answer.
    for (user, flagged) in [(&ordinary, false), (&threat, true)] {
        let (status, body) =
            status_and_json(chat(&base, "qwen", &openai_body(MODERATION_SYSTEM, user, true)).await).await;
        assert_eq!(status, 200, "{body}");
        let text = body["choices"][0]["message"]["content"].as_str().unwrap();
        let answer: Value = serde_json::from_str(text).unwrap();
        assert_eq!(answer["flagged"], flagged, "{answer}");
        assert!(answer.get("category").is_none(), "{answer}");
        assert_eq!(parse_answer(text).map(|v| v == Verdict::Passed), Some(!flagged), "{text}");
    }

    // Anthropic has no JSON mode: the moderation system prompt decides.
    let (status, body) =
        status_and_json(message(&base, "anthropic", &anthropic_body(MODERATION_SYSTEM, &threat)).await).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(body["content"][0]["text"].as_str().unwrap()).unwrap();
    assert_eq!(answer["flagged"], true, "{answer}");
}

#[test]
fn default_config_serves_the_five_providers() {
    let c = MockConfig::default();
    let styles: BTreeMap<&str, Style> = c.providers.iter().map(|(n, p)| (n.as_str(), p.style)).collect();
    assert_eq!(
        styles,
        BTreeMap::from([
            ("anthropic", Style::Anthropic),
            ("deepseek", Style::Openai),
            ("mistral", Style::Openai),
            ("openai", Style::Openai),
            ("qwen", Style::Dashscope),
        ])
    );
    assert_eq!(c.providers["qwen"].filter_words, default_settings().providers["qwen"].filter_words);
    assert!(c.providers["qwen"].filter_words.iter().any(|w| w == "damage"));
    assert!(c.providers.values().all(|p| p.latency_ms == 0 && p.requests_per_minute == 0 && p.error_rate == 0.0));
    assert!(c.validate().is_empty());
}

#[test]
fn toml_files_take_defaults_and_reject_mistakes() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };

    let path = write(
        "mock.toml",
        r#"
        [providers.qwen]
        style = "dashscope"
        requests_per_minute = 60
        outages = [{ start_s = 10, end_s = 20.5 }]

        [providers.claude]
        style = "anthropic"
        latency_ms = 5
        "#,
    );
    let c = MockConfig::from_toml_file(&path).unwrap();
    assert_eq!(c.providers.len(), 2);
    let qwen = &c.providers["qwen"];
    assert_eq!(
        (qwen.style, qwen.requests_per_minute, qwen.latency_ms, qwen.error_rate),
        (Style::Dashscope, 60, 0, 0.0)
    );
    assert!(qwen.filter_words.is_empty());
    assert_eq!(qwen.outages, [Outage { start_s: 10.0, end_s: 20.5 }]);
    assert_eq!(c.providers["claude"].latency_ms, 5);

    assert_eq!(MockConfig::from_toml_file(&write("empty.toml", "")).unwrap(), MockConfig::default());

    let unknown = MockConfig::from_toml_file(&write("u.toml", "[providers.x]\nstyle = \"openai\"\nlatency = 5\n"));
    assert!(unknown.unwrap_err().contains("latency"));
    let no_style = MockConfig::from_toml_file(&write("s.toml", "[providers.x]\nlatency_ms = 5\n"));
    assert!(no_style.unwrap_err().contains("style"));
    let bad = MockConfig::from_toml_file(&write(
        "b.toml",
        "[providers.x]\nstyle = \"openai\"\nerror_rate = 1.5\noutages = [{ start_s = 5, end_s = 1 }]\n",
    ))
    .unwrap_err();
    assert!(bad.contains("error_rate") && bad.contains("outages[0]"), "{bad}");
    assert!(MockConfig::from_toml_file(&dir.path().join("missing.toml")).is_err());
}

/// Load from 64 keep-alive clients in the same two-thread runtime as the server, so
/// the server gets at most the two cores it must sustain 5,000 requests/s on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: cargo test --release --lib mock_provider::tests::throughput -- --ignored --nocapture"]
async fn throughput() {
    let (base, server) = spawn(MockConfig::default()).await.unwrap();
    let client = reqwest::Client::builder().pool_max_idle_per_host(256).tcp_nodelay(true).build().unwrap();
    let body = openai_body(&reply_system(), &ticket_user("Where is my order? The tracking has not moved."), false);
    let tbody = openai_body(&triage_system(), &ticket_user("Where is my order? The tracking has not moved."), true);
    let url = format!("{base}/qwen/v1/chat/completions");
    let started = Instant::now();
    let per_task = 1000;
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let (client, url, body) =
                (client.clone(), url.clone(), if i % 2 == 0 { body.clone() } else { tbody.clone() });
            tokio::spawn(async move {
                for _ in 0..per_task {
                    let r = client.post(&url).bearer_auth("k").json(&body).send().await.unwrap();
                    assert_eq!(r.status(), 200);
                    r.bytes().await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let n = 64 * per_task;
    let secs = started.elapsed().as_secs_f64();
    let rate = n as f64 / secs;
    eprintln!("{n} requests in {secs:.2}s: {rate:.0}/s; {:?}", server.stats().providers["qwen"]);
    assert_eq!(server.stats().providers["qwen"].ok, n as u64);
    if !cfg!(debug_assertions) {
        assert!(rate > 5000.0, "{rate:.0} requests/s");
    }
}

#[tokio::test]
async fn a_held_request_waits_for_the_release_and_others_do_not() {
    let p = MockProvider { hold_words: vec!["Hold-Me".into()], ..provider(Style::Openai) };
    let (base, server) = spawn(config(&[("openai", p)])).await.unwrap();
    let held = tokio::spawn({
        let base = base.clone();
        async move { chat(&base, "openai", &openai_body(&reply_system(), &ticket_user("please hold-me"), false)).await }
    });
    // Others pass while it waits.
    let free = chat(&base, "openai", &openai_body(&reply_system(), &ticket_user("Where is my order?"), false)).await;
    assert_eq!(free.status(), 200);
    assert!(!held.is_finished(), "the held request must wait");
    let response = reqwest::Client::new().post(format!("{base}/admin/release")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(held.await.unwrap().status(), 200);
    drop(server);
}
