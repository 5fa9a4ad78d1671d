//! A model chain: try each `provider/model` in order, retrying transient and
//! rate-limited outcomes with exponential backoff and full jitter inside the
//! ticket's deadline, then failing over to the next model. Every call that reached
//! a provider leaves a [`CostRecord`]. A provider that refused the ticket is skipped
//! for the rest of that ticket, so no refusal is paid for twice.
//!
//! With a [`CallJournal`] (the worker's ledger), each call's intent is journaled
//! before it is sent and its end as it completes; a unit resumed from its journal
//! gets the answers its earlier owners already paid for instead of calling again.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use rand::Rng;

use super::breaker::Admission;
use super::pricing::{Price, PriceTable};
use super::{estimate_tokens, ChatRequest, Outcome, Providers, Usage};
use crate::settings::RetrySettings;
use crate::ticket::{now_rfc3339, CallOutcome, CostRecord, Stage, SCHEMA_VERSION};

/// Where a unit's calls are journaled as they are made (the ledger, in the worker).
#[async_trait]
pub trait CallJournal: Send + Sync {
    /// The call of `estimate` (its lost estimate) is about to be sent. An error: the
    /// unit may make no more calls (its owner lost it, or the journal failed).
    async fn sent(&self, estimate: &CostRecord) -> Result<(), JournalStop>;
    /// The call `call_id` ended: its record and, for an `ok` call, the answer; no
    /// record when it never reached the provider.
    async fn ended(&self, call_id: &str, record: Option<&CostRecord>, answer: Option<&str>) -> Result<(), JournalStop>;
}

/// The journal could not take a write: the unit's calls stop here, and the journal
/// knows why.
#[derive(Debug, Clone, Copy)]
pub struct JournalStop;

/// An answer an earlier owner of the unit already paid for.
#[derive(Debug, Clone)]
pub struct Resumed {
    pub provider: String,
    pub model: String,
    pub text: String,
    /// Calls its stage took.
    pub attempts: u32,
}

/// Per-ticket state shared by every call made for one unit of work.
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
    /// Where calls are journaled; none in `explain` and benchmarks.
    pub journal: Option<Arc<dyn CallJournal>>,
    /// Answers from the journal, per stage, used instead of calling again.
    pub resumed: HashMap<Stage, Resumed>,
    /// The journal refused a write: no more calls.
    pub stopped: bool,
    /// Records taken from the journal ([`UnitCalls::resume`]); the rest of `costs`
    /// are this attempt's own calls.
    pub carried: usize,
    /// Time this attempt spent waiting on our own rate limiters.
    pub limiter_waited: Duration,
    /// What such waits may take beyond the deadline (the hold less the deadline).
    pub limiter_slack: Duration,
    /// A call could not go out for our own pacing: our limiter had no capacity
    /// before the unit's hold ended, or the deadline passed after waits on it. Such a
    /// unit is handed back to wait, not failed (SPEC §6).
    pub paced_out: bool,
}

impl std::fmt::Debug for UnitCalls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitCalls")
            .field("unit_id", &self.unit_id)
            .field("costs", &self.costs.len())
            .field("refused_by", &self.refused_by)
            .field("journaled", &self.journal.is_some())
            .field("resumed", &self.resumed.keys().collect::<Vec<_>>())
            .field("stopped", &self.stopped)
            .finish()
    }
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
            journal: None,
            resumed: HashMap::new(),
            stopped: false,
            carried: 0,
            limiter_waited: Duration::ZERO,
            limiter_slack: Duration::ZERO,
            paced_out: false,
        }
    }

    /// Moves the deadline and the hold by `waited`, time spent waiting on our own
    /// ledger (a database outage is waited out, never the ticket's fault).
    pub fn outwait(&mut self, waited: Duration) {
        if waited > Duration::from_millis(50) {
            self.deadline += waited;
            self.hold_until += waited;
        }
    }

    /// Journals every call made from now on in `journal`.
    pub fn with_journal(mut self, journal: Arc<dyn CallJournal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Takes in a call an earlier owner journaled: its record counts for the unit
    /// (unless `settled`: recorded and published already, with a dead letter before
    /// a replay), a refusal skips its provider, and an answer is used instead of
    /// calling again.
    pub fn resume(&mut self, record: CostRecord, answer: Option<String>, settled: bool) {
        let stage = record.stage;
        match record.outcome {
            CallOutcome::Refused => {
                self.refused_providers.insert(record.provider.clone());
                self.refused_by.push(format!("{}/{}", record.provider, record.model));
            }
            CallOutcome::Ok => {
                if let Some(text) = answer {
                    let attempts = self.costs.iter().filter(|c| c.stage == stage).count() as u32 + 1;
                    let (provider, model) = (record.provider.clone(), record.model.clone());
                    let resumed = Resumed { provider, model, text, attempts };
                    self.resumed.insert(stage, resumed);
                }
            }
            _ => {}
        }
        if !settled {
            self.costs.push(record);
            self.carried += 1;
        }
    }

    /// Lets limiter waits move the deadline up to `hold_until`.
    pub fn with_hold_until(mut self, hold_until: Instant) -> Self {
        self.hold_until = hold_until.max(self.deadline);
        self.limiter_slack = self.hold_until - self.deadline;
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

/// What a call cost and how it ended, for its cost record.
struct Priced {
    usage: Usage,
    cost_usd: f64,
    outcome: CallOutcome,
    estimated: bool,
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
        if unit.stopped {
            return ChainResult::Exhausted { errors: vec!["the unit's journal stopped its calls".into()], attempts };
        }
        if let Some(r) = unit.resumed.remove(&stage) {
            tracing::debug!(ticket_id = %unit.ticket_id, stage = stage.as_str(), provider = %r.provider, "answer taken from the unit's journal");
            return ChainResult::Answered { provider: r.provider, model: r.model, text: r.text, attempts: r.attempts };
        }
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
            // Only a rate-limited provider or the journal needs the estimate
            // (simulated providers in `process` have neither).
            let input_estimate = match (&handle.limits, &unit.journal) {
                (None, None) => 0,
                _ => estimate_tokens(&request.system) + estimate_tokens(&request.user),
            };
            let estimated_tokens = input_estimate + u64::from(request.max_output_tokens);
            for attempt in 0..self.retry.max_attempts_per_model {
                if Instant::now() >= unit.deadline {
                    errors.push(format!("{entry}: ticket deadline passed"));
                    // The waits on our own limiters took all the slack they may move
                    // the deadline by (it stands at the hold): the time went to our
                    // pacing, not to the provider.
                    unit.paced_out |= unit.limiter_waited >= unit.limiter_slack && unit.limiter_slack > Duration::ZERO;
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
                if let Err(e) = pace(unit, handle, provider_name, estimated_tokens).await {
                    unit.paced_out = true;
                    // No call is made: a probe this call holds goes back, or the
                    // circuit would stay half-open until the probe went stale.
                    handle.breaker.release(admission);
                    any_transient = true;
                    errors.push(format!("{entry}: {e}"));
                    break;
                }
                let call_id = uuid::Uuid::new_v4().to_string();
                if let Some(journal) = unit.journal.clone() {
                    let usage = Usage { input_tokens: input_estimate, cached_input_tokens: 0, output_tokens: 0 };
                    let call = Call { stage, provider: provider_name, model, price, request: &request, latency_ms: 0 };
                    let lost =
                        Priced { usage, cost_usd: price.cost(&usage), outcome: CallOutcome::Lost, estimated: true };
                    let estimate = self.cost_record(unit, &call, &call_id, lost);
                    let writing = Instant::now();
                    if journal.sent(&estimate).await.is_err() {
                        handle.breaker.release(admission);
                        unit.stopped = true;
                        return ChainResult::Exhausted { errors: vec![format!("{entry}: not journaled")], attempts };
                    }
                    // A wait that long (the database was away) outlived the
                    // rate-limit permit taken before it: calls held up by an outage
                    // must not reach the provider as one burst, so this one paces
                    // again.
                    let waited = writing.elapsed();
                    unit.outwait(waited);
                    if waited > STALE_PERMIT {
                        if let Err(e) = pace(unit, handle, provider_name, estimated_tokens).await {
                            unit.paced_out = true;
                            handle.breaker.release(admission);
                            if journal.ended(&call_id, None, None).await.is_err() {
                                unit.stopped = true;
                            }
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
                let recorded = self.record(unit, &call, &call_id, &outcome);
                if let Some(journal) = unit.journal.clone() {
                    let record = if recorded { unit.costs.last() } else { None };
                    let answer = match &outcome {
                        Outcome::Ok { text, .. } => Some(text.as_str()),
                        _ => None,
                    };
                    let writing = Instant::now();
                    if journal.ended(&call_id, record, answer).await.is_err() {
                        unit.stopped = true;
                        return ChainResult::Exhausted { errors: vec![format!("{entry}: not journaled")], attempts };
                    }
                    unit.outwait(writing.elapsed());
                }
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

    /// Leaves the cost record of a call that reached a provider; false for one that
    /// did not.
    fn record(&self, unit: &mut UnitCalls, call: &Call<'_>, call_id: &str, outcome: &Outcome) -> bool {
        let Call { price, request, .. } = *call;
        let (usage, call_outcome) = match outcome {
            Outcome::Ok { usage, .. } => (*usage, CallOutcome::Ok),
            Outcome::Refused { usage, .. } => (*usage, CallOutcome::Refused),
            Outcome::RateLimited { .. } => (Some(Usage::default()), CallOutcome::RateLimited),
            Outcome::Transient { reached: false, .. } => return false,
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
        let priced = Priced { usage, cost_usd, outcome: call_outcome, estimated };
        let record = self.cost_record(unit, call, call_id, priced);
        unit.costs.push(record);
        true
    }

    /// The cost record of `call` as it ended (or, outcome `lost`, as it stands before
    /// it is sent), with its baseline price if it answered the unit.
    fn cost_record(&self, unit: &UnitCalls, call: &Call<'_>, call_id: &str, priced: Priced) -> CostRecord {
        let Call { stage, provider, model, latency_ms, .. } = *call;
        let Priced { usage, cost_usd, outcome, estimated } = priced;
        let mut record = CostRecord {
            schema_version: SCHEMA_VERSION,
            ticket_id: unit.ticket_id.clone(),
            unit_id: unit.unit_id.clone(),
            call_id: call_id.to_owned(),
            stage,
            provider: provider.to_owned(),
            model: model.to_owned(),
            input_tokens: usage.input_tokens,
            cached_input_tokens: usage.cached_input_tokens,
            output_tokens: usage.output_tokens,
            cost_usd,
            pricing_version: self.prices.version.clone(),
            outcome,
            latency_ms,
            at: now_rfc3339(),
            estimated,
            baseline_cost_usd: 0.0,
        };
        if record.is_answer() {
            record.baseline_cost_usd = self.prices.baseline_cost(&usage);
        }
        record
    }
}

/// A rate-limit permit older than this, because the call's journal write waited out
/// a database outage, is replaced by a fresh one before the call is sent.
const STALE_PERMIT: Duration = Duration::from_secs(1);

/// Waits on the provider's rate limiter, if it has one, at most so long that the call
/// keeps the budget it has now; the wait moves the unit's deadline (up to its hold).
async fn pace(unit: &mut UnitCalls, handle: &super::ProviderHandle, provider: &str, tokens: u64) -> Result<(), String> {
    let Some(limits) = &handle.limits else { return Ok(()) };
    let now = Instant::now();
    let budget = unit.deadline.saturating_duration_since(now);
    let wait_until = unit.hold_until.checked_sub(budget).unwrap_or(now).max(now);
    let waited = limits.acquire(tokens, wait_until).await.map_err(|e| e.to_string())?;
    crate::telemetry::limiter_waited(provider, waited);
    unit.limiter_waited += waited;
    if waited > Duration::from_millis(100) {
        tracing::debug!(ticket_id = %unit.ticket_id, provider, waited_ms = waited.as_millis() as u64, "waited for rate limit");
    }
    unit.deadline = (unit.deadline + waited).min(unit.hold_until);
    Ok(())
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
