//! Per-provider rate limits, enforced with governor before each call: requests per
//! minute and tokens per minute (estimated from the prompt plus the output budget,
//! corrected upward from reported usage).
//!
//! - Waiting is FIFO (one waiter at a time polls governor, the rest queue on a fair
//!   mutex) and bounded by the caller's limit: the unit's hold less the time its call
//!   still needs (`chain`; the wait moves the ticket's deadline, it does not use it
//!   up). The number of waiting calls is bounded by the in-flight budget (admission),
//!   so a throttled provider slows intake down instead of piling up work.
//! - The GCRA burst is one request, and the rate keeps a small headroom below the
//!   account limit, so no sliding 60-second window ever holds more than the limit.
//! - A 429 from the provider while we press on its limit (half our rate used over
//!   the last ten seconds) pauses every call to it for the
//!   provider's retry-after and halves the rate, at most once a second; the rate
//!   recovers step by step after a quiet minute. A 429 while we send far below our
//!   rate is the provider shedding load, not our pace: only that call backs off
//!   (`chain`), or a 5% share of random 429s would pause and throttle every call.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use governor::{DefaultDirectRateLimiter, Quota};

/// Lowest share of the configured rate a provider can be throttled down to.
const MIN_FACTOR: f64 = 0.125;
/// How long without a 429 before the rate steps back up.
const RECOVERY_INTERVAL: Duration = Duration::from_secs(60);
/// Pause after a 429 that came without a retry-after.
const DEFAULT_PAUSE: Duration = Duration::from_secs(1);
/// The span over which our own sending rate is measured when a 429 comes.
const RECENT: Duration = Duration::from_secs(10);
/// The least time between two decreases of the rate.
const DECREASE_INTERVAL: Duration = Duration::from_secs(1);

/// Why no permit was granted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("rate limit: no capacity before the ticket's deadline")]
pub struct WouldMissDeadline;

struct Limiters {
    requests: DefaultDirectRateLimiter,
    tokens: DefaultDirectRateLimiter,
    token_burst: NonZeroU32,
}

struct Throttle {
    factor: f64,
    /// This process's share (0..1) of the account's limits: 1 alone, set by the
    /// account coordination of a worker (`providers::account`) among replicas.
    share: f64,
    paused_until: Option<Instant>,
    /// A pause caused by a 429 seen here, for the coordination to pass on to the
    /// other replicas (taken once).
    pause_to_share: Option<Instant>,
    last_change: Instant,
}

impl Throttle {
    fn effective(&self) -> f64 {
        self.factor * self.share
    }
}

/// The limits of one provider.
pub struct ProviderLimits {
    name: String,
    requests_per_minute: f64,
    tokens_per_minute: f64,
    limiters: RwLock<Arc<Limiters>>,
    throttle: Mutex<Throttle>,
    turn: tokio::sync::Mutex<()>,
    /// Requests and estimated tokens asked for since start (admission's demand figures).
    requested: AtomicU64,
    tokens_requested: AtomicU64,
    /// Calls waiting for a permit now.
    waiting: AtomicU64,
    /// Wakes the waiting calls when the limiter is replaced.
    rebuilt: tokio::sync::Notify,
    /// Permits granted in each of the last ten seconds.
    granted: Mutex<Recent>,
    created: Instant,
}

/// Counts per second over the last `RECENT` (ten one-second buckets), so that
/// measuring our own rate costs the same at any rate.
#[derive(Default)]
struct Recent {
    buckets: [u64; 10],
    /// Seconds since the limits were created, of the newest bucket.
    second: u64,
}

impl Recent {
    /// Moves the window to `second`, emptying the buckets it passes.
    fn advance(&mut self, second: u64) {
        let n = self.buckets.len() as u64;
        for s in (self.second + 1).max(second.saturating_sub(n - 1))..=second {
            self.buckets[(s % n) as usize] = 0;
        }
        self.second = self.second.max(second);
    }

    fn total(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

impl ProviderLimits {
    /// `headroom` is the share of each limit left unused (e.g. 0.02).
    pub fn new(name: &str, requests_per_minute: u32, tokens_per_minute: u64, headroom: f64) -> Self {
        let keep = (1.0 - headroom).clamp(0.5, 1.0);
        let rpm = (f64::from(requests_per_minute.max(1)) * keep).max(1.0);
        let tpm = (tokens_per_minute.max(1) as f64 * keep).max(1.0);
        ProviderLimits {
            name: name.to_owned(),
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            limiters: RwLock::new(Arc::new(build(rpm, tpm))),
            throttle: Mutex::new(Throttle {
                factor: 1.0,
                share: 1.0,
                paused_until: None,
                pause_to_share: None,
                last_change: Instant::now(),
            }),
            turn: tokio::sync::Mutex::new(()),
            requested: AtomicU64::new(0),
            tokens_requested: AtomicU64::new(0),
            waiting: AtomicU64::new(0),
            rebuilt: tokio::sync::Notify::new(),
            granted: Mutex::new(Recent::default()),
            created: Instant::now(),
        }
    }

    /// Whether we press on the provider's limit: half the rate we may use taken over
    /// the last `RECENT` (or since start). Calls waiting are no sign: a pause makes
    /// them wait whatever the pace.
    fn pressing(&self, effective: f64) -> bool {
        let elapsed = self.created.elapsed();
        let Ok(mut granted) = self.granted.lock() else { return true };
        granted.advance(elapsed.as_secs());
        let span = elapsed.min(RECENT).as_secs_f64().max(1.0);
        let allowed = self.requests_per_minute * effective / 60.0 * span;
        granted.total() as f64 >= 0.5 * allowed
    }

    fn note_granted(&self) {
        let second = self.created.elapsed().as_secs();
        if let Ok(mut granted) = self.granted.lock() {
            granted.advance(second);
            granted.buckets[(second % 10) as usize] += 1;
        }
    }

    /// Waits for a request slot and `tokens` of token budget, at most until `deadline`.
    /// Returns how long it waited.
    pub async fn acquire(&self, tokens: u64, deadline: Instant) -> Result<Duration, WouldMissDeadline> {
        let started = Instant::now();
        self.requested.fetch_add(1, Ordering::Relaxed);
        self.tokens_requested.fetch_add(tokens, Ordering::Relaxed);
        let _waiting = Waiting::new(&self.name, &self.waiting);
        let wait = async {
            let _turn = self.turn.lock().await;
            // A change of rate (a share, a 429) replaces the limiter and a pause may
            // begin (a 429 here or at another replica): a call waiting on the old
            // limiter starts again, pause first.
            loop {
                let rebuilt = self.rebuilt.notified();
                tokio::pin!(rebuilt);
                rebuilt.as_mut().enable();
                if let Some(until) = self.paused_until() {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until.into()) => {}
                        _ = rebuilt => {}
                    }
                    continue;
                }
                let limiters = self.current();
                let n = clamp_tokens(tokens, limiters.token_burst);
                let permit = async {
                    limiters.requests.until_ready().await;
                    // n never exceeds the burst, so capacity is always sufficient.
                    let _ = limiters.tokens.until_n_ready(n).await;
                };
                tokio::select! {
                    _ = permit => break,
                    _ = rebuilt => {}
                }
            }
        };
        match tokio::time::timeout_at(deadline.into(), wait).await {
            Ok(()) => {
                self.note_granted();
                Ok(started.elapsed())
            }
            Err(_) => Err(WouldMissDeadline),
        }
    }

    /// Accounts for tokens beyond the estimate (best effort: the budget cannot go
    /// into debt, so an overrun is only charged while capacity remains).
    pub fn correct(&self, estimated: u64, actual: u64) {
        if actual > estimated {
            let limiters = self.current();
            let _ = limiters.tokens.check_n(clamp_tokens(actual - estimated, limiters.token_burst));
        }
    }

    /// The provider answered 429. Pressing on its limit: pause every call for
    /// `retry_after` and halve the rate (at most once a second). Far below our rate:
    /// nothing here (the provider shed load; the call backs off on its own).
    pub fn on_rate_limited(&self, retry_after: Option<Duration>) {
        let effective = self.throttle.lock().map(|t| t.effective()).unwrap_or(1.0);
        if !self.pressing(effective) {
            tracing::info!(provider = %self.name, "429 while sending far below our rate: the provider shed load; only the call backs off");
            return;
        }
        let Ok(mut t) = self.throttle.lock() else { return };
        let pause = retry_after.unwrap_or(DEFAULT_PAUSE);
        let until = Instant::now() + pause;
        t.paused_until = Some(t.paused_until.map_or(until, |u| u.max(until)));
        t.pause_to_share = t.paused_until;
        self.rebuilt.notify_waiters();
        let factor = (t.factor / 2.0).max(MIN_FACTOR);
        let decreased_lately = t.factor < 1.0 && t.last_change.elapsed() < DECREASE_INTERVAL;
        if factor < t.factor && !decreased_lately {
            t.factor = factor;
            t.last_change = Instant::now();
            self.rebuild(t.effective());
            tracing::warn!(provider = %self.name, factor, pause_ms = pause.as_millis() as u64, "provider rate limited us; lowering our rate");
        }
    }

    /// Pauses every call until `until` (a 429 another replica saw), the one already
    /// waiting for its permit included.
    pub fn pause_until(&self, until: Instant) {
        if let Ok(mut t) = self.throttle.lock() {
            if t.paused_until.is_none_or(|u| u < until) {
                t.paused_until = Some(until);
                self.rebuilt.notify_waiters();
            }
        }
    }

    /// The end of a pause a 429 caused here, once, for the other replicas.
    pub fn take_pause_to_share(&self) -> Option<Instant> {
        self.throttle.lock().ok()?.pause_to_share.take()
    }

    /// Gives back a pause taken to share whose heartbeat was not heard.
    pub fn share_pause_again(&self, until: Instant) {
        if let Ok(mut t) = self.throttle.lock() {
            if t.pause_to_share.is_none_or(|u| u < until) {
                t.pause_to_share = Some(until);
            }
        }
    }

    /// This process's share of the account's limits.
    pub fn share(&self) -> f64 {
        self.throttle.lock().map(|t| t.share).unwrap_or(1.0)
    }

    /// Sets this process's share of the account's limits (0..1). The limiter is
    /// rebuilt empty, so a change never lets a burst through.
    pub fn set_share(&self, share: f64) {
        let Ok(mut t) = self.throttle.lock() else { return };
        let share = share.clamp(0.0, 1.0);
        if (share - t.share).abs() < f64::EPSILON {
            return;
        }
        t.share = share;
        self.rebuild(t.effective());
    }

    /// Requests per second the configured limit allows (less the headroom), whatever
    /// the share or throttling.
    pub fn requests_per_second_configured(&self) -> f64 {
        self.requests_per_minute / 60.0
    }

    /// Calls waiting for a permit now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Requests asked for since start, and their estimated tokens.
    pub fn requested(&self) -> (u64, u64) {
        (self.requested.load(Ordering::Relaxed), self.tokens_requested.load(Ordering::Relaxed))
    }

    /// Requests per second this provider serves now: its request rate, or its token
    /// rate at the average call size seen so far, whichever is lower; lowered while a
    /// 429 has us throttled.
    pub fn requests_per_second(&self) -> f64 {
        let factor = self.throttle.lock().map(|t| t.effective()).unwrap_or(1.0);
        let (requests, tokens) = self.requested();
        let by_requests = self.requests_per_minute * factor / 60.0;
        if requests == 0 || tokens == 0 {
            return by_requests;
        }
        let per_call = tokens as f64 / requests as f64;
        by_requests.min(self.tokens_per_minute * factor / 60.0 / per_call)
    }

    /// The rate currently allowed, as a share of the configured limit.
    #[cfg(test)]
    pub fn factor(&self) -> f64 {
        self.throttle.lock().map(|t| t.factor).unwrap_or(1.0)
    }

    fn paused_until(&self) -> Option<Instant> {
        let mut t = self.throttle.lock().ok()?;
        let now = Instant::now();
        if t.factor < 1.0 && now.duration_since(t.last_change) >= RECOVERY_INTERVAL {
            t.factor = (t.factor * 2.0).min(1.0);
            t.last_change = now;
            self.rebuild(t.effective());
            tracing::info!(provider = %self.name, factor = t.factor, "provider recovered; raising our rate");
        }
        t.paused_until.filter(|u| *u > now)
    }

    fn current(&self) -> Arc<Limiters> {
        match self.limiters.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// A new limiter at `factor` of the configured rates, with its one-request burst
    /// already spent: the first call after a change waits a full interval, so no
    /// change of rate lets more through than the new rate allows.
    fn rebuild(&self, factor: f64) {
        let fresh = build(self.requests_per_minute * factor, self.tokens_per_minute * factor);
        let _ = fresh.requests.check();
        let _ = fresh.tokens.check_n(fresh.token_burst);
        let fresh = Arc::new(fresh);
        match self.limiters.write() {
            Ok(mut l) => *l = fresh,
            Err(poisoned) => *poisoned.into_inner() = fresh,
        }
        self.rebuilt.notify_waiters();
    }
}

/// Counts a call as waiting (the provider's count and its gauge) for as long as it
/// waits (a wait given up at the deadline or cancelled with its ticket included).
struct Waiting<'a>(&'a str, &'a AtomicU64);

impl<'a> Waiting<'a> {
    fn new(provider: &'a str, count: &'a AtomicU64) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        crate::telemetry::limiter_waiting(provider, 1.0);
        Waiting(provider, count)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.1.fetch_sub(1, Ordering::Relaxed);
        crate::telemetry::limiter_waiting(self.0, -1.0);
    }
}

fn build(rpm: f64, tpm: f64) -> Limiters {
    let one = NonZeroU32::MIN;
    let per_request = Duration::from_secs_f64(60.0 / rpm.max(0.001));
    let per_token = Duration::from_secs_f64(60.0 / tpm.max(0.001));
    // A second's worth of tokens, and at least a large call's worth, may go at once.
    let token_burst = NonZeroU32::new(((tpm / 60.0).max(8192.0).min(tpm.max(1.0))) as u32).unwrap_or(one);
    let quota = |period: Duration, burst: NonZeroU32| {
        Quota::with_period(period.max(Duration::from_nanos(1))).map(|q| q.allow_burst(burst))
    };
    // with_period only fails for a zero period, which max() rules out.
    let requests = quota(per_request, one).unwrap_or_else(|| Quota::per_second(one));
    let tokens = quota(per_token, token_burst).unwrap_or_else(|| Quota::per_second(token_burst));
    Limiters {
        requests: DefaultDirectRateLimiter::direct(requests),
        tokens: DefaultDirectRateLimiter::direct(tokens),
        token_burst,
    }
}

fn clamp_tokens(tokens: u64, burst: NonZeroU32) -> NonZeroU32 {
    NonZeroU32::new(tokens.clamp(1, u64::from(burst.get())) as u32).unwrap_or(NonZeroU32::MIN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn requests_are_spaced_at_the_configured_rate() {
        // 1,200 rpm with 0 headroom: one request per 50 ms.
        let l = ProviderLimits::new("p", 1200, 10_000_000, 0.0);
        let deadline = Instant::now() + Duration::from_secs(10);
        let started = Instant::now();
        for _ in 0..6 {
            l.acquire(10, deadline).await.unwrap();
        }
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(240), "5 gaps of 50 ms, got {elapsed:?}");
    }

    #[tokio::test]
    async fn a_call_waiting_when_its_share_rises_goes_at_the_new_rate() {
        // 60 requests per minute with no share: nothing would pass for hours.
        let l = Arc::new(ProviderLimits::new("p", 60, 10_000_000, 0.0));
        l.set_share(0.0);
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.acquire(1, Instant::now() + Duration::from_secs(30)).await })
        };
        while l.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        let raised = Instant::now();
        l.set_share(1.0);
        // The new limiter starts empty: one interval (1 s at 60 per minute).
        waiter.await.unwrap().unwrap();
        assert!(raised.elapsed() < Duration::from_secs(3), "waited {:?} after the raise", raised.elapsed());
    }

    #[tokio::test]
    async fn waiting_past_the_deadline_is_refused() {
        let l = ProviderLimits::new("p", 1, 10_000_000, 0.0);
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(l.acquire(1, soon).await.is_ok(), "the first request goes at once");
        assert_eq!(l.acquire(1, soon).await, Err(WouldMissDeadline));
    }

    /// Takes permits as fast as they come for `span`: pressing on the limit.
    async fn press(l: &ProviderLimits, span: Duration) {
        let until = Instant::now() + span;
        while Instant::now() < until {
            l.acquire(1, until + Duration::from_secs(1)).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_429_while_pressing_on_the_limit_pauses_and_halves_the_rate_once_a_second() {
        let l = ProviderLimits::new("p", 600, 10_000_000, 0.0);
        press(&l, Duration::from_millis(1100)).await;
        l.on_rate_limited(Some(Duration::from_millis(300)));
        assert_eq!(l.factor(), 0.5);
        let started = Instant::now();
        l.acquire(1, Instant::now() + Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250), "paused for the retry-after");
        for _ in 0..10 {
            l.on_rate_limited(None);
        }
        assert_eq!(l.factor(), 0.5, "a burst of 429s is one signal");
        tokio::time::sleep(DECREASE_INTERVAL).await;
        press(&l, Duration::from_millis(1100)).await;
        l.on_rate_limited(None);
        assert_eq!(l.factor(), 0.25);
    }

    #[tokio::test]
    async fn a_429_while_sending_far_below_the_rate_neither_pauses_nor_lowers_it() {
        let l = ProviderLimits::new("p", 60_000, 10_000_000, 0.0);
        for _ in 0..5 {
            l.acquire(1, Instant::now() + Duration::from_secs(5)).await.unwrap();
            l.on_rate_limited(Some(Duration::from_secs(30)));
        }
        assert_eq!(l.factor(), 1.0);
        let started = Instant::now();
        l.acquire(1, Instant::now() + Duration::from_secs(5)).await.unwrap();
        assert!(started.elapsed() < Duration::from_millis(500), "no pause: {:?}", started.elapsed());
        assert_eq!(l.take_pause_to_share(), None, "nothing for the other replicas either");
    }
}
