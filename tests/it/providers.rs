//! One test matrix run against every real adapter over HTTP on loopback: each
//! scenario is answered in the provider's own documented format and must be
//! classified the same way for all of them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ticketflow::providers::{self, ChatRequest, Outcome, Provider};
use ticketflow::settings::ProviderKind;
use ticketflow::ticket::Stage;
use wiremock::matchers::{header, method, path};
use wiremock::{Mock, MockServer, ResponseTemplate};

/// The key every test adapter reads; tests assert it never shows up in outcomes.
pub const PLANTED_KEY: &str = "sk-test-PLANTED-9f8e7d6c5b4a";
pub const KEY_ENV: &str = "TICKETFLOW_IT_PLANTED_KEY";

pub fn plant_key() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    // Set once, before any adapter reads it; nothing else writes this variable.
    ONCE.call_once(|| std::env::set_var(KEY_ENV, PLANTED_KEY));
}

#[derive(Clone, Copy, Debug)]
enum Kind {
    OpenAi,
    DashScope,
    Anthropic,
}

const KINDS: [Kind; 3] = [Kind::OpenAi, Kind::DashScope, Kind::Anthropic];

impl Kind {
    fn endpoint(self) -> &'static str {
        match self {
            Kind::Anthropic => "/v1/messages",
            _ => "/v1/chat/completions",
        }
    }

    fn adapter(self, base_url: &str, timeout_ms: u64) -> Arc<dyn Provider> {
        plant_key();
        let settings = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
        let mut p = settings.providers["openai"].clone();
        p.base_url = format!("{base_url}/v1");
        p.api_key_env = KEY_ENV.into();
        p.timeout_ms = timeout_ms;
        match self {
            Kind::OpenAi => {
                p.kind = ProviderKind::Openai;
                Arc::new(providers::openai::OpenAi::new("openai", &p).unwrap())
            }
            Kind::DashScope => {
                p.kind = ProviderKind::Dashscope;
                Arc::new(providers::dashscope::DashScope::new("qwen", &p).unwrap())
            }
            Kind::Anthropic => {
                p.kind = ProviderKind::Anthropic;
                Arc::new(providers::anthropic::Anthropic::new("anthropic", &p).unwrap())
            }
        }
    }

    fn success(self) -> serde_json::Value {
        match self {
            Kind::Anthropic => serde_json::json!({
                "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
                "content": [{"type": "text", "text": "Your order ships today."}],
                "stop_reason": "end_turn", "stop_sequence": null,
                "usage": {"input_tokens": 120, "output_tokens": 9, "cache_read_input_tokens": 30, "cache_creation_input_tokens": 0}
            }),
            _ => serde_json::json!({
                "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Your order ships today."}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 150, "completion_tokens": 9, "total_tokens": 159, "prompt_tokens_details": {"cached_tokens": 30}}
            }),
        }
    }

    fn refusal(self) -> ResponseTemplate {
        match self {
            Kind::OpenAi => ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "choices": [{"index": 0, "message": {"role": "assistant", "content": null}, "finish_reason": "content_filter"}],
                "usage": {"prompt_tokens": 150, "completion_tokens": 0}
            })),
            Kind::DashScope => ResponseTemplate::new(400).set_body_json(serde_json::json!({
                "error": {"code": "data_inspection_failed", "message": "Input data may contain inappropriate content.", "param": null, "type": "data_inspection_failed"},
                "id": "chatcmpl-1", "request_id": "r-1"
            })),
            Kind::Anthropic => ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "content": [], "stop_reason": "refusal", "usage": {"input_tokens": 120, "output_tokens": 0}
            })),
        }
    }

    fn error(self, status: u16, openai_code: &str, anthropic_type: &str) -> ResponseTemplate {
        let body = match self {
            Kind::Anthropic => serde_json::json!({"type": "error", "error": {"type": anthropic_type, "message": "m"}}),
            _ => {
                serde_json::json!({"error": {"message": "m", "type": openai_code, "param": null, "code": openai_code}})
            }
        };
        ResponseTemplate::new(status).set_body_json(body)
    }

    fn rate_limited(self) -> ResponseTemplate {
        match self {
            Kind::DashScope => self.error(429, "limit_requests", ""),
            _ => self.error(429, "rate_limit_exceeded", "rate_limit_error"),
        }
    }

    fn overloaded(self) -> ResponseTemplate {
        match self {
            Kind::Anthropic => self.error(529, "", "overloaded_error"),
            _ => self.error(503, "server_error", ""),
        }
    }
}

fn request() -> ChatRequest {
    ChatRequest {
        model: "m".into(),
        stage: Stage::Reply,
        system: "You are a support agent.".into(),
        user: "<ticket>\n{\"messages\":[{\"role\":\"customer\",\"text\":\"where is my order\"}]}\n</ticket>".into(),
        json_mode: false,
        max_output_tokens: 100,
    }
}

async fn outcome_for(kind: Kind, response: ResponseTemplate) -> Outcome {
    let server = MockServer::start().await;
    let auth = match kind {
        Kind::Anthropic => header("x-api-key", PLANTED_KEY),
        _ => header("authorization", format!("Bearer {PLANTED_KEY}").as_str()),
    };
    Mock::given(method("POST"))
        .and(path(kind.endpoint()))
        .and(auth)
        .respond_with(response)
        .expect(1)
        .mount(&server)
        .await;
    let outcome = kind.adapter(&server.uri(), 2_000).complete(&request()).await;
    assert!(!format!("{outcome:?}").contains(PLANTED_KEY), "the API key leaked into an outcome");
    outcome
}

#[tokio::test]
async fn success_with_usage_and_cached_tokens() {
    for kind in KINDS {
        match outcome_for(kind, ResponseTemplate::new(200).set_body_json(kind.success())).await {
            Outcome::Ok { text, usage } => {
                assert_eq!(text, "Your order ships today.", "{kind:?}");
                let u = usage.unwrap();
                assert_eq!((u.input_tokens, u.cached_input_tokens, u.output_tokens), (150, 30, 9), "{kind:?}");
            }
            other => panic!("{kind:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn content_filter_refusals() {
    for kind in KINDS {
        let outcome = outcome_for(kind, kind.refusal()).await;
        assert!(matches!(outcome, Outcome::Refused { .. }), "{kind:?}: {outcome:?}");
        if let (Kind::DashScope, Outcome::Refused { usage, .. }) = (kind, &outcome) {
            assert!(usage.is_none(), "DashScope's 400 refusal carries no usage");
        }
    }
}

#[tokio::test]
async fn client_errors_are_permanent() {
    for kind in KINDS {
        for (status, code, kind_name) in [
            (400, "invalid_request_error", "invalid_request_error"),
            (401, "invalid_api_key", "authentication_error"),
            (403, "permission_denied", "permission_error"),
            (404, "model_not_found", "not_found_error"),
        ] {
            let outcome = outcome_for(kind, kind.error(status, code, kind_name)).await;
            assert!(matches!(outcome, Outcome::Permanent { .. }), "{kind:?} {status}: {outcome:?}");
        }
    }
}

#[tokio::test]
async fn server_errors_and_overload_are_transient() {
    for kind in KINDS {
        for response in [kind.error(500, "server_error", "api_error"), kind.overloaded()] {
            let outcome = outcome_for(kind, response).await;
            assert!(matches!(outcome, Outcome::Transient { reached: true, .. }), "{kind:?}: {outcome:?}");
        }
    }
}

#[tokio::test]
async fn rate_limits_with_and_without_retry_after() {
    for kind in KINDS {
        let with = kind.rate_limited().insert_header("retry-after", "7");
        match outcome_for(kind, with).await {
            Outcome::RateLimited { retry_after, .. } => {
                assert_eq!(retry_after, Some(Duration::from_secs(7)), "{kind:?}")
            }
            other => panic!("{kind:?}: {other:?}"),
        }
        match outcome_for(kind, kind.rate_limited()).await {
            Outcome::RateLimited { retry_after, .. } => assert_eq!(retry_after, None, "{kind:?}"),
            other => panic!("{kind:?}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn garbage_truncated_and_html_bodies_are_transient() {
    for kind in KINDS {
        for response in [
            ResponseTemplate::new(200).set_body_string("<html><body>Proxy login required</body></html>"),
            ResponseTemplate::new(200).set_body_string(r#"{"choices":[{"message":{"content":"cut"#),
            ResponseTemplate::new(502).set_body_string("<html><h1>502 Bad Gateway</h1></html>"),
        ] {
            let outcome = outcome_for(kind, response).await;
            assert!(matches!(outcome, Outcome::Transient { .. }), "{kind:?}: {outcome:?}");
        }
    }
}

#[tokio::test]
async fn timeouts_are_transient_and_marked() {
    for kind in KINDS {
        let server = MockServer::start().await;
        let slow = ResponseTemplate::new(200).set_body_json(kind.success()).set_delay(Duration::from_secs(5));
        Mock::given(method("POST")).respond_with(slow).mount(&server).await;
        let outcome = kind.adapter(&server.uri(), 200).complete(&request()).await;
        assert!(matches!(outcome, Outcome::Transient { timeout: true, reached: true, .. }), "{kind:?}: {outcome:?}");
    }
}

#[tokio::test]
async fn connection_reset_and_refused() {
    use tokio::io::AsyncReadExt;
    for kind in KINDS {
        // A server that reads the request and resets the connection.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = socket.read(&mut buf).await;
            socket.set_zero_linger().unwrap();
            drop(socket);
        });
        let outcome = kind.adapter(&format!("http://{addr}"), 2_000).complete(&request()).await;
        server.await.unwrap();
        assert!(matches!(outcome, Outcome::Transient { reached: true, .. }), "{kind:?} reset: {outcome:?}");

        // Nothing listening: the request never reached a provider, so nothing is billed.
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let outcome = kind.adapter(&format!("http://127.0.0.1:{port}"), 2_000).complete(&request()).await;
        assert!(matches!(outcome, Outcome::Transient { reached: false, .. }), "{kind:?} refused: {outcome:?}");
    }
}

#[tokio::test]
async fn requests_carry_the_documented_shape() {
    for kind in KINDS {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(kind.endpoint()))
            .respond_with(ResponseTemplate::new(200).set_body_json(kind.success()))
            .mount(&server)
            .await;
        let mut r = request();
        r.json_mode = true;
        kind.adapter(&server.uri(), 2_000).complete(&r).await;
        let received = server.received_requests().await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&received[0].body).unwrap();
        assert_eq!(body["model"], "m");
        assert_eq!(body["max_tokens"], 100);
        match kind {
            Kind::Anthropic => {
                assert_eq!(body["system"], "You are a support agent.");
                assert_eq!(body["messages"][0]["role"], "user");
                assert_eq!(received[0].headers.get("anthropic-version").unwrap(), "2023-06-01");
            }
            _ => {
                assert_eq!(body["messages"][0]["role"], "system");
                assert_eq!(body["messages"][1]["role"], "user");
                assert_eq!(body["response_format"]["type"], "json_object");
            }
        }
    }
}

#[test]
fn a_missing_key_is_a_clear_start_up_error() {
    let settings = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
    let mut p = settings.providers["openai"].clone();
    p.kind = ProviderKind::Openai;
    p.api_key_env = "TICKETFLOW_IT_UNSET_KEY_VARIABLE".into();
    let err = providers::openai::OpenAi::new("openai", &p).err().expect("must fail without a key");
    assert_eq!(
        err.to_string(),
        "provider `openai`: the API key variable TICKETFLOW_IT_UNSET_KEY_VARIABLE is not set (or empty)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limiter_holds_under_a_burst_of_2000_concurrent_calls() {
    use std::time::Instant;
    use ticketflow::providers::limits::ProviderLimits;
    // 60,000 requests per minute: 1,000 per second, one at a time (burst 1).
    let limits = Arc::new(ProviderLimits::new("p", 60_000, 1_000_000_000, 0.0));
    let deadline = Instant::now() + Duration::from_secs(30);
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..2_000 {
        let limits = limits.clone();
        tasks.spawn(async move {
            limits.acquire(100, deadline).await.expect("within the deadline");
            Instant::now()
        });
    }
    let mut granted: Vec<Duration> = Vec::new();
    while let Some(at) = tasks.join_next().await {
        granted.push(at.unwrap() - started);
    }
    granted.sort();
    assert_eq!(granted.len(), 2_000, "every waiting call is served");
    // In any one-second window: at most the rate plus the burst (plus one for timer slack).
    let mut j = 0;
    for i in 0..granted.len() {
        while granted[i] - granted[j] >= Duration::from_secs(1) {
            j += 1;
        }
        assert!(i - j < 1_002, "{} calls within one second at {:?}", i - j + 1, granted[i]);
    }
    assert!(granted[1_999] >= Duration::from_millis(1_900), "2,000 calls at 1,000/s take about 2 s");
}
