//! HTTP plumbing shared by the real adapters: one reqwest client per provider
//! (connection reuse, rustls, timeouts), API keys that never print, transport error
//! classification, and the rate-limit headers providers use to say when to retry.

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};

use super::Outcome;
use crate::settings::ProviderSettings;

/// An API key. Its `Debug` and `Display` never show the key.
#[derive(Clone)]
pub struct ApiKey(String);

impl ApiKey {
    /// Reads the key from the environment variable named in the provider's settings.
    pub fn from_env(provider: &str, settings: &ProviderSettings) -> Result<Self, super::BuildError> {
        let var = settings.api_key_env.trim();
        match std::env::var(var) {
            Ok(key) if !key.trim().is_empty() => Ok(ApiKey(key.trim().to_owned())),
            _ => Err(super::BuildError::MissingKey { name: provider.to_owned(), env: var.to_owned() }),
        }
    }

    /// A header value carrying the key (e.g. `Bearer <key>`), marked sensitive so that
    /// HTTP libraries never print it. Built once per provider, not per call.
    pub fn header(&self, prefix: &str) -> Result<HeaderValue, super::BuildError> {
        let mut value = HeaderValue::from_str(&format!("{prefix}{}", self.0))
            .map_err(|_| super::BuildError::Client("the API key contains characters not allowed in a header".into()))?;
        value.set_sensitive(true);
        Ok(value)
    }
}

/// Parses an endpoint URL once, at start-up.
pub fn endpoint(base_url: &str, path: &str) -> Result<reqwest::Url, super::BuildError> {
    let url = format!("{}/{path}", base_url.trim_end_matches('/'));
    reqwest::Url::parse(&url).map_err(|e| super::BuildError::Client(format!("invalid base_url {base_url}: {e}")))
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(REDACTED)")
    }
}

/// One client per provider: its own connection pool and timeouts.
pub fn client(settings: &ProviderSettings) -> Result<reqwest::Client, super::BuildError> {
    let timeout = Duration::from_millis(settings.timeout_ms.max(1));
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .user_agent(concat!("ticketflow/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| super::BuildError::Client(e.to_string()))
}

/// A response as received: status, headers and the whole body.
#[derive(Debug)]
pub struct Received {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: bytes::Bytes,
}

/// Sends a prepared request and reads the whole body. Transport failures are
/// already classified: a refused connection never reached the provider (nothing
/// billed), a timeout or a reset mid-response did.
pub async fn send(request: reqwest::RequestBuilder) -> Result<Received, Outcome> {
    let mut response = request.send().await.map_err(|e| transport(&e))?;
    let status = response.status().as_u16();
    let headers = std::mem::take(response.headers_mut());
    let body = response.bytes().await.map_err(|e| transport(&e))?;
    Ok(Received { status, headers, body })
}

fn transport(e: &reqwest::Error) -> Outcome {
    // reqwest's messages name the URL but never headers, so the key cannot leak here.
    let detail = format!("transport: {}", crate::error_chain(e));
    if e.is_timeout() {
        Outcome::Transient { detail, timeout: true, reached: true }
    } else if e.is_connect() {
        Outcome::Transient { detail, timeout: false, reached: false }
    } else {
        Outcome::Transient { detail, timeout: false, reached: true }
    }
}

/// Classification by status alone, for bodies that say nothing more specific.
pub fn by_status(status: u16, headers: &HeaderMap, detail: String) -> Outcome {
    match status {
        429 => Outcome::RateLimited { retry_after: retry_after(headers), detail },
        408 | 409 | 425 | 500..=599 => {
            Outcome::Transient { detail, timeout: status == 408 || status == 504, reached: true }
        }
        _ => Outcome::Permanent { detail },
    }
}

/// Parses a success body. A 200 whose body is cut short or is not JSON usually means
/// a proxy or a dropped connection, so it is transient: worth another try.
pub fn parse_success<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Outcome> {
    serde_json::from_slice(body).map_err(|e| transient(format!("unreadable response ({e}): {}", excerpt(body))))
}

/// A transient failure of a call that reached the provider.
pub fn transient(detail: String) -> Outcome {
    Outcome::Transient { detail, timeout: false, reached: true }
}

/// A short, single-line excerpt of a body for error messages (HTML pages from
/// proxies included).
pub fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let one_line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut end = one_line.len().min(200);
    while !one_line.is_char_boundary(end) {
        end -= 1;
    }
    if end < one_line.len() {
        format!("{}…", &one_line[..end])
    } else {
        one_line
    }
}

/// When the provider says to retry: `retry-after-ms`, `retry-after` (seconds or an
/// HTTP date), or OpenAI's `x-ratelimit-reset-requests` / `-tokens` durations
/// ("6m0s", "1s", "12ms"), whichever is longest.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim);
    let mut best: Option<Duration> = None;
    let mut consider = |d: Option<Duration>| {
        if let Some(d) = d {
            best = Some(best.map_or(d, |b| b.max(d)));
        }
    };
    consider(get("retry-after-ms").and_then(|v| v.parse::<f64>().ok()).and_then(secs_from_ms));
    consider(get("retry-after").and_then(|v| {
        v.parse::<f64>().ok().and_then(|s| secs_from_ms(s * 1000.0)).or_else(|| {
            let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
            (at.with_timezone(&chrono::Utc) - chrono::Utc::now()).to_std().ok()
        })
    }));
    consider(get("x-ratelimit-reset-requests").and_then(parse_go_duration));
    consider(get("x-ratelimit-reset-tokens").and_then(parse_go_duration));
    best
}

fn secs_from_ms(ms: f64) -> Option<Duration> {
    (ms.is_finite() && ms >= 0.0).then(|| Duration::from_secs_f64(ms / 1000.0))
}

/// Parses Go-style durations as OpenAI sends them: "6m0s", "1s", "12ms", "1.5s", "2h3m".
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    let mut total = 0.0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_end == 0 {
            return None;
        }
        let value: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 0.001,
            "us" | "µs" => 0.000_001,
            "ns" => 0.000_000_001,
            _ => return None,
        };
        total += value * factor;
        rest = &rest[unit_end..];
    }
    secs_from_ms(total * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_go_duration("2h3m"), Some(Duration::from_secs(7380)));
        for bad in ["", "s", "5", "5x", "-1s"] {
            assert_eq!(parse_go_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn retry_after_takes_the_longest_hint() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        h.insert("x-ratelimit-reset-requests", HeaderValue::from_static("6m0s"));
        h.insert("x-ratelimit-reset-tokens", HeaderValue::from_static("12ms"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(360)));
        let mut h = HeaderMap::new();
        h.insert("retry-after-ms", HeaderValue::from_static("250"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(250)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn api_key_never_prints() {
        let key = ApiKey("sk-very-secret".into());
        assert!(!format!("{key:?}").contains("secret"));
        let header = key.header("Bearer ").unwrap();
        assert!(header.is_sensitive());
        assert!(!format!("{header:?}").contains("secret"));
    }

    #[test]
    fn excerpt_flattens_and_cuts() {
        let html = format!("<html>\n<body>\n<h1>502 Bad Gateway</h1>{}</body></html>", "x".repeat(500));
        let e = excerpt(html.as_bytes());
        assert!(e.starts_with("<html> <body> <h1>502 Bad Gateway</h1>"));
        assert!(e.chars().count() <= 201);
    }
}
