//! A mock LLM provider server: OpenAI-, DashScope- and Anthropic-compatible
//! endpoints under one path prefix per provider, so tests, benchmarks and demos can
//! point ticketflow's real HTTP adapters at it, e.g.
//! `TICKETFLOW__PROVIDERS__QWEN__BASE_URL=http://127.0.0.1:8089/qwen/v1`.
//!
//! # Endpoints
//!
//! - `POST /{name}/v1/chat/completions`: providers of style `openai` and `dashscope`
//!   (`Authorization: Bearer <key>`).
//! - `POST /{name}/v1/messages`: providers of style `anthropic` (`x-api-key` and
//!   `anthropic-version`).
//! - `GET /admin/stats`, `POST /admin/reset`, `POST /admin/outage/{name}?seconds=N`,
//!   `POST /admin/release` (lets requests held by a provider's `hold_words` go),
//!   `GET /healthz`.
//!
//! # One request
//!
//! Unknown provider or wrong endpoint: 404; no key: 401; bad body: 400, all in the
//! provider's style. Then, in this order: the requests-per-minute limit (429 at once,
//! without latency), outages (503, or 529 for anthropic), latency, the injected error
//! rate (503/529), the content filter (a refusal in the provider's style), and the
//! answer. Answers come from ticketflow's simulated provider, so triage requests get
//! a JSON classification and reply requests a plausible reply.
//!
//! - [`config`]: [`MockConfig`], per-provider behaviour, TOML loading.
//! - `wire`: request parsing and every response body of the three styles.
//! - `state`: counters, the sliding rate-limit window, outages.

pub mod config;
mod state;
mod wire;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

pub use config::{MockConfig, MockProvider, Outage, Style};
pub use state::ProviderStats;

use crate::moderation::MODERATION_SYSTEM;
use crate::providers::simulated::Simulated;
use crate::providers::{ChatRequest, Outcome, Provider, Usage};
use crate::settings::Settings;
use crate::ticket::Stage;
use crate::triage::{prompt as triage_prompt, Analyzer};
use state::{Counter, ProviderState};

/// ticketflow's shipped default settings, loaded once: the source of the default
/// filter words and of the content generator's configuration.
fn default_settings() -> &'static Settings {
    static DEFAULTS: LazyLock<Settings> = LazyLock::new(|| {
        crate::policy::load_from(None, &BTreeMap::new())
            .expect("the compiled-in config/default.toml is valid (checked by the settings tests)")
    });
    &DEFAULTS
}

/// Counters of every provider, as served by `GET /admin/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MockStats {
    /// Counters by provider name.
    pub providers: BTreeMap<String, ProviderStats>,
}

/// A handle to a mock server's shared state; clones share it.
#[derive(Clone)]
pub struct MockServer {
    inner: Arc<Inner>,
}

struct Inner {
    /// Configured outages are measured from here.
    started: Instant,
    providers: BTreeMap<String, ProviderState>,
    /// Produces the text of every answer.
    content: Simulated,
    /// False until `POST /admin/release`: requests with a hold word wait for it.
    released: tokio::sync::watch::Sender<bool>,
    /// `tag_prefix`, and the paid calls counted per tag.
    tags: Option<(String, std::sync::Mutex<BTreeMap<TagKey, u64>>)>,
}

/// Provider, stage, outcome (`ok` or `refused`) and tag of a paid call.
type TagKey = (String, &'static str, &'static str, String);

/// Paid calls (answers and refusals) of one provider, stage and tag: an entry of
/// `GET /admin/calls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaggedCalls {
    pub provider: String,
    pub stage: String,
    /// `ok` (an answer) or `refused` (a content-filter refusal, billed too).
    pub outcome: String,
    pub tag: String,
    pub paid: u64,
}

/// The two completion endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    ChatCompletions,
    Messages,
}

impl Endpoint {
    fn serves(self, style: Style) -> bool {
        match self {
            Endpoint::ChatCompletions => matches!(style, Style::Openai | Style::Dashscope),
            Endpoint::Messages => style == Style::Anthropic,
        }
    }

    /// The error style for a provider that does not exist: the endpoint's own.
    fn native_style(self) -> Style {
        match self {
            Endpoint::ChatCompletions => Style::Openai,
            Endpoint::Messages => Style::Anthropic,
        }
    }

    fn path(self, name: &str) -> String {
        match self {
            Endpoint::ChatCompletions => format!("/{name}/v1/chat/completions"),
            Endpoint::Messages => format!("/{name}/v1/messages"),
        }
    }
}

impl MockServer {
    /// A server for `config`. Out-of-range values are clamped (see
    /// [`MockConfig::validate`] to report them instead). Configured outages are
    /// measured from this call.
    pub fn new(config: MockConfig) -> Self {
        let settings = default_settings();
        let analyzer = Arc::new(Analyzer::new(&settings.triage));
        let mut qwen = settings
            .providers
            .get("qwen")
            .cloned()
            .expect("the compiled-in config/default.toml defines provider `qwen`");
        qwen.latency_ms = 0;
        qwen.jitter_ms = 0;
        qwen.error_rate = 0.0;
        qwen.filter_words.clear();
        let content = Simulated::new("mock", &qwen, analyzer);
        let providers = config.providers.into_iter().map(|(name, p)| (name, ProviderState::new(p))).collect();
        let released = tokio::sync::watch::Sender::new(false);
        let tags = config.tag_prefix.map(|prefix| (prefix, std::sync::Mutex::default()));
        MockServer { inner: Arc::new(Inner { started: Instant::now(), providers, content, released, tags }) }
    }

    /// All endpoints, with this server's state.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/healthz", get(|| async { "ok" }))
            .route("/admin/stats", get(admin_stats))
            .route("/admin/reset", post(admin_reset))
            .route("/admin/outage/{name}", post(admin_outage))
            .route("/admin/release", post(admin_release))
            .route("/admin/calls", get(admin_calls))
            .route("/{name}/v1/chat/completions", post(chat_completions))
            .route("/{name}/v1/messages", post(messages))
            .fallback(fallback)
            .with_state(self.clone())
    }

    /// Serves on `listener` until `shutdown` completes, then lets in-flight requests finish.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use axum::serve::ListenerExt as _;
        let listener = listener.tap_io(|tcp| {
            // Small answers on reused connections: do not let Nagle delay them.
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!("cannot set TCP_NODELAY: {e}");
            }
        });
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown).await
    }

    /// Counters of every provider (the data of `GET /admin/stats`).
    pub fn stats(&self) -> MockStats {
        MockStats { providers: self.inner.providers.iter().map(|(name, p)| (name.clone(), p.stats())).collect() }
    }

    /// Zeroes every counter and rate-limit window (`POST /admin/reset`). Outages go on.
    pub fn reset(&self) {
        for p in self.inner.providers.values() {
            p.reset();
        }
        if let Some((_, counts)) = &self.inner.tags {
            counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        }
    }

    /// Paid calls per provider, stage and tag (`GET /admin/calls`); empty without a
    /// `tag_prefix`.
    pub fn tagged_calls(&self) -> Vec<TaggedCalls> {
        let Some((_, counts)) = &self.inner.tags else { return Vec::new() };
        let counts = counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        counts
            .iter()
            .map(|((provider, stage, outcome, tag), paid)| TaggedCalls {
                provider: provider.clone(),
                stage: (*stage).to_owned(),
                outcome: (*outcome).to_owned(),
                tag: tag.clone(),
                paid: *paid,
            })
            .collect()
    }

    /// Counts a paid call under the request's tag, if it has one.
    fn count_tag(&self, provider: &str, request: &ChatRequest, outcome: &'static str) {
        let Some((prefix, counts)) = &self.inner.tags else { return };
        let Some(at) = request.user.find(prefix.as_str()) else { return };
        let tag: String = request.user[at + prefix.len()..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'))
            .collect();
        let key = (provider.to_owned(), request.stage.as_str(), outcome, tag);
        *counts.lock().unwrap_or_else(std::sync::PoisonError::into_inner).entry(key).or_default() += 1;
    }

    /// Starts an outage of `provider` now, lasting `seconds` (`POST /admin/outage/{name}`).
    /// It replaces an outage started earlier this way; 0 ends it. Configured outages
    /// are unaffected. An unknown provider is ignored.
    pub fn start_outage(&self, provider: &str, seconds: f64) {
        if let Some(p) = self.inner.providers.get(provider) {
            p.start_outage(self.inner.started.elapsed(), seconds);
        }
    }

    /// Lets every held request go, and those that come later (`POST /admin/release`).
    pub fn release(&self) {
        self.inner.released.send_replace(true);
    }

    async fn handle(&self, name: &str, endpoint: Endpoint, headers: &HeaderMap, body: &[u8]) -> Response {
        let Some(p) = self.inner.providers.get(name) else {
            return wire::not_found(endpoint.native_style(), "POST", &endpoint.path(name));
        };
        let style = p.config.style;
        if !endpoint.serves(style) {
            return wire::not_found(style, "POST", &endpoint.path(name));
        }
        if let Err(message) = authorize(style, headers) {
            return wire::unauthorized(style, message);
        }
        let parsed = match endpoint {
            Endpoint::ChatCompletions => wire::parse_chat_completion(body),
            Endpoint::Messages => wire::parse_messages(body),
        };
        let prompt = match parsed {
            Ok(prompt) => prompt,
            Err(detail) => return wire::bad_request(style, &detail),
        };
        p.count(Counter::Requests);
        let now = Instant::now();
        if let Err(reset) = p.admit(now) {
            return wire::rate_limited(style, p.config.requests_per_minute, reset);
        }
        if p.in_outage(now.saturating_duration_since(self.inner.started)) {
            p.count(Counter::Outage);
            return wire::unavailable(style);
        }
        if p.inject_throttle() {
            p.count(Counter::RateLimited);
            return wire::rate_limited(style, p.config.requests_per_minute, std::time::Duration::from_secs(1));
        }
        if let Some(delay) = p.latency() {
            tokio::time::sleep(delay).await;
        }
        if p.inject_error() {
            p.count(Counter::Errors);
            return wire::unavailable(style);
        }
        let request = chat_request(prompt);
        if p.held(&request.system) || p.held(&request.user) {
            let _ = self.inner.released.subscribe().wait_for(|released| *released).await;
        }
        if let Some(word) = p.filtered(&request.system).or_else(|| p.filtered(&request.user)) {
            p.count(Counter::Refused);
            self.count_tag(name, &request, "refused");
            tracing::debug!(provider = name, word, "mock content filter");
            return wire::refusal(style, &request.model, &Usage::estimate(&request, ""));
        }
        match self.inner.content.complete(&request).await {
            // The simulated provider always counts the usage of its answers.
            Outcome::Ok { text, usage: Some(usage) } => {
                p.count(Counter::Ok);
                self.count_tag(name, &request, "ok");
                wire::success(style, &request.model, &text, &usage)
            }
            other => {
                p.count(Counter::Failed);
                tracing::warn!(provider = name, outcome = ?other, "mock provider could not produce an answer");
                wire::internal(style)
            }
        }
    }
}

/// The key check of each style; the error is Anthropic's message (the OpenAI-style
/// message is fixed). Keys are only tested for presence, never logged.
fn authorize(style: Style, headers: &HeaderMap) -> Result<(), &'static str> {
    let present = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| !v.trim().is_empty());
    match style {
        Style::Openai | Style::Dashscope => {
            let bearer = headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
                .is_some_and(|key| !key.trim().is_empty());
            if bearer {
                Ok(())
            } else {
                Err("Incorrect API key provided.")
            }
        }
        Style::Anthropic if !present("x-api-key") => Err("invalid x-api-key"),
        Style::Anthropic if !present("anthropic-version") => Err("anthropic-version: header is required"),
        Style::Anthropic => Ok(()),
    }
}

/// The request for the content generator: a moderation request when the system
/// prompt is ticketflow's moderation prompt (which asks for JSON too), a triage
/// request when JSON was asked for or the system prompt is the triage prompt, else a
/// reply request.
fn chat_request(prompt: wire::Prompt) -> ChatRequest {
    let stage = if prompt.system.contains(MODERATION_SYSTEM) {
        Stage::Moderation
    } else if prompt.json_mode || prompt.system.contains(triage_marker()) {
        Stage::Triage
    } else {
        Stage::Reply
    };
    ChatRequest {
        model: prompt.model,
        stage,
        system: prompt.system,
        user: prompt.user,
        json_mode: prompt.json_mode,
        max_output_tokens: prompt.max_tokens.unwrap_or(4096),
    }
}

/// The opening line of ticketflow's triage prompt ("You classify ..."), taken from
/// the prompt itself; it does not depend on the categories.
fn triage_marker() -> &'static str {
    static MARKER: LazyLock<String> = LazyLock::new(|| {
        let system = triage_prompt::triage_system(&[]);
        system.lines().next().unwrap_or(&system).to_owned()
    });
    &MARKER
}

async fn chat_completions(
    State(server): State<MockServer>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    server.handle(&name, Endpoint::ChatCompletions, &headers, &body).await
}

async fn messages(
    State(server): State<MockServer>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    server.handle(&name, Endpoint::Messages, &headers, &body).await
}

/// Any other path: 404 in the style of the provider named by the first segment, or
/// of the endpoint the path looks like.
async fn fallback(State(server): State<MockServer>, method: Method, uri: Uri) -> Response {
    let path = uri.path();
    let first = path.trim_start_matches('/').split('/').next().unwrap_or("");
    let style = match server.inner.providers.get(first) {
        Some(p) => p.config.style,
        None if path.ends_with("/messages") => Style::Anthropic,
        None => Style::Openai,
    };
    wire::not_found(style, method.as_str(), path)
}

async fn admin_stats(State(server): State<MockServer>) -> Json<MockStats> {
    Json(server.stats())
}

async fn admin_calls(State(server): State<MockServer>) -> Json<Vec<TaggedCalls>> {
    Json(server.tagged_calls())
}

async fn admin_reset(State(server): State<MockServer>) -> StatusCode {
    server.reset();
    StatusCode::NO_CONTENT
}

/// Query of `POST /admin/outage/{name}`.
#[derive(Debug, Deserialize)]
struct OutageQuery {
    seconds: f64,
}

async fn admin_release(State(server): State<MockServer>) -> Response {
    server.release();
    (StatusCode::OK, Json(serde_json::json!({ "released": true }))).into_response()
}

async fn admin_outage(
    State(server): State<MockServer>,
    Path(name): Path<String>,
    Query(q): Query<OutageQuery>,
) -> Response {
    if !server.inner.providers.contains_key(&name) {
        let body = serde_json::json!({ "error": format!("no provider named `{name}`") });
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    }
    if !q.seconds.is_finite() || q.seconds < 0.0 {
        let body = serde_json::json!({ "error": "seconds must be a number of seconds, 0 or more" });
        return (StatusCode::BAD_REQUEST, Json(body)).into_response();
    }
    server.start_outage(&name, q.seconds);
    Json(serde_json::json!({ "provider": name, "seconds": q.seconds })).into_response()
}

/// Spawns a server on 127.0.0.1, port 0, in the current tokio runtime; returns its
/// base address like `http://127.0.0.1:43210` and the handle. It serves until the
/// runtime shuts down. For tests.
pub async fn spawn(config: MockConfig) -> std::io::Result<(String, MockServer)> {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let server = MockServer::new(config);
    let serving = server.clone();
    tokio::spawn(async move {
        if let Err(e) = serving.serve(listener, std::future::pending()).await {
            tracing::warn!("mock provider on {addr} stopped: {e}");
        }
    });
    Ok((format!("http://{addr}"), server))
}

/// Installs SIGINT/SIGTERM handlers (Ctrl-C elsewhere) now and returns a future that
/// completes at the first signal, for [`MockServer::serve`]. Needs a tokio runtime.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {}
                _ = terminate.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
