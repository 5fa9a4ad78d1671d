//! Rate-aware admission: how many tickets may be in flight so that what they will
//! ask of each rate-limited provider can be served in the time a ticket may wait.
//!
//! The estimate: for each provider with limits, `share` is the number of calls to
//! it per finished ticket (a moving average over windows of finished tickets,
//! starting at 1, so a new worker admits conservatively), and `rate` the requests
//! per second its limiter serves now (lower while a 429 has us throttled, lower
//! when large prompts make its token limit the binding one). `n` tickets in flight
//! will ask about `n × share` calls of it, served in `n × share / rate` seconds; the
//! allowed in-flight count is the largest `n` that keeps this within the target for
//! every provider. Tickets beyond it wait in the broker, where waiting is durable
//! and costs no deadline. The target is what a unit may wait on our limiters within
//! its hold ([`admission_target`]).
//!
//! It is an estimate, and the dispatcher does not rely on it for correctness: the
//! time a ticket spends waiting on our own limiters does not count against its
//! deadline (see `chain::UnitCalls::deadline`), so an over-admitted ticket waits
//! longer but is not dead-lettered for it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{ProviderHandle, Providers};
use crate::dispatch::Admission;
use crate::observe::{Completion, Observer};

/// Finished tickets per update of the per-provider shares.
const WINDOW: u64 = 16;
/// Weight of the newest window in the moving average.
const ALPHA: f64 = 0.3;
/// The least admission target: a configuration without slack still admits some work.
const MIN_TARGET: Duration = Duration::from_millis(500);
/// Shares below this count as this: a provider that is rarely used still has a bound.
const MIN_SHARE: f64 = 0.02;

struct Limited {
    name: String,
    handle: Arc<ProviderHandle>,
}

struct Shares {
    finished: u64,
    finished_at_update: u64,
    requested_at_update: Vec<u64>,
    share: Vec<f64>,
}

/// Admission from the providers' rate limits; also an [`Observer`] of completions,
/// which keep its per-provider shares current.
pub struct RateAdmission {
    limited: Vec<Limited>,
    target: Duration,
    shares: Mutex<Shares>,
}

impl RateAdmission {
    /// `target`: how long the in-flight tickets' demand may take to serve (the
    /// worker uses [`admission_target`]).
    pub fn new(providers: &Providers, target: Duration) -> Self {
        let limited: Vec<Limited> = providers
            .by_name
            .iter()
            .filter(|(_, h)| h.limits.is_some())
            .map(|(name, handle)| Limited { name: name.clone(), handle: handle.clone() })
            .collect();
        let requested_at_update = limited.iter().map(requested).collect();
        let share = vec![1.0; limited.len()];
        RateAdmission {
            limited,
            target,
            shares: Mutex::new(Shares { finished: 0, finished_at_update: 0, requested_at_update, share }),
        }
    }

    /// Per provider: its name, calls per ticket, and requests per second now.
    pub fn estimates(&self) -> Vec<(String, f64, f64)> {
        let Ok(shares) = self.shares.lock() else { return Vec::new() };
        self.limited.iter().zip(&shares.share).map(|(l, share)| (l.name.clone(), *share, rate(l))).collect()
    }
}

/// The admission target of a worker. A unit may wait on our own limiters only for
/// `limits.limiter_wait_ms` (its hold less its deadline, see `pipeline::unit_hold`),
/// and it may wait twice, for its triage call and for its reply call: so the target
/// is half that slack, and never more than half the ticket deadline.
pub fn admission_target(settings: &crate::settings::Settings) -> Duration {
    let deadline = Duration::from_millis(settings.limits.ticket_deadline_ms);
    let slack = crate::pipeline::unit_hold(settings).saturating_sub(deadline);
    (deadline / 2).min(slack / 2).max(MIN_TARGET)
}

fn requested(l: &Limited) -> u64 {
    l.handle.limits.as_ref().map_or(0, |limits| limits.requested().0)
}

fn rate(l: &Limited) -> f64 {
    l.handle.limits.as_ref().map_or(f64::INFINITY, |limits| limits.requests_per_second())
}

impl Admission for RateAdmission {
    fn allowed_in_flight(&self, max: usize) -> usize {
        if self.limited.is_empty() {
            return max.max(1);
        }
        let Ok(shares) = self.shares.lock() else { return max.max(1) };
        let target = self.target.as_secs_f64();
        let mut allowed = max as f64;
        for (l, share) in self.limited.iter().zip(&shares.share) {
            allowed = allowed.min(target * rate(l) / share.max(MIN_SHARE));
        }
        (allowed.floor() as usize).clamp(1, max.max(1))
    }
}

impl Observer for RateAdmission {
    fn completed(&self, _completion: &Completion) {
        if self.limited.is_empty() {
            return;
        }
        let Ok(mut s) = self.shares.lock() else { return };
        s.finished += 1;
        let finished = s.finished - s.finished_at_update;
        if finished < WINDOW {
            return;
        }
        for (i, l) in self.limited.iter().enumerate() {
            let now = requested(l);
            let calls = now.saturating_sub(s.requested_at_update[i]) as f64 / finished as f64;
            s.share[i] = (1.0 - ALPHA) * s.share[i] + ALPHA * calls;
            s.requested_at_update[i] = now;
        }
        s.finished_at_update = s.finished;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Instant;

    use super::*;
    use crate::providers::{ChatRequest, Outcome, Provider};

    struct Nothing;

    #[async_trait::async_trait]
    impl Provider for Nothing {
        async fn complete(&self, _request: &ChatRequest) -> Outcome {
            Outcome::Ok { text: String::new(), usage: None }
        }
    }

    fn providers(rpm: u32) -> Providers {
        let mut settings = crate::policy::load_from(None, &BTreeMap::new()).unwrap();
        settings.limits.rate_limit_headroom = 0.0;
        for p in settings.providers.values_mut() {
            p.requests_per_minute = rpm;
            p.tokens_per_minute = 100_000_000;
        }
        let adapters: BTreeMap<String, Arc<dyn Provider>> =
            [("qwen".to_owned(), Arc::new(Nothing) as Arc<dyn Provider>), ("mistral".to_owned(), Arc::new(Nothing))]
                .into();
        Providers::from_adapters(adapters, &settings, &["qwen", "mistral"])
    }

    #[tokio::test]
    async fn admission_follows_rate_and_observed_shares() {
        let providers = providers(600); // 10 requests/s each
        let admission = RateAdmission::new(&providers, Duration::from_secs(3));
        // No history: one call per ticket assumed for each provider: 3 s × 10/s.
        assert_eq!(admission.allowed_in_flight(256), 30);
        assert_eq!(admission.allowed_in_flight(8), 8, "never above the configured budget");
        // Every ticket calls qwen twice and mistral never.
        let qwen = providers.get("qwen").unwrap().limits.as_ref().unwrap();
        let far = Instant::now() + Duration::from_secs(60);
        for _ in 0..40 {
            for _ in 0..WINDOW {
                for _ in 0..2 {
                    let _ = tokio::time::timeout(Duration::ZERO, qwen.acquire(1, far)).await;
                }
                admission.completed(&Completion::nothing(crate::observe::Handled::Duplicate));
            }
        }
        let estimates = admission.estimates();
        let share = |name: &str| estimates.iter().find(|e| e.0 == name).unwrap().1;
        assert!((share("qwen") - 2.0).abs() < 0.05, "{estimates:?}");
        assert!(share("mistral") < 0.05, "{estimates:?}");
        // qwen binds: 3 s × 10/s ÷ 2 calls per ticket.
        assert_eq!(admission.allowed_in_flight(256), 15);
    }

    #[test]
    fn the_target_is_half_the_wait_a_unit_has_within_its_hold() {
        let mut settings = crate::policy::load_from(None, &BTreeMap::new()).unwrap();
        // Shipped: a unit may wait 15 s on our limiters beyond its 120 s deadline,
        // 7.5 s for each of its two calls.
        assert_eq!((settings.limits.limiter_wait_ms, settings.limits.ticket_deadline_ms), (15_000, 120_000));
        assert_eq!(admission_target(&settings), Duration::from_millis(7_500));
        // A short deadline: half the deadline binds.
        settings.limits.ticket_deadline_ms = 3_000;
        assert_eq!(admission_target(&settings), Duration::from_millis(1_500));
        // No slack at all still admits something.
        settings.limits.limiter_wait_ms = 0;
        assert_eq!(admission_target(&settings), MIN_TARGET);
    }

    #[test]
    fn without_limited_providers_the_budget_is_the_configured_one() {
        let settings = crate::policy::load_from(None, &BTreeMap::new()).unwrap();
        let adapters: BTreeMap<String, Arc<dyn Provider>> = [("qwen".to_owned(), Arc::new(Nothing) as _)].into();
        let providers = Providers::from_adapters(adapters, &settings, &[]);
        assert_eq!(RateAdmission::new(&providers, Duration::from_secs(1)).allowed_in_flight(256), 256);
    }
}
