//! A model chain: try each `provider/model` in order, retrying transient and
//! rate-limited outcomes with exponential backoff and full jitter inside the
//! ticket's deadline, then failing over to the next model. Every call that reached
//! a provider leaves a [`CostRecord`]. A provider that refused the ticket is skipped
//! for the rest of that ticket, so no refusal is paid for twice.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use rand::Rng;

use super::breaker::Admission;
use super::pricing::{Price, PriceTable};
use super::{estimate_tokens, ChatRequest, Outcome, Providers, Usage};
use crate::settings::RetrySettings;
use crate::ticket::{now_rfc3339, CallOutcome, CostRecord, Stage, SCHEMA_VERSION};

/// Per-ticket state shared by every call made for one unit of work.
#[derive(Debug)]
pub struct UnitCalls {
    pub ticket_id: String,
    pub unit_id: String,
    /// The time budget of the unit's calls and retries. Time spent waiting on our
    /// own rate limiters moves it later: pacing is ours, not the ticket's fault.
    pub deadline: Instant,
    /// The latest the unit may be held at all (well inside its ledger lease): a
    /// rate-limiter wait never runs past it, nor a deadline moved by such waits.
    pub hold_until: Instant,
    /// Cost records of every call that reached a provider, in order.
    pub costs: Vec<CostRecord>,
    /// Providers that refused this ticket: skipped from now on.
    pub refused_providers: BTreeSet<String>,
    /// `provider/model` of each refusal.
    pub refused_by: Vec<String>,
}

impl UnitCalls {
    pub fn new(ticket_id: &str, unit_id: &str, deadline: Instant) -> Self {
        UnitCalls {
            ticket_id: ticket_id.to_owned(),
            unit_id: unit_id.to_owned(),
            deadline,
            hold_until: deadline,
            costs: Vec::new(),
            refused_providers: BTreeSet::new(),
            refused_by: Vec::new(),
        }
    }

    /// Lets limiter waits move the deadline up to `hold_until`.
    pub fn with_hold_until(mut self, hold_until: Instant) -> Self {
        self.hold_until = hold_until.max(self.deadline);
        self
    }

    pub fn total_cost(&self) -> f64 {
        self.costs.iter().map(|c| c.cost_usd).sum()
    }
}

/// How a chain ended.
#[derive(Debug, Clone, PartialEq)]
pub enum ChainResult {
    Answered {
        provider: String,
        model: String,
        text: String,
        attempts: u32,
    },
    /// A provider's content filter refused (now, or earlier for every provider left).
    Refused {
        attempts: u32,
    },
    /// Only transient failures (or the deadline) stood in the way: an outage.
    Exhausted {
        errors: Vec<String>,
        attempts: u32,
    },
    /// Every model failed permanently.
    Rejected {
        errors: Vec<String>,
        attempts: u32,
    },
}

/// The `outcome` label of a call in the provider request metrics.
fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Ok { .. } => "ok",
        Outcome::Refused { .. } => "refused",
        Outcome::RateLimited { .. } => "rate_limited",
        Outcome::Transient { reached: false, .. } => "unreachable",
        Outcome::Transient { timeout: true, .. } => "timeout",
        Outcome::Transient { .. } | Outcome::Permanent { .. } => "error",
    }
}

/// One provider call, for its cost record.
#[derive(Clone, Copy)]
struct Call<'a> {
    stage: Stage,
    provider: &'a str,
    model: &'a str,
    price: Price,
    request: &'a ChatRequest,
    latency_ms: u64,
}

/// What a chain call needs besides the unit's state.
pub struct ChainRunner<'a> {
    pub providers: &'a Providers,
    pub prices: &'a PriceTable,
    pub retry: &'a RetrySettings,
}

impl ChainRunner<'_> {
    /// Runs `chain` for one stage. `request.model` is filled in per model.
    pub async fn run(
        &self,
        stage: Stage,
        chain: &[String],
        mut request: ChatRequest,
        unit: &mut UnitCalls,
    ) -> ChainResult {
        let mut errors = Vec::new();
        let mut any_transient = false;
        let mut attempts = 0u32;
        let mut skipped_for_refusal = false;
        for entry in chain {
            let Some((provider_name, model)) = entry.split_once('/') else {
                errors.push(format!("{entry}: not of the form provider/model"));
                continue;
            };
            if unit.refused_providers.contains(provider_name) {
                skipped_for_refusal = true;
                continue;
            }
            let Some(handle) = self.providers.get(provider_name) else {
                errors.push(format!("{entry}: no such provider"));
                continue;
            };
            request.model = model.to_owned();
            request.stage = stage;
            let price = self.prices.get(entry);
            // Only a rate-limited provider needs the estimate (simulated ones have none).
            let estimated_tokens = match handle.limits {
                Some(_) => {
                    estimate_tokens(&request.system)
                        + estimate_tokens(&request.user)
                        + u64::from(request.max_output_tokens)
                }
                None => 0,
            };
            for attempt in 0..self.retry.max_attempts_per_model {
                if Instant::now() >= unit.deadline {
                    errors.push(format!("{entry}: ticket deadline passed"));
                    return ChainResult::Exhausted { errors, attempts };
                }
                let admission = loop {
                    let mut changes = handle.breaker.changes();
                    match handle.breaker.admit() {
                        // A probe is out: its verdict comes within its own deadline.
                        // Waiting for it is our own state, like a rate-limit wait, so
                        // it may stretch the deadline up to the hold.
                        Admission::Wait => {
                            let waited = Instant::now();
                            if tokio::time::timeout_at(
                                tokio::time::Instant::from_std(unit.hold_until),
                                changes.changed(),
                            )
                            .await
                            .is_err()
                            {
                                break Admission::Rejected;
                            }
                            unit.deadline = (unit.deadline + waited.elapsed()).min(unit.hold_until);
                        }
                        other => break other,
                    }
                };
                if admission == Admission::Rejected {
                    any_transient = true;
                    errors.push(format!("{entry}: circuit open"));
                    break;
                }
                if let Some(limits) = &handle.limits {
                    // Wait at most so long that the call keeps the budget it has now.
                    let now = Instant::now();
                    let budget = unit.deadline.saturating_duration_since(now);
                    let wait_until = unit.hold_until.checked_sub(budget).unwrap_or(now).max(now);
                    match limits.acquire(estimated_tokens, wait_until).await {
                        Ok(waited) => {
                            crate::telemetry::limiter_waited(provider_name, waited);
                            if waited > Duration::from_millis(100) {
                                tracing::debug!(ticket_id = %unit.ticket_id, provider = provider_name, waited_ms = waited.as_millis() as u64, "waited for rate limit");
                            }
                            unit.deadline = (unit.deadline + waited).min(unit.hold_until);
                        }
                        Err(e) => {
                            // No call is made: a probe this call holds goes back, or the
                            // circuit would stay half-open until the probe went stale.
                            handle.breaker.release(admission);
                            any_transient = true;
                            errors.push(format!("{entry}: {e}"));
                            break;
                        }
                    }
                }
                attempts += 1;
                let started = Instant::now();
                let remaining = unit.deadline.saturating_duration_since(started);
                let outcome = match tokio::time::timeout(remaining, handle.adapter.complete(&request)).await {
                    Ok(outcome) => outcome,
                    Err(_) => Outcome::Transient {
                        detail: "ticket deadline passed during the call".into(),
                        timeout: true,
                        reached: true,
                    },
                };
                handle.breaker.record(!matches!(outcome, Outcome::Transient { .. }));
                if let Some(limits) = &handle.limits {
                    match &outcome {
                        Outcome::RateLimited { retry_after, .. } => limits.on_rate_limited(*retry_after),
                        Outcome::Ok { usage: Some(u), .. } | Outcome::Refused { usage: Some(u), .. } => {
                            limits.correct(estimated_tokens, u.input_tokens + u.output_tokens)
                        }
                        _ => {}
                    }
                }
                crate::telemetry::provider_call(
                    provider_name,
                    model,
                    stage.as_str(),
                    outcome_label(&outcome),
                    started.elapsed(),
                );
                let latency_ms = started.elapsed().as_millis() as u64;
                let call = Call { stage, provider: provider_name, model, price, request: &request, latency_ms };
                self.record(unit, &call, &outcome);
                let retry_after = match outcome {
                    Outcome::Ok { text, .. } => {
                        return ChainResult::Answered {
                            provider: provider_name.to_owned(),
                            model: model.to_owned(),
                            text,
                            attempts,
                        }
                    }
                    Outcome::Refused { detail, .. } => {
                        tracing::info!(ticket_id = %unit.ticket_id, provider = provider_name, model, %detail, "provider refused the ticket");
                        unit.refused_providers.insert(provider_name.to_owned());
                        unit.refused_by.push(entry.clone());
                        return ChainResult::Refused { attempts };
                    }
                    Outcome::Permanent { detail } => {
                        tracing::warn!(ticket_id = %unit.ticket_id, provider = provider_name, model, %detail, "permanent provider error");
                        errors.push(format!("{entry}: {detail}"));
                        break;
                    }
                    Outcome::RateLimited { retry_after, detail } => {
                        any_transient = true;
                        errors.push(format!("{entry}: rate limited: {detail}"));
                        retry_after
                    }
                    Outcome::Transient { detail, .. } => {
                        any_transient = true;
                        errors.push(format!("{entry}: {detail}"));
                        None
                    }
                };
                if attempt + 1 < self.retry.max_attempts_per_model {
                    let delay = backoff(self.retry, attempt).max(retry_after.unwrap_or_default());
                    if Instant::now() + delay >= unit.deadline {
                        break;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
        if skipped_for_refusal && errors.is_empty() {
            ChainResult::Refused { attempts }
        } else if any_transient || errors.is_empty() {
            ChainResult::Exhausted { errors, attempts }
        } else {
            ChainResult::Rejected { errors, attempts }
        }
    }

    /// Leaves the cost record of a call that reached a provider.
    fn record(&self, unit: &mut UnitCalls, call: &Call<'_>, outcome: &Outcome) {
        let Call { stage, provider, model, price, request, latency_ms } = *call;
        let (usage, call_outcome) = match outcome {
            Outcome::Ok { usage, .. } => (*usage, CallOutcome::Ok),
            Outcome::Refused { usage, .. } => (*usage, CallOutcome::Refused),
            Outcome::RateLimited { .. } => (Some(Usage::default()), CallOutcome::RateLimited),
            Outcome::Transient { reached: false, .. } => return,
            Outcome::Transient { timeout: true, .. } => (Some(Usage::default()), CallOutcome::Timeout),
            Outcome::Transient { .. } | Outcome::Permanent { .. } => (Some(Usage::default()), CallOutcome::Error),
        };
        // A refusal that arrived as an error has no usage: it costs nothing, and the
        // token counts are our estimate of what was sent.
        let (usage, cost_usd, estimated) = match (usage, outcome) {
            (Some(u), _) => (u, price.cost(&u), false),
            (None, Outcome::Refused { .. }) => (Usage::estimate(request, ""), 0.0, true),
            (None, Outcome::Ok { text, .. }) => {
                let u = Usage::estimate(request, text);
                (u, price.cost(&u), true)
            }
            (None, _) => (Usage::default(), 0.0, true),
        };
        let mut record = CostRecord {
            schema_version: SCHEMA_VERSION,
            ticket_id: unit.ticket_id.clone(),
            unit_id: unit.unit_id.clone(),
            call_id: uuid::Uuid::new_v4().to_string(),
            stage,
            provider: provider.to_owned(),
            model: model.to_owned(),
            input_tokens: usage.input_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            output_tokens: usage.output_tokens,
            cost_usd,
            pricing_version: self.prices.version.clone(),
            outcome: call_outcome,
            latency_ms,
            at: now_rfc3339(),
            estimated,
            baseline_cost_usd: 0.0,
        };
        if record.is_answer() {
            record.baseline_cost_usd = self.prices.baseline_cost(&usage);
        }
        unit.costs.push(record);
    }
}

/// Exponential backoff with full jitter: uniform in [0, min(max, base * 2^attempt)].
pub fn backoff(retry: &RetrySettings, attempt: u32) -> Duration {
    let cap = retry.base_delay_ms.saturating_mul(1u64 << attempt.min(20)).min(retry.max_delay_ms);
    Duration::from_millis(if cap == 0 { 0 } else { rand::thread_rng().gen_range(0..=cap) })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    use async_trait::async_trait;

    use super::*;
    use crate::providers::Provider;

    fn reply_request() -> ChatRequest {
        ChatRequest {
            model: String::new(),
            stage: Stage::Reply,
            system: "s".into(),
            user: "u".into(),
            json_mode: false,
            max_output_tokens: 10,
        }
    }

    #[derive(Default)]
    struct Counting {
        calls: AtomicU32,
    }

    #[async_trait]
    impl Provider for Counting {
        async fn complete(&self, _request: &ChatRequest) -> Outcome {
            self.calls.fetch_add(1, Ordering::SeqCst);
            Outcome::Ok { text: "ok".into(), usage: None }
        }
    }

    #[tokio::test]
    async fn a_probe_that_misses_its_rate_limit_slot_goes_back() {
        let mut settings = crate::policy::load_from(None, &BTreeMap::new()).unwrap();
        settings.breaker.failure_threshold = 1;
        settings.breaker.cooldown_ms = 200;
        settings.providers.get_mut("qwen").unwrap().requests_per_minute = 60;
        let adapter = Arc::new(Counting::default());
        let adapters = BTreeMap::from([("qwen".to_owned(), adapter.clone() as Arc<dyn Provider>)]);
        let providers = Providers::from_adapters(adapters, &settings, &["qwen"]);
        let handle = providers.get("qwen").unwrap();
        let limits = handle.limits.as_ref().unwrap();
        // Open the circuit, wait out the cooldown, and take the only request slot.
        handle.breaker.record(false);
        tokio::time::sleep(Duration::from_millis(210)).await;
        limits.acquire(1, Instant::now() + Duration::from_secs(1)).await.unwrap();

        let prices = PriceTable::from_settings(&settings);
        let runner = ChainRunner { providers: &providers, prices: &prices, retry: &settings.retry };
        let request = reply_request();
        let mut unit = UnitCalls::new("T-1", "U-1", Instant::now() + Duration::from_millis(20));
        let result = runner.run(Stage::Reply, &["qwen/qwen-plus".to_owned()], request, &mut unit).await;
        assert!(matches!(&result, ChainResult::Exhausted { attempts: 0, .. }), "{result:?}");
        assert_eq!(adapter.calls.load(Ordering::SeqCst), 0);
        assert!(
            matches!(handle.breaker.admit(), Admission::Probe { .. }),
            "the probe that was never sent is available again at once"
        );
    }

    /// Answers after `delay`, counting calls.
    #[derive(Default)]
    struct Slow {
        calls: AtomicU32,
        delay: Duration,
    }

    #[async_trait]
    impl Provider for Slow {
        async fn complete(&self, _request: &ChatRequest) -> Outcome {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            Outcome::Ok { text: "ok".into(), usage: None }
        }
    }

    #[tokio::test]
    async fn calls_wait_for_the_probe_of_a_half_open_circuit_instead_of_failing() {
        let mut settings = crate::policy::load_from(None, &BTreeMap::new()).unwrap();
        settings.breaker.failure_threshold = 1;
        settings.breaker.cooldown_ms = 50;
        let qwen = settings.providers.get_mut("qwen").unwrap();
        (qwen.requests_per_minute, qwen.tokens_per_minute) = (600_000, 1_000_000_000);
        let adapter = Arc::new(Slow { delay: Duration::from_millis(100), ..Slow::default() });
        let adapters = BTreeMap::from([("qwen".to_owned(), adapter.clone() as Arc<dyn Provider>)]);
        let providers = Providers::from_adapters(adapters, &settings, &["qwen"]);
        // The outage is over; the circuit is still open, its cooldown passed.
        providers.get("qwen").unwrap().breaker.record(false);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let prices = PriceTable::from_settings(&settings);
        let runner = ChainRunner { providers: &providers, prices: &prices, retry: &settings.retry };
        let request = reply_request();
        let chain = ["qwen/qwen-plus".to_owned()];
        // A burst, as a replay sends: one call probes, the others wait for its verdict.
        let burst = (0..5).map(|i| {
            let (runner, request, chain) = (&runner, request.clone(), &chain);
            async move {
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut unit =
                    UnitCalls::new(&format!("T-{i}"), "U", deadline).with_hold_until(deadline + Duration::from_secs(5));
                runner.run(Stage::Reply, chain, request, &mut unit).await
            }
        });
        let results = futures_util::future::join_all(burst).await;
        for result in &results {
            assert!(matches!(result, ChainResult::Answered { .. }), "{result:?}");
        }
        assert_eq!(adapter.calls.load(Ordering::SeqCst), 5);
    }
}
