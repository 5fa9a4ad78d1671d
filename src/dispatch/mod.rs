//! The dispatcher: between a [`Source`] and a [`Handler`] (the pipeline).
//!
//! - **Order per key.** Deliveries with the same key (a conversation) run one at a
//!   time, in arrival order; different keys run in parallel up to the in-flight
//!   budget. A delivery with no key orders with nothing.
//! - **Bounded memory, flow control.** Deliveries held (running, or waiting behind
//!   their key or for the budget) are bounded at twice the budget; past that the
//!   source's lanes are paused (a Kafka consumer keeps polling) and resumed once a
//!   quarter of the room is free again.
//! - **Admission follows the providers.** The budget is the smaller of
//!   `limits.max_in_flight` and what [`Admission`] says the rate limiters can serve
//!   (see `providers::admission`), so tickets wait in the broker, not in memory.
//!   A delivery whose unit another worker holds (a killed worker's lease running
//!   out, typically a whole prefetch window of them after a kill) gives its slot up
//!   while it waits to try again, and takes one back, before any new work, when its
//!   wait is over: the rest of what was delivered is worked on meanwhile.
//! - **Lanes.** Each delivery belongs to a lane (partition, queue). A revoked lane's
//!   unstarted deliveries are handed back at once, its running ones finish or are
//!   cancelled at the drain deadline (releasing their ledger claims), and the source
//!   is told when the lane is drained.
//! - **Settlement.** A delivery runs in a task (`task.rs`) that maps every attempt
//!   through the one disposition function ([`disposition`]) and settles it exactly
//!   once, panics included. A task that finishes takes the next delivery of its key,
//!   or else the next ready one, itself: the dispatcher's own loop only takes in
//!   deliveries and is woken by finishing tasks only when it waits for them (paused
//!   intake, a lane to drain, the end of the input).
//! - **Shutdown.** `stop_intake` stops reading and hands back what has not started;
//!   running deliveries get `drain_timeout`, then are cancelled cooperatively;
//!   `abort` drops them at once. Nothing unfinished is acked.
//! - While the ledger is unreachable ([`Health`] not ready) nothing new starts.

pub mod disposition;
mod state;
mod task;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use disposition::{HandleError, RetryPolicy};
use state::{finish_revocations, Pending, Revocation, Sched, State, TaskGuard};
pub use task::Settled;

use crate::broker::{BrokerError, Delivery, Lane, Message, Source, SourceEvent};
use crate::ledger::resilient::Health;
use crate::observe::{Completion, Observer};

/// One attempt at a delivery, as the handler sees it.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Unique per delivery within this process, the same for every attempt at it:
    /// the handler names its ledger claim after it, so a retry finds its own claim.
    pub seq: u64,
    /// Counted failures before this attempt.
    pub failures: u32,
    /// Cancelled when the delivery is abandoned: stop, release the claim, return
    /// [`HandleError::Cancelled`].
    pub cancel: CancellationToken,
}

impl Attempt {
    /// A first attempt that nobody cancels (tests, one-off calls).
    pub fn first(seq: u64) -> Self {
        Attempt { seq, failures: 0, cancel: CancellationToken::new() }
    }
}

/// What the dispatcher drives: the pipeline, or a test double.
#[async_trait]
pub trait Handler: Send + Sync + 'static {
    /// Takes a message up to the point where it may be acked: its output published
    /// and recorded.
    async fn handle(&self, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError>;

    /// Ends a message that keeps failing with an `internal` dead letter naming
    /// `reason`, published (and recorded where the ledger takes it).
    async fn give_up(&self, message: &Message, attempt: &Attempt, reason: &str) -> Result<Completion, HandleError>;

    /// The delivery is handed back between attempts (shutdown or a revoked lane
    /// while it waited to retry): give up whatever the failed attempt still holds
    /// (its ledger claim), so the next owner need not wait for it to expire.
    async fn abandon(&self, _message: &Message, _attempt: &Attempt) {}
}

/// How many tickets may be in flight given what the providers can serve.
pub trait Admission: Send + Sync {
    /// At most `max`; at least 1.
    fn allowed_in_flight(&self, max: usize) -> usize;
}

/// No limit but the configured one.
pub struct Unlimited;

impl Admission for Unlimited {
    fn allowed_in_flight(&self, max: usize) -> usize {
        max
    }
}

/// How a run stops.
#[derive(Clone, Debug)]
pub struct Shutdown {
    /// Stop taking new deliveries; finish what is in flight.
    pub stop_intake: CancellationToken,
    /// Abandon in-flight work at once: nothing unfinished is acked.
    pub abort: CancellationToken,
    /// How long in-flight work may take after `stop_intake` (or a lane's revocation)
    /// before it is cancelled.
    pub drain_timeout: Duration,
}

impl Shutdown {
    pub fn new(drain_timeout: Duration) -> Self {
        Shutdown { stop_intake: CancellationToken::new(), abort: CancellationToken::new(), drain_timeout }
    }
}

/// Counters of one run.
#[derive(Debug, Default)]
pub struct RunStats {
    pub received: AtomicU64,
    pub acked: AtomicU64,
    pub handed_back: AtomicU64,
    /// Deliveries whose work and dead letter both failed (see [`Settled::Rejected`]).
    pub rejected: AtomicU64,
}

/// The dispatcher's settings.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    pub max_in_flight: usize,
    pub retry: RetryPolicy,
}

/// Everything a run needs besides its source.
pub struct Dispatcher<H: Handler> {
    pub handler: Arc<H>,
    pub config: DispatchConfig,
    pub observers: Vec<Arc<dyn Observer>>,
    pub admission: Arc<dyn Admission>,
    pub health: Arc<Health>,
    pub stats: Arc<RunStats>,
}

impl<H: Handler> Dispatcher<H> {
    /// Consumes `source` until it ends, fails, or shutdown is requested; then drains.
    /// A source failure is returned after the drain.
    pub async fn run(&self, mut source: impl Source, shutdown: Shutdown) -> Result<(), BrokerError> {
        let tracker = TaskTracker::new();
        let observers: Arc<[Arc<dyn Observer>]> = self.observers.clone().into();
        let all_cancel = shutdown.abort.child_token();
        let sched = Arc::new(Sched {
            state: std::sync::Mutex::new(State {
                keys: HashMap::new(),
                ready: VecDeque::new(),
                lanes: HashMap::new(),
                revocations: Vec::new(),
                running: 0,
                returning: 0,
                held: 0,
                next_seq: 0,
                paused: false,
                allowed: 1,
                may_start: true,
                wake_on_done: false,
                all_cancel: all_cancel.clone(),
            }),
            wake: Notify::new(),
            slot_freed: Notify::new(),
        });
        let mut intake_open = true;
        // Stopping (a signal or a source failure), as opposed to the input's end:
        // unstarted deliveries go back and running ones get a drain deadline.
        let mut stopping = false;
        let mut source_error = None;
        let mut drain_deadline: Option<Instant> = None;
        // Admission changes with the providers' limiters (a replica's first share of
        // the account, a 429's pause ending) and nothing else wakes this loop for it:
        // a look every so often lets a budget that grew take in work at once.
        let mut admission_tick = tokio::time::interval(ADMISSION_LOOK);
        admission_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let ready = self.health.is_ready();
            let allowed = self.admission.allowed_in_flight(self.config.max_in_flight.max(1)).max(1);
            let revoke_deadline = {
                let mut st = sched.lock();
                st.allowed = allowed;
                st.may_start = ready && !all_cancel.is_cancelled();
                // Parked tasks that want their slot back come first.
                while st.may_start && st.running + st.returning < allowed {
                    let Some(p) = st.ready.pop_front() else { break };
                    st.running += 1;
                    let cancel = st.begin(&p);
                    self.spawn(&sched, p, cancel, &tracker, &observers, &shutdown);
                }
                let room = 2 * allowed;
                let want_paused = !ready || st.held >= room;
                let resume = st.held <= room * 3 / 4 && ready;
                if intake_open && want_paused != st.paused && (want_paused || resume) {
                    let lanes: Vec<Lane> = st.lanes.keys().cloned().collect();
                    let r = if want_paused { source.pause(&lanes) } else { source.resume(&lanes) };
                    match r {
                        Ok(()) => {
                            st.paused = want_paused;
                            if !ready {
                                tracing::info!("intake paused until the worker is ready again");
                            } else {
                                tracing::debug!(paused = want_paused, held = st.held, "intake paused or resumed");
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "could not pause or resume intake"),
                    }
                }
                finish_revocations(&mut st);
                if !intake_open && st.held == 0 {
                    break;
                }
                st.wake_on_done = st.paused || !st.may_start || !intake_open || !st.revocations.is_empty();
                st.revocations.iter().filter(|r| !r.cancelled).map(|r| r.deadline).min()
            };
            tokio::select! {
                biased;
                _ = sched.wake.notified() => {}
                _ = shutdown.abort.cancelled(), if !all_cancel.is_cancelled() || intake_open => {
                    intake_open = false;
                    self.hand_back(&mut sched.lock(), None, &tracker);
                }
                _ = shutdown.stop_intake.cancelled(), if !stopping => {
                    stopping = true;
                    intake_open = false;
                    drain_deadline = Some(Instant::now() + shutdown.drain_timeout);
                    self.hand_back(&mut sched.lock(), None, &tracker);
                }
                _ = sleep_until(drain_deadline), if !all_cancel.is_cancelled() => {
                    tracing::warn!(running = sched.lock().running, "drain deadline passed; abandoning in-flight tickets (they are not acked)");
                    all_cancel.cancel();
                }
                _ = sleep_until(revoke_deadline), if revoke_deadline.is_some() => {
                    let now = Instant::now();
                    let mut st = sched.lock();
                    let mut cancel = Vec::new();
                    for r in st.revocations.iter_mut().filter(|r| r.deadline <= now && !r.cancelled) {
                        r.cancelled = true;
                        tracing::warn!(lanes = ?r.lanes, "revoked lanes did not drain in time; abandoning their in-flight tickets");
                        cancel.extend(r.lanes.iter().cloned());
                    }
                    for lane in cancel {
                        if let Some(l) = st.lanes.get(&lane) {
                            l.cancel.cancel();
                        }
                    }
                }
                _ = admission_tick.tick() => {}
                _ = self.health.wait_ready(), if !ready => {}
                _ = self.health.wait_not_ready(), if ready => {}
                event = source.next(), if intake_open => match event {
                    Ok(Some(SourceEvent::Delivery(delivery))) => self.accept(&mut sched.lock(), delivery),
                    Ok(Some(SourceEvent::Assigned(lanes))) => {
                        let mut st = sched.lock();
                        for lane in lanes {
                            st.lane(lane);
                        }
                        if st.paused {
                            let lanes: Vec<Lane> = st.lanes.keys().cloned().collect();
                            if let Err(e) = source.pause(&lanes) {
                                tracing::warn!(error = %e, "could not pause newly assigned lanes");
                            }
                        }
                    }
                    Ok(Some(SourceEvent::Revoked { lanes, drained })) => {
                        let mut st = sched.lock();
                        self.hand_back(&mut st, Some(&lanes), &tracker);
                        let deadline = Instant::now() + shutdown.drain_timeout;
                        st.revocations.push(Revocation { lanes, drained: Some(drained), deadline, cancelled: false });
                    }
                    Ok(None) => intake_open = false,
                    Err(e) => {
                        tracing::error!(error = %e, "the source failed; finishing what is in flight");
                        stopping = true;
                        intake_open = false;
                        drain_deadline = Some(Instant::now() + shutdown.drain_timeout);
                        self.hand_back(&mut sched.lock(), None, &tracker);
                        source_error = Some(e);
                    }
                },
            }
        }
        tracker.close();
        tracker.wait().await;
        match source_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// A new delivery: ready at once, or queued behind its key's unfinished one.
    fn accept(&self, st: &mut State, delivery: Delivery) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let seq = st.next_seq;
        st.next_seq += 1;
        st.held += 1;
        st.lane(delivery.message.lane());
        let pending = Pending { delivery, seq };
        match &pending.delivery.message.key {
            Some(key) => match st.keys.get_mut(key) {
                Some(queue) => queue.push_back(pending),
                None => {
                    st.keys.insert(key.clone(), VecDeque::new());
                    st.ready.push_back(pending);
                }
            },
            None => st.ready.push_back(pending),
        }
    }

    /// A task that runs `first`, then whatever [`State::finished`] hands it.
    fn spawn(
        &self,
        sched: &Arc<Sched>,
        first: Pending,
        cancel: CancellationToken,
        tracker: &TaskTracker,
        observers: &Arc<[Arc<dyn Observer>]>,
        shutdown: &Shutdown,
    ) {
        let sched = sched.clone();
        let handler = self.handler.clone();
        let observers = observers.clone();
        let policy = self.config.retry.clone();
        let abort = shutdown.abort.clone();
        let stats = self.stats.clone();
        tracker.spawn(async move {
            let mut guard = TaskGuard { sched: &sched, current: None };
            let mut next = Some((first, cancel));
            while let Some((p, cancel)) = next.take() {
                let lane = p.lane();
                let key = p.delivery.message.key.clone();
                guard.current = Some((lane.clone(), key.clone()));
                let ctx = task::TaskContext {
                    sched: sched.clone(),
                    handler: handler.clone(),
                    observers: observers.clone(),
                    policy: policy.clone(),
                    cancel,
                    abort: abort.clone(),
                };
                let settled = task::run(ctx, p.delivery, p.seq).await;
                match settled {
                    Settled::Acked => stats.acked.fetch_add(1, Ordering::Relaxed),
                    Settled::HandedBack => stats.handed_back.fetch_add(1, Ordering::Relaxed),
                    Settled::Rejected => stats.rejected.fetch_add(1, Ordering::Relaxed),
                };
                guard.current = None;
                let wake = {
                    let mut st = sched.lock();
                    next = st.finished(&lane, key.as_deref()).map(|p| {
                        let cancel = st.begin(&p);
                        (p, cancel)
                    });
                    st.wake_on_done
                };
                if next.is_none() {
                    sched.slot_freed.notify_one();
                }
                if wake {
                    sched.wake.notify_one();
                }
            }
        });
    }

    /// Hands back every delivery that has not started, of `lanes` or of all lanes.
    fn hand_back(&self, st: &mut State, lanes: Option<&[Lane]>, tracker: &TaskTracker) {
        let matches = |p: &Pending| lanes.is_none_or(|l| l.contains(&p.lane()));
        let mut back = Vec::new();
        for queue in st.keys.values_mut() {
            let (gone, kept): (VecDeque<Pending>, VecDeque<Pending>) = queue.drain(..).partition(|p| matches(p));
            *queue = kept;
            back.extend(gone);
        }
        let (gone, kept): (VecDeque<Pending>, VecDeque<Pending>) = st.ready.drain(..).partition(|p| matches(p));
        st.ready = kept;
        for p in gone {
            // The key's head goes back: the next of its key (another lane's) is ready now.
            if let Some(next) = p.delivery.message.key.as_deref().and_then(|k| st.next_of(k)) {
                st.ready.push_back(next);
            }
            back.push(p);
        }
        if back.is_empty() {
            return;
        }
        st.held -= back.len();
        self.stats.handed_back.fetch_add(back.len() as u64, Ordering::Relaxed);
        // In arrival order, so a broker that requeues keeps what order it can.
        back.sort_by_key(|p| p.seq);
        tracker.spawn(async move {
            for p in back {
                if let Err(e) = p.delivery.acker.nack(true).await {
                    tracing::warn!(source = ?p.delivery.message.source, error = %e, "could not hand a message back; the broker redelivers it");
                }
            }
        });
    }
}

/// How often the dispatcher looks at admission when nothing else wakes it.
const ADMISSION_LOOK: Duration = Duration::from_millis(250);

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
