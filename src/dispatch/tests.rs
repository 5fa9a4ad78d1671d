//! The dispatcher driven step by step: a source the test feeds, a handler the test
//! holds and releases, and ackers that report how each delivery was settled. Every
//! wait is for an event; time is tokio's paused clock, so deadlines and retry
//! delays pass without sleeping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::*;
use crate::observe::Handled;
use crate::ticket::SourceRef;

/// How a delivery was settled, by message id.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settle {
    Ack(String),
    Requeue(String),
    Reject(String),
}

struct TestAcker {
    id: String,
    settled: mpsc::UnboundedSender<Settle>,
}

#[async_trait]
impl crate::broker::Acker for TestAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let _ = self.settled.send(Settle::Ack(self.id.clone()));
        Ok(())
    }
    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        let s = if requeue { Settle::Requeue(self.id.clone()) } else { Settle::Reject(self.id.clone()) };
        let _ = self.settled.send(s);
        Ok(())
    }
}

struct TestSource {
    events: mpsc::UnboundedReceiver<SourceEvent>,
}

#[async_trait]
impl Source for TestSource {
    async fn next(&mut self) -> Result<Option<SourceEvent>, BrokerError> {
        Ok(self.events.recv().await)
    }
    fn pause(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        Ok(())
    }
    fn resume(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        Ok(())
    }
}

/// A handler that reports each start and finishes a message only when the test
/// releases it; `panics` says how many attempts at a message panic first.
#[derive(Default)]
struct Held {
    started: Mutex<Option<mpsc::UnboundedSender<String>>>,
    gates: Mutex<HashMap<String, Arc<Semaphore>>>,
    panics: Mutex<HashMap<String, u32>>,
    /// How many attempts at a message find its unit held by another worker first.
    busy: Mutex<HashMap<String, u32>>,
    /// Attempts inside the handler now, and the most there ever were.
    inside: AtomicU32,
    most_inside: AtomicU32,
    gave_up: Mutex<Vec<(String, String)>>,
    abandoned: Mutex<Vec<(String, u64)>>,
    attempts: AtomicU32,
}

impl Held {
    fn gate(&self, id: &str) -> Arc<Semaphore> {
        self.gates.lock().unwrap().entry(id.to_owned()).or_insert_with(|| Arc::new(Semaphore::new(0))).clone()
    }
    fn release(&self, id: &str) {
        self.gate(id).add_permits(1);
    }
    fn open(&self, id: &str) {
        self.gate(id).add_permits(1_000);
    }
}

#[async_trait]
impl Handler for Held {
    async fn handle(&self, message: &Message, attempt: &Attempt) -> Result<Completion, HandleError> {
        let id = String::from_utf8(message.payload.to_vec()).unwrap();
        self.attempts.fetch_add(1, Ordering::SeqCst);
        if let Some(tx) = self.started.lock().unwrap().as_ref() {
            let _ = tx.send(id.clone());
        }
        let panic_now = {
            let mut panics = self.panics.lock().unwrap();
            match panics.get_mut(&id) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        if panic_now {
            panic!("bug while handling {id}");
        }
        let busy_now = {
            let mut busy = self.busy.lock().unwrap();
            busy.get_mut(&id).filter(|n| **n > 0).map(|n| *n -= 1).is_some()
        };
        if busy_now {
            return Err(HandleError::Busy(id));
        }
        let inside = self.inside.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_inside.fetch_max(inside, Ordering::SeqCst);
        let gate = self.gate(&id);
        let result = tokio::select! {
            _ = attempt.cancel.cancelled() => Err(HandleError::Cancelled),
            permit = gate.acquire() => {
                permit.unwrap().forget();
                Ok(Completion::nothing(Handled::Duplicate))
            }
        };
        self.inside.fetch_sub(1, Ordering::SeqCst);
        result
    }

    async fn give_up(&self, message: &Message, _attempt: &Attempt, reason: &str) -> Result<Completion, HandleError> {
        let id = String::from_utf8(message.payload.to_vec()).unwrap();
        self.gave_up.lock().unwrap().push((id, reason.to_owned()));
        Ok(Completion::nothing(Handled::DeadLettered(crate::ticket::ErrorKind::Internal)))
    }

    async fn abandon(&self, message: &Message, attempt: &Attempt) {
        let id = String::from_utf8(message.payload.to_vec()).unwrap();
        self.abandoned.lock().unwrap().push((id, attempt.seq));
    }
}

struct Harness {
    handler: Arc<Held>,
    events: mpsc::UnboundedSender<SourceEvent>,
    started: mpsc::UnboundedReceiver<String>,
    settled: mpsc::UnboundedReceiver<Settle>,
    settled_tx: mpsc::UnboundedSender<Settle>,
    shutdown: Shutdown,
    run: tokio::task::JoinHandle<Result<(), BrokerError>>,
    stats: Arc<RunStats>,
}

impl Harness {
    fn start(max_in_flight: usize, drain_timeout: Duration) -> Self {
        Self::start_with(max_in_flight, drain_timeout, Duration::from_millis(100))
    }

    fn start_with(max_in_flight: usize, drain_timeout: Duration, retry_delay: Duration) -> Self {
        let handler = Arc::new(Held::default());
        let (started_tx, started) = mpsc::unbounded_channel();
        *handler.started.lock().unwrap() = Some(started_tx);
        let (events, rx) = mpsc::unbounded_channel();
        let (settled_tx, settled) = mpsc::unbounded_channel();
        let stats = Arc::new(RunStats::default());
        let dispatcher = Dispatcher {
            handler: handler.clone(),
            config: DispatchConfig {
                max_in_flight,
                retry: RetryPolicy { max_attempts: 3, base_delay: retry_delay, max_delay: retry_delay * 10 },
            },
            observers: Vec::new(),
            admission: Arc::new(Unlimited),
            health: Health::new(),
            stats: stats.clone(),
        };
        let shutdown = Shutdown::new(drain_timeout);
        let s = shutdown.clone();
        let run = tokio::spawn(async move { dispatcher.run(TestSource { events: rx }, s).await });
        Harness { handler, events, started, settled, settled_tx, shutdown, run, stats }
    }

    /// Sends a message `id` with ordering key `key` in lane `partition`.
    fn send(&self, id: &str, key: Option<&str>, partition: i32) {
        let message = Message {
            payload: bytes::Bytes::from(id.to_owned()),
            full_len: None,
            source: SourceRef { topic: "t".into(), partition, offset: 0 },
            key: key.map(str::to_owned),
            redelivered: false,
            stable_offset: false,
            replay_count: 0,
        };
        let acker = Box::new(TestAcker { id: id.to_owned(), settled: self.settled_tx.clone() });
        self.events.send(SourceEvent::Delivery(Delivery { message, acker })).unwrap();
    }

    async fn next_start(&mut self) -> String {
        within(self.started.recv()).await.unwrap()
    }

    async fn next_settle(&mut self) -> Settle {
        within(self.settled.recv()).await.unwrap()
    }

    async fn end(self) -> Arc<RunStats> {
        drop(self.events);
        within(self.run).await.unwrap().unwrap();
        self.stats
    }
}

/// Fails the test when `f` waits for something that never comes. The clock is
/// paused and jumps ahead whenever every task waits, so this costs no real time.
async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(3600), f).await.expect("waited an hour for an event that never came")
}

fn lane(partition: i32) -> Lane {
    Lane { topic: "t".into(), partition }
}

#[tokio::test(start_paused = true)]
async fn a_key_runs_one_delivery_at_a_time_in_arrival_order() {
    let mut h = Harness::start(8, Duration::from_secs(10));
    for id in ["a1", "a2", "a3"] {
        h.send(id, Some("conv-a"), 0);
    }
    h.send("b1", Some("conv-b"), 0);
    h.send("x", None, 0);
    let mut first: Vec<String> = vec![h.next_start().await, h.next_start().await, h.next_start().await];
    first.sort();
    assert_eq!(first, ["a1", "b1", "x"], "one per key, keys in parallel");
    // a1 is held; releasing b1 and x starts nothing of conv-a.
    h.handler.release("b1");
    h.handler.release("x");
    assert_eq!(h.next_settle().await, Settle::Ack("b1".into()));
    assert_eq!(h.next_settle().await, Settle::Ack("x".into()));
    assert!(h.started.try_recv().is_err(), "a2 waits for a1");
    h.handler.release("a1");
    assert_eq!(h.next_start().await, "a2");
    h.handler.release("a2");
    assert_eq!(h.next_start().await, "a3");
    h.handler.release("a3");
    let mut acked = Vec::new();
    for _ in 0..3 {
        acked.push(h.next_settle().await);
    }
    assert_eq!(acked, [Settle::Ack("a1".into()), Settle::Ack("a2".into()), Settle::Ack("a3".into())]);
    let stats = h.end().await;
    assert_eq!(stats.acked.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_what_runs() {
    let mut h = Harness::start(2, Duration::from_secs(10));
    for id in ["m1", "m2", "m3", "m4"] {
        h.send(id, None, 0);
    }
    let mut two = [h.next_start().await, h.next_start().await];
    two.sort();
    assert_eq!(two, ["m1", "m2"]);
    assert!(h.started.try_recv().is_err(), "a third waits for a free slot");
    h.handler.release("m1");
    assert_eq!(h.next_start().await, "m3");
    for id in ["m2", "m3", "m4"] {
        h.handler.release(id);
    }
    assert_eq!(h.next_start().await, "m4");
    h.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_revoked_lane_hands_back_what_has_not_started_and_reports_drained_when_its_running_work_ends() {
    let mut h = Harness::start(2, Duration::from_secs(30));
    h.send("p0-running", None, 0);
    h.send("p1-running", None, 1);
    h.send("p0-waiting", None, 0);
    h.send("p1-waiting", None, 1);
    h.next_start().await;
    h.next_start().await;
    let (drained_tx, mut drained) = oneshot::channel();
    h.events.send(SourceEvent::Revoked { lanes: vec![lane(0)], drained: drained_tx }).unwrap();
    assert_eq!(h.next_settle().await, Settle::Requeue("p0-waiting".into()), "unstarted work goes back at once");
    assert!(drained.try_recv().is_err(), "not drained while p0-running runs");
    h.handler.release("p0-running");
    assert_eq!(h.next_settle().await, Settle::Ack("p0-running".into()));
    within(drained).await.expect("drained once its running work finished");
    // Lane 1 is untouched: its waiting delivery starts when a slot frees.
    assert_eq!(h.next_start().await, "p1-waiting");
    h.handler.open("p1-running");
    h.handler.open("p1-waiting");
    h.end().await;
}

#[tokio::test(start_paused = true)]
async fn at_the_revocation_deadline_running_work_is_cancelled_and_handed_back() {
    let mut h = Harness::start(4, Duration::from_secs(5));
    h.send("stuck", Some("k"), 3);
    h.send("behind", Some("k"), 3);
    assert_eq!(h.next_start().await, "stuck");
    let (drained_tx, drained) = oneshot::channel();
    h.events.send(SourceEvent::Revoked { lanes: vec![lane(3)], drained: drained_tx }).unwrap();
    assert_eq!(h.next_settle().await, Settle::Requeue("behind".into()));
    // Nothing releases "stuck": the paused clock runs to the deadline.
    assert_eq!(h.next_settle().await, Settle::Requeue("stuck".into()));
    within(drained).await.unwrap();
    let stats = h.end().await;
    assert_eq!(stats.handed_back.load(Ordering::SeqCst), 2);
    assert_eq!(stats.acked.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_attempt_is_retried_in_its_lane_and_a_persistent_one_is_dead_lettered() {
    let mut h = Harness::start(4, Duration::from_secs(5));
    h.handler.panics.lock().unwrap().insert("flaky".into(), 1);
    h.handler.panics.lock().unwrap().insert("broken".into(), u32::MAX);
    h.handler.open("flaky");
    h.send("flaky", Some("k"), 0);
    h.send("after", Some("k"), 0);
    h.send("broken", None, 0);
    h.handler.open("after");
    let mut settles = Vec::new();
    for _ in 0..3 {
        settles.push(h.next_settle().await);
    }
    assert!(settles.contains(&Settle::Ack("broken".into())), "{settles:?}");
    let flaky = settles.iter().position(|s| *s == Settle::Ack("flaky".into())).unwrap();
    let after = settles.iter().position(|s| *s == Settle::Ack("after".into())).unwrap();
    assert!(flaky < after, "the retry kept its place before the next of its key: {settles:?}");
    let gave_up = h.handler.gave_up.lock().unwrap().clone();
    assert_eq!(gave_up.len(), 1, "{gave_up:?}");
    assert_eq!(gave_up[0].0, "broken");
    assert!(gave_up[0].1.contains("3 attempts") && gave_up[0].1.contains("bug while handling broken"), "{gave_up:?}");
    // flaky: 2 attempts, after: 1, broken: 3 (the configured bound).
    assert_eq!(h.handler.attempts.load(Ordering::SeqCst), 6);
    h.end().await;
}

#[tokio::test(start_paused = true)]
async fn stopping_hands_back_unstarted_work_and_cancels_running_work_at_the_drain_deadline() {
    let mut h = Harness::start(1, Duration::from_secs(2));
    h.send("running", None, 0);
    h.send("queued", None, 0);
    assert_eq!(h.next_start().await, "running");
    h.shutdown.stop_intake.cancel();
    assert_eq!(h.next_settle().await, Settle::Requeue("queued".into()));
    assert_eq!(h.next_settle().await, Settle::Requeue("running".into()));
    let stats = h.end().await;
    assert_eq!(stats.acked.load(Ordering::SeqCst), 0, "nothing unfinished is acked");
}

#[tokio::test(start_paused = true)]
async fn a_stop_after_the_input_ended_still_hands_back_and_drains() {
    let mut h = Harness::start(1, Duration::from_secs(2));
    h.send("running", None, 0);
    h.send("queued", None, 0);
    assert_eq!(h.next_start().await, "running");
    // The input ends while both are held; then the operator stops the run.
    let Harness { events, mut settled, shutdown, run, .. } = h;
    drop(events);
    tokio::task::yield_now().await;
    shutdown.stop_intake.cancel();
    assert_eq!(within(settled.recv()).await.unwrap(), Settle::Requeue("queued".into()));
    assert_eq!(
        within(settled.recv()).await.unwrap(),
        Settle::Requeue("running".into()),
        "cancelled at the drain deadline"
    );
    within(run).await.unwrap().unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_delivery_abandoned_while_waiting_to_retry_gives_up_its_claim() {
    // Retries wait 5 to 10 s; the drain deadline comes after 1 s.
    let mut h = Harness::start_with(2, Duration::from_secs(1), Duration::from_secs(10));
    h.handler.panics.lock().unwrap().insert("failing".into(), u32::MAX);
    h.send("failing", None, 0);
    assert_eq!(h.next_start().await, "failing");
    // Its first attempt panicked; it now waits to retry. Stop the run meanwhile.
    while h.handler.attempts.load(Ordering::SeqCst) < 1 {
        tokio::task::yield_now().await;
    }
    h.shutdown.stop_intake.cancel();
    let settle = h.next_settle().await;
    assert_eq!(settle, Settle::Requeue("failing".into()));
    let abandoned = h.handler.abandoned.lock().unwrap().clone();
    assert_eq!(abandoned, [("failing".to_owned(), 0)], "the claim of delivery #0 is released");
    assert!(h.handler.gave_up.lock().unwrap().is_empty());
    h.end().await;
}

#[tokio::test(start_paused = true)]
async fn a_delivery_waiting_on_another_workers_lease_leaves_its_slot_to_the_rest() {
    // One slot; the first delivery's unit is held by another worker for its next
    // twenty attempts (a dead worker's lease running out).
    let mut h = Harness::start(1, Duration::from_secs(10));
    h.handler.busy.lock().unwrap().insert("leased".into(), 20);
    h.handler.open("leased");
    h.send("leased", Some("k"), 0);
    h.send("leased-next", Some("k"), 0);
    for id in ["free1", "free2", "free3"] {
        h.handler.open(id);
        h.send(id, None, 0);
    }
    h.handler.open("leased-next");
    let mut settles = Vec::new();
    for _ in 0..5 {
        settles.push(h.next_settle().await);
    }
    let at = |id: &str| settles.iter().position(|s| *s == Settle::Ack(id.into())).unwrap();
    assert!(at("free3") < at("leased"), "the others ran while it waited: {settles:?}");
    assert!(at("leased") < at("leased-next"), "its conversation waited behind it: {settles:?}");
    assert_eq!(h.handler.most_inside.load(Ordering::SeqCst), 1, "the budget held");
    let stats = h.end().await;
    assert_eq!(stats.acked.load(Ordering::SeqCst), 5);
}

#[tokio::test(start_paused = true)]
async fn a_delivery_stopped_while_waiting_on_another_workers_lease_is_handed_back() {
    let mut h = Harness::start(1, Duration::from_secs(2));
    h.handler.busy.lock().unwrap().insert("leased".into(), u32::MAX);
    h.send("leased", None, 0);
    h.send("free", None, 0);
    h.handler.open("free");
    assert_eq!(h.next_settle().await, Settle::Ack("free".into()));
    h.shutdown.stop_intake.cancel();
    assert_eq!(h.next_settle().await, Settle::Requeue("leased".into()));
    // The run ends: every count it waits on came back to zero.
    let stats = h.end().await;
    assert_eq!(stats.handed_back.load(Ordering::SeqCst), 1);
}
