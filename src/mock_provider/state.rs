//! Run-time state of one mock provider: counters, the sliding 60-second window of
//! accepted requests behind the rate limit, and outages started through the admin
//! endpoint. Counters are atomics; the window is behind a short std mutex.

use crate::triage::keywords::KeywordSet;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::config::MockProvider;

/// Length of the rate-limit window.
const WINDOW: Duration = Duration::from_secs(60);

/// Counters of one provider since start or the last reset.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStats {
    /// Authenticated, well-formed requests (401, 400 and 404 answers are not counted).
    pub requests: u64,
    /// Requests answered with a completion.
    pub ok: u64,
    /// Requests answered 429 because the requests-per-minute limit was used up.
    pub rate_limited: u64,
    /// Requests refused by the content filter.
    pub refused: u64,
    /// Requests answered with an injected transient error (`error_rate`).
    pub errors: u64,
    /// Requests answered with an overload/unavailable error during an outage.
    pub outage: u64,
    /// Requests answered 500 because no content could be generated (e.g. a triage
    /// request without ticket data).
    pub failed: u64,
    /// The most accepted (not 429) requests in any sliding 60-second window.
    pub max_requests_in_any_60s: u64,
    /// The most requests that reached the rate limit in any sliding 60-second
    /// window, the ones answered 429 included: the load the account was sent. Above
    /// `requests_per_minute`, the callers together overran the limit.
    #[serde(default)]
    pub max_sent_in_any_60s: u64,
}

/// Which counter an answer adds to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counter {
    Requests,
    Ok,
    RateLimited,
    Refused,
    Errors,
    Outage,
    Failed,
}

#[derive(Debug, Default)]
struct Window {
    /// Instants of accepted requests in the last 60 seconds, oldest first.
    accepted: VecDeque<Instant>,
    /// The largest `accepted.len()` seen.
    max: u64,
    /// Instants of every request checked against the limit (429s too), oldest first.
    sent: VecDeque<Instant>,
    /// The largest `sent.len()` seen.
    max_sent: u64,
}

/// One provider's configuration and state.
#[derive(Debug)]
pub struct ProviderState {
    /// The provider's configuration.
    pub config: MockProvider,
    /// Filter words, matched like the simulated provider's filter.
    filter: KeywordSet,
    /// Hold words: requests that wait for a release.
    hold: KeywordSet,
    counters: [AtomicU64; 7],
    window: Mutex<Window>,
    /// End of an admin-started outage, in nanoseconds since server start (0: none).
    outage_until_ns: AtomicU64,
}

impl ProviderState {
    /// State for a provider; out-of-range numbers are clamped so nothing can panic later.
    pub fn new(mut config: MockProvider) -> Self {
        config.error_rate = if config.error_rate.is_nan() { 0.0 } else { config.error_rate.clamp(0.0, 1.0) };
        config.throttle_rate = if config.throttle_rate.is_nan() { 0.0 } else { config.throttle_rate.clamp(0.0, 1.0) };
        let filter = KeywordSet::new([("filter", config.filter_words.iter())]);
        let hold = KeywordSet::new([("hold", config.hold_words.iter())]);
        ProviderState {
            config,
            filter,
            hold,
            counters: Default::default(),
            window: Mutex::new(Window::default()),
            outage_until_ns: AtomicU64::new(0),
        }
    }

    fn window(&self) -> MutexGuard<'_, Window> {
        // The critical sections cannot panic; a poisoned lock still holds consistent data.
        self.window.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds one to a counter.
    pub fn count(&self, counter: Counter) {
        self.counters[counter as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Admits a request into the window at `now`, or returns how long until a slot
    /// frees when the limit is used up (counted as rate limited, not admitted).
    pub fn admit(&self, now: Instant) -> Result<(), Duration> {
        let limit = self.config.requests_per_minute as usize;
        let mut w = self.window();
        while w.accepted.front().is_some_and(|&t| now.saturating_duration_since(t) >= WINDOW) {
            w.accepted.pop_front();
        }
        while w.sent.front().is_some_and(|&t| now.saturating_duration_since(t) >= WINDOW) {
            w.sent.pop_front();
        }
        w.sent.push_back(now);
        w.max_sent = w.max_sent.max(w.sent.len() as u64);
        if limit > 0 && w.accepted.len() >= limit {
            let oldest = w.accepted.front().copied().unwrap_or(now);
            drop(w);
            self.count(Counter::RateLimited);
            return Err(WINDOW.saturating_sub(now.saturating_duration_since(oldest)));
        }
        w.accepted.push_back(now);
        w.max = w.max.max(w.accepted.len() as u64);
        Ok(())
    }

    /// Whether `elapsed` since server start falls in a configured or admin-started outage.
    pub fn in_outage(&self, elapsed: Duration) -> bool {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        if ns < self.outage_until_ns.load(Ordering::Relaxed) {
            return true;
        }
        let t = elapsed.as_secs_f64();
        self.config.outages.iter().any(|o| o.start_s <= t && t < o.end_s)
    }

    /// Starts an outage at `elapsed` since server start lasting `seconds`, replacing one
    /// started earlier this way; 0 (or a negative or invalid number) ends it.
    pub fn start_outage(&self, elapsed: Duration, seconds: f64) {
        let length = Duration::try_from_secs_f64(seconds).unwrap_or(Duration::ZERO);
        let until = elapsed.saturating_add(length).as_nanos();
        self.outage_until_ns.store(u64::try_from(until).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The latency to add to one request, if any.
    pub fn latency(&self) -> Option<Duration> {
        let (mean, jitter) = (self.config.latency_ms, self.config.jitter_ms);
        if mean == 0 && jitter == 0 {
            return None;
        }
        let low = mean.saturating_sub(jitter);
        let high = mean.saturating_add(jitter);
        let ms = if high > low { rand::thread_rng().gen_range(low..=high) } else { low };
        (ms > 0).then(|| Duration::from_millis(ms))
    }

    /// Draws whether this request gets an injected transient error.
    pub fn inject_error(&self) -> bool {
        self.config.error_rate > 0.0 && rand::thread_rng().gen_bool(self.config.error_rate)
    }

    /// Draws whether this request gets a 429 although the limit is not reached.
    pub fn inject_throttle(&self) -> bool {
        self.config.throttle_rate > 0.0 && rand::thread_rng().gen_bool(self.config.throttle_rate)
    }

    /// Whether a request with this text waits for a release.
    pub fn held(&self, text: &str) -> bool {
        self.hold.first_match(&text.to_lowercase()).is_some()
    }

    /// The first filter word in a request's text, matched as the simulated provider
    /// does: case-insensitive, whole words in spaced scripts, anywhere in Chinese or
    /// Thai. Callers pass the whole request, system prompt included, as a real
    /// provider's filter reads it.
    pub fn filtered(&self, text: &str) -> Option<String> {
        self.filter.first_match(&text.to_lowercase()).map(str::to_owned)
    }

    /// Zeroes the counters and the window (outages are left as they are).
    pub fn reset(&self) {
        let mut w = self.window();
        w.accepted.clear();
        w.max = 0;
        w.sent.clear();
        w.max_sent = 0;
        for c in &self.counters {
            c.store(0, Ordering::Relaxed);
        }
    }

    /// The counters now.
    pub fn stats(&self) -> ProviderStats {
        let (max, max_sent) = {
            let w = self.window();
            (w.max, w.max_sent)
        };
        let get = |c: Counter| self.counters[c as usize].load(Ordering::Relaxed);
        ProviderStats {
            requests: get(Counter::Requests),
            ok: get(Counter::Ok),
            rate_limited: get(Counter::RateLimited),
            refused: get(Counter::Refused),
            errors: get(Counter::Errors),
            outage: get(Counter::Outage),
            failed: get(Counter::Failed),
            max_requests_in_any_60s: max,
            max_sent_in_any_60s: max_sent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::config::Style;
    use super::*;

    #[test]
    fn window_limits_and_remembers_its_maximum() {
        let p = ProviderState::new(MockProvider { requests_per_minute: 2, ..MockProvider::new(Style::Openai) });
        let t0 = Instant::now();
        assert_eq!(p.admit(t0), Ok(()));
        assert_eq!(p.admit(t0 + Duration::from_secs(10)), Ok(()));
        assert_eq!(p.admit(t0 + Duration::from_secs(20)), Err(Duration::from_secs(40)));
        // The first request leaves the window at t0 + 60s; 10 s, 20 s (429), 60 s and
        // 65 s (429) were all sent within one minute.
        assert_eq!(p.admit(t0 + Duration::from_secs(60)), Ok(()));
        assert_eq!(p.admit(t0 + Duration::from_secs(65)), Err(Duration::from_secs(5)));
        let s = p.stats();
        assert_eq!((s.rate_limited, s.max_requests_in_any_60s, s.max_sent_in_any_60s), (2, 2, 4));
        p.reset();
        assert_eq!(p.stats(), ProviderStats::default());
    }

    #[test]
    fn unlimited_window_counts_the_busiest_minute() {
        let p = ProviderState::new(MockProvider::new(Style::Openai));
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(p.admit(t0 + Duration::from_secs(i * 20)).is_ok());
        }
        // A request leaves the window exactly 60 s after it came, so no window holds four.
        assert_eq!(p.stats().max_requests_in_any_60s, 3);
    }

    #[test]
    fn outages_and_filter() {
        let mut c = MockProvider::new(Style::Dashscope);
        c.outages = vec![super::super::config::Outage { start_s: 1.0, end_s: 2.0 }];
        c.filter_words = vec!["Knife".into()];
        let p = ProviderState::new(c);
        assert!(!p.in_outage(Duration::from_millis(999)));
        assert!(p.in_outage(Duration::from_millis(1500)));
        assert!(!p.in_outage(Duration::from_secs(2)));
        p.start_outage(Duration::from_secs(10), 5.0);
        assert!(p.in_outage(Duration::from_secs(14)));
        assert!(!p.in_outage(Duration::from_secs(15)));
        p.start_outage(Duration::from_secs(16), 0.0);
        assert!(!p.in_outage(Duration::from_secs(16)));
        p.start_outage(Duration::from_secs(16), f64::NAN);
        assert!(!p.in_outage(Duration::from_secs(16)));
        assert_eq!(p.filtered("a KNIFE set").as_deref(), Some("knife"));
        assert_eq!(p.filtered("knives and spoons"), None);
        assert_eq!(p.filtered("pocketknife"), None, "whole words only");
    }
}
