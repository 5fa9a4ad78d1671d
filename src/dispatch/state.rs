//! The dispatcher's bookkeeping, shared by its loop and its tasks under one lock:
//! keys and what waits behind them, ready deliveries, lanes and their revocations,
//! and the counts that bound what runs and what is held.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::broker::{Delivery, Lane};

pub(super) struct Pending {
    pub delivery: Delivery,
    pub seq: u64,
}

impl Pending {
    pub fn lane(&self) -> Lane {
        self.delivery.message.lane()
    }
}

pub(super) struct LaneState {
    pub running: usize,
    pub cancel: CancellationToken,
}

pub(super) struct Revocation {
    pub lanes: Vec<Lane>,
    pub drained: Option<oneshot::Sender<()>>,
    pub deadline: Instant,
    /// The deadline passed and the lanes' running deliveries were cancelled.
    pub cancelled: bool,
}

/// The bookkeeping of one run, shared by the dispatcher and its tasks.
pub(super) struct State {
    /// Keys with a delivery running or ready; what waits behind it.
    pub keys: HashMap<String, VecDeque<Pending>>,
    /// Deliveries free to start (no earlier delivery of their key is unfinished).
    pub ready: VecDeque<Pending>,
    pub lanes: HashMap<Lane, LaneState>,
    pub revocations: Vec<Revocation>,
    /// Tasks holding an in-flight slot, each running one delivery. A task whose
    /// delivery waits on another worker's lease gives its slot up while it waits.
    pub running: usize,
    /// Parked tasks whose wait is over and that want a slot back: they come before
    /// new work.
    pub returning: usize,
    /// Deliveries taken in and not yet settled or handed back.
    pub held: usize,
    pub next_seq: u64,
    pub paused: bool,
    /// The current budget, and whether new work may start (ledger ready, not stopping).
    pub allowed: usize,
    pub may_start: bool,
    /// The dispatcher waits for tasks to finish: they notify it.
    pub wake_on_done: bool,
    /// Parent of every lane's cancellation: the drain deadline cancels it.
    pub all_cancel: CancellationToken,
}

impl State {
    pub fn lane(&mut self, lane: Lane) -> &mut LaneState {
        let parent = &self.all_cancel;
        self.lanes.entry(lane).or_insert_with(|| LaneState { running: 0, cancel: parent.child_token() })
    }

    /// The next delivery of `key`, which becomes the key's head; when there is none
    /// the key is forgotten.
    pub fn next_of(&mut self, key: &str) -> Option<Pending> {
        let next = self.keys.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            self.keys.remove(key);
        }
        next
    }

    /// Marks `p` running in its lane; returns the lane's cancellation.
    pub fn begin(&mut self, p: &Pending) -> CancellationToken {
        crate::telemetry::in_flight(self.running);
        let lane = self.lane(p.lane());
        lane.running += 1;
        lane.cancel.clone()
    }

    /// A delivery of `key` in `lane` settled. Returns what its task runs next: the
    /// next delivery of the same key, or else the next ready one, when new work may
    /// start and the budget allows; `None` ends the task.
    pub fn finished(&mut self, lane: &Lane, key: Option<&str>) -> Option<Pending> {
        self.held -= 1;
        if let Some(l) = self.lanes.get_mut(lane) {
            l.running = l.running.saturating_sub(1);
        }
        let follower = key.and_then(|k| self.next_of(k));
        let next = if self.may_start && self.running <= self.allowed && self.returning == 0 {
            follower.or_else(|| self.ready.pop_front())
        } else {
            if let Some(f) = follower {
                self.ready.push_back(f);
            }
            None
        };
        if next.is_none() {
            self.running -= 1;
            crate::telemetry::in_flight(self.running);
        }
        next
    }
}

/// The shared state and the dispatcher's doorbell.
pub(super) struct Sched {
    pub state: std::sync::Mutex<State>,
    pub wake: Notify,
    /// Rung when a slot frees, for parked tasks that want theirs back.
    pub slot_freed: Notify,
}

impl Sched {
    pub fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still the best
        // information there is; keep going with them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A running task gives its slot up while its delivery waits on a unit another
    /// worker holds (a dead worker's lease runs out in seconds, and a prefetch window
    /// full of its redelivered tickets must not stop the rest from being worked on).
    pub fn park(self: &Arc<Self>) -> Parked {
        let mut st = self.lock();
        st.running -= 1;
        crate::telemetry::in_flight(st.running);
        drop(st);
        self.wake.notify_one();
        self.slot_freed.notify_one();
        Parked { sched: self.clone(), returning: false, back: false }
    }
}

/// A parked task's claim on a slot to come back to. Dropped without [`Parked::resume`]
/// (the delivery cancelled or handed back meanwhile), it takes its slot back at once,
/// over the budget if need be, for the task's ending to give back.
pub(super) struct Parked {
    sched: Arc<Sched>,
    returning: bool,
    back: bool,
}

impl Parked {
    /// Waits for a free slot and takes it, before any new work.
    pub async fn resume(mut self) {
        loop {
            let freed = self.sched.slot_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            {
                let mut st = self.sched.lock();
                if !self.returning {
                    self.returning = true;
                    st.returning += 1;
                }
                if st.running < st.allowed {
                    st.running += 1;
                    st.returning -= 1;
                    self.back = true;
                    crate::telemetry::in_flight(st.running);
                    return;
                }
            }
            // The budget may also grow (admission): look again now and then.
            let _ = tokio::time::timeout(RESUME_LOOK, freed).await;
        }
    }
}

/// How often a parked task that wants its slot back looks, when no slot frees.
const RESUME_LOOK: std::time::Duration = std::time::Duration::from_millis(250);

impl Drop for Parked {
    fn drop(&mut self) {
        if self.back {
            return;
        }
        let mut st = self.sched.lock();
        if self.returning {
            st.returning -= 1;
        }
        st.running += 1;
        crate::telemetry::in_flight(st.running);
    }
}

/// Counts a task out even if it unwinds past its own guards.
pub(super) struct TaskGuard<'a> {
    pub sched: &'a Sched,
    pub current: Option<(Lane, Option<String>)>,
}

impl Drop for TaskGuard<'_> {
    fn drop(&mut self) {
        if let Some((lane, key)) = self.current.take() {
            let mut st = self.sched.lock();
            st.held -= 1;
            st.running -= 1;
            crate::telemetry::in_flight(st.running);
            if let Some(l) = st.lanes.get_mut(&lane) {
                l.running = l.running.saturating_sub(1);
            }
            // The key's next delivery must not wait behind a task that is gone.
            if let Some(next) = key.and_then(|k| st.next_of(&k)) {
                st.ready.push_back(next);
            }
            drop(st);
            self.sched.wake.notify_one();
            self.sched.slot_freed.notify_one();
        }
    }
}

/// Tells the source about every revoked lane with nothing left running.
pub(super) fn finish_revocations(st: &mut State) {
    let lanes = &mut st.lanes;
    st.revocations.retain_mut(|r| {
        if r.lanes.iter().any(|l| lanes.get(l).is_some_and(|s| s.running > 0)) {
            return true;
        }
        for l in &r.lanes {
            lanes.remove(l);
        }
        if let Some(tx) = r.drained.take() {
            let _ = tx.send(());
        }
        false
    });
}
