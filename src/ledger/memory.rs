//! In-memory ledger with the same semantics as the PostgreSQL one. Used by
//! `ticketflow process` and tests.
//!
//! Memory: a unit that is answered and published shrinks to a 16-byte hash in a set
//! (about 35 bytes with the set's own overhead), which is all duplicate detection
//! needs; only units in progress, awaiting publication or dead-lettered keep a full
//! entry. A million-ticket run holds about 40 MB here; it is the one part of a run
//! whose memory grows with the number of distinct tickets.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Claim, JournaledCall, Ledger, LedgerError, Rejected};
use crate::ticket::{CostRecord, Output};

#[derive(Debug)]
enum State {
    InProgress {
        owner: String,
    },
    /// `publishing`: the finisher, while it is still publishing; others wait instead
    /// of republishing the same output.
    Finished {
        dead_letter: bool,
        unpublished: Option<Box<Output>>,
        publishing: Option<String>,
    },
}

#[derive(Debug)]
struct Entry {
    state: State,
    attempts: u32,
    replay_count: u32,
    cost_usd: f64,
    /// When the unit was first claimed.
    since: std::time::Instant,
}

#[derive(Debug, Default)]
struct Units {
    /// Answered and published: nothing left to remember but that it is done.
    done: HashSet<u128>,
    /// Everything else.
    active: HashMap<u128, Entry>,
    /// The call journals of units not finished yet.
    journals: HashMap<u128, Vec<JournaledCall>>,
    /// Rejected inputs by key: whether their dead letter is published.
    rejected: HashMap<u128, bool>,
}

/// A ledger that lives as long as the process.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    units: Mutex<Units>,
}

impl MemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }

    fn key(unit_id: &str) -> u128 {
        xxhash_rust::xxh3::xxh3_128(unit_id.as_bytes())
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Units>, LedgerError> {
        self.units.lock().map_err(|_| LedgerError::Other("memory ledger lock poisoned".into()))
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn claim(
        &self,
        unit_id: &str,
        _ticket_id: &str,
        replay_count: u32,
        worker_id: &str,
    ) -> Result<Claim, LedgerError> {
        let key = Self::key(unit_id);
        let mut guard = self.lock()?;
        let units = &mut *guard;
        if units.done.contains(&key) {
            return Ok(Claim::Done);
        }
        let journals = &units.journals;
        let journal = || journals.get(&key).cloned().unwrap_or_default();
        let entry = units.active.entry(key).or_insert(Entry {
            state: State::InProgress { owner: worker_id.to_owned() },
            attempts: 0,
            replay_count,
            cost_usd: 0.0,
            since: std::time::Instant::now(),
        });
        match &mut entry.state {
            State::InProgress { owner } if entry.attempts > 0 && owner == worker_id => {
                let (attempts, prior_cost_usd) = (entry.attempts, entry.cost_usd);
                let age = entry.since.elapsed();
                Ok(Claim::Fresh { attempts, prior_cost_usd, journal: journal(), age })
            }
            State::InProgress { .. } if entry.attempts > 0 => Ok(Claim::Busy),
            State::InProgress { .. } => {
                entry.attempts = 1;
                Ok(Claim::Fresh { attempts: 1, prior_cost_usd: 0.0, journal: journal(), age: entry.since.elapsed() })
            }
            State::Finished { publishing: Some(_), .. } => Ok(Claim::Busy),
            State::Finished { dead_letter: true, unpublished: None, .. } if replay_count > entry.replay_count => {
                entry.state = State::InProgress { owner: worker_id.to_owned() };
                entry.attempts += 1;
                entry.replay_count = replay_count;
                let (attempts, prior_cost_usd) = (entry.attempts, entry.cost_usd);
                Ok(Claim::Fresh { attempts, prior_cost_usd, journal: journal(), age: entry.since.elapsed() })
            }
            State::Finished { unpublished: Some(output), .. } => Ok(Claim::Unpublished(output.clone())),
            State::Finished { .. } => Ok(Claim::Done),
        }
    }

    async fn finish(&self, unit_id: &str, worker_id: &str, output: &Output) -> Result<(), LedgerError> {
        let mut units = self.lock()?;
        let entry = units
            .active
            .get_mut(&Self::key(unit_id))
            .ok_or_else(|| LedgerError::Other(format!("finish of unclaimed unit {unit_id}")))?;
        // Fenced like the PostgreSQL ledger: only the claimer finishes.
        if !matches!(&entry.state, State::InProgress { owner } if owner == worker_id) {
            return Err(LedgerError::LeaseLost(unit_id.to_owned()));
        }
        entry.cost_usd += output.costs().iter().map(|c| c.cost_usd).sum::<f64>();
        entry.state = State::Finished {
            dead_letter: matches!(output, Output::DeadLetter { .. }),
            unpublished: Some(Box::new(output.clone())),
            publishing: Some(worker_id.to_owned()),
        };
        let key = Self::key(unit_id);
        if matches!(output, Output::DeadLetter { .. }) {
            units.journals.entry(key).or_default().iter_mut().for_each(|c| c.settled = true);
        } else {
            units.journals.remove(&key);
        }
        Ok(())
    }

    async fn call_sent(&self, owner: &str, estimate: &CostRecord) -> Result<(), LedgerError> {
        let key = Self::key(&estimate.unit_id);
        let mut units = self.lock()?;
        let held =
            matches!(units.active.get(&key), Some(Entry { state: State::InProgress { owner: o }, .. }) if o == owner);
        if !held {
            return Err(LedgerError::LeaseLost(estimate.unit_id.clone()));
        }
        let call = JournaledCall { record: estimate.clone(), answer: None, settled: false };
        units.journals.entry(key).or_default().push(call);
        Ok(())
    }

    async fn call_ended(
        &self,
        unit_id: &str,
        call_id: &str,
        record: Option<&CostRecord>,
        answer: Option<&str>,
    ) -> Result<(), LedgerError> {
        let mut units = self.lock()?;
        let Some(journal) = units.journals.get_mut(&Self::key(unit_id)) else { return Ok(()) };
        let Some(i) = journal.iter().position(|c| c.record.call_id == call_id) else { return Ok(()) };
        match record {
            Some(record) => {
                journal[i] = JournaledCall { record: record.clone(), answer: answer.map(str::to_owned), settled: false }
            }
            None => {
                journal.remove(i);
            }
        }
        Ok(())
    }

    async fn journal(&self, unit_id: &str) -> Result<Vec<JournaledCall>, LedgerError> {
        let units = self.lock()?;
        let journal = units.journals.get(&Self::key(unit_id));
        Ok(journal.into_iter().flatten().filter(|c| !c.settled).cloned().collect())
    }

    async fn mark_published(&self, unit_id: &str) -> Result<(), LedgerError> {
        let key = Self::key(unit_id);
        let mut units = self.lock()?;
        let answered = match units.active.get_mut(&key) {
            Some(Entry { state: State::Finished { unpublished, dead_letter, publishing }, .. }) => {
                *unpublished = None;
                *publishing = None;
                !*dead_letter
            }
            _ => false,
        };
        // A dead-lettered unit keeps its entry: a replay needs its attempts and cost.
        if answered {
            units.active.remove(&key);
            units.done.insert(key);
        }
        Ok(())
    }

    async fn claim_rejected(&self, key: &str, _worker_id: &str) -> Result<Rejected, LedgerError> {
        let mut units = self.lock()?;
        Ok(match units.rejected.insert(Self::key(key), false) {
            None => Rejected::New,
            Some(true) => {
                units.rejected.insert(Self::key(key), true);
                Rejected::Done
            }
            Some(false) => Rejected::Unpublished,
        })
    }

    async fn rejected_published(&self, key: &str) -> Result<(), LedgerError> {
        self.lock()?.rejected.insert(Self::key(key), true);
        Ok(())
    }

    async fn record_rejected(&self, _dead_letter: &crate::ticket::DeadLetter) -> Result<(), LedgerError> {
        // Nothing to remember: the dead letter itself is the record in embedded mode.
        Ok(())
    }

    async fn release(&self, unit_id: &str, worker_id: &str) -> Result<(), LedgerError> {
        let key = Self::key(unit_id);
        let mut units = self.lock()?;
        if let Some(entry) = units.active.get_mut(&key) {
            // A publish that failed: let a redelivery republish the stored output.
            if let State::Finished { publishing, .. } = &mut entry.state {
                if publishing.as_deref() == Some(worker_id) {
                    *publishing = None;
                }
                return Ok(());
            }
            if matches!(&entry.state, State::InProgress { owner } if owner == worker_id) {
                if entry.attempts <= 1 {
                    units.active.remove(&key);
                } else {
                    // A replayed unit goes back to its dead-lettered state.
                    entry.state = State::Finished { dead_letter: true, unpublished: None, publishing: None };
                    entry.replay_count = entry.replay_count.saturating_sub(1);
                    entry.attempts -= 1;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ticket::*;

    pub(crate) fn dead_letter_output() -> Output {
        Output::DeadLetter {
            dead_letter: DeadLetter {
                schema_version: 1,
                ticket_id: Some("T".into()),
                unit_id: Some("T:1".into()),
                error: DeadLetterError { kind: ErrorKind::ProvidersExhausted, message: "down".into() },
                attempts: 1,
                replay_count: 0,
                source: SourceRef { topic: "t".into(), partition: 0, offset: 0 },
                failed_at: now_rfc3339(),
                worker_id: "w".into(),
                payload: "{}".into(),
                payload_encoding: PayloadEncoding::Utf8,
            },
            costs: vec![CostRecord {
                schema_version: 1,
                ticket_id: "T".into(),
                unit_id: "T:1".into(),
                call_id: "c".into(),
                stage: Stage::Triage,
                provider: "p".into(),
                model: "m".into(),
                input_tokens: 1,
                cached_input_tokens: 0,
                output_tokens: 1,
                cost_usd: 0.5,
                pricing_version: "test".into(),
                outcome: CallOutcome::Error,
                latency_ms: 1,
                at: now_rfc3339(),
                estimated: false,
                baseline_cost_usd: 0.0,
            }],
        }
    }

    #[tokio::test]
    async fn second_claim_while_in_progress_is_busy_then_done() {
        let l = MemoryLedger::new();
        assert!(matches!(l.claim("T:1", "T", 0, "w#1").await.unwrap(), Claim::Fresh { attempts: 1, .. }));
        assert!(matches!(l.claim("T:1", "T", 0, "w#2").await.unwrap(), Claim::Busy));
        // The same claimer asking again (its answer was lost) gets the unit back.
        assert!(matches!(l.claim("T:1", "T", 0, "w#1").await.unwrap(), Claim::Fresh { attempts: 1, .. }));
        // Only the claimer may finish or release it.
        assert!(matches!(l.finish("T:1", "w#2", &dead_letter_output()).await, Err(LedgerError::LeaseLost(_))));
        l.release("T:1", "w#2").await.unwrap();
        assert!(matches!(l.claim("T:1", "T", 0, "w#3").await.unwrap(), Claim::Busy), "still w#1's");
        l.finish("T:1", "w#1", &dead_letter_output()).await.unwrap();
        assert!(matches!(l.claim("T:1", "T", 0, "w").await.unwrap(), Claim::Busy), "its finisher is publishing");
        l.release("T:1", "w#2").await.unwrap();
        assert!(matches!(l.claim("T:1", "T", 0, "w").await.unwrap(), Claim::Busy), "only the finisher releases");
        l.release("T:1", "w#1").await.unwrap();
        assert!(matches!(l.claim("T:1", "T", 0, "w").await.unwrap(), Claim::Unpublished(_)), "the publish failed");
        l.mark_published("T:1").await.unwrap();
        assert!(matches!(l.claim("T:1", "T", 0, "w").await.unwrap(), Claim::Done));
    }

    #[tokio::test]
    async fn replay_of_a_dead_letter_is_fresh_and_carries_prior_cost() {
        let l = MemoryLedger::new();
        l.claim("T:1", "T", 0, "w").await.unwrap();
        l.finish("T:1", "w", &dead_letter_output()).await.unwrap();
        l.mark_published("T:1").await.unwrap();
        match l.claim("T:1", "T", 1, "w").await.unwrap() {
            Claim::Fresh { attempts, prior_cost_usd, .. } => {
                assert_eq!(attempts, 2);
                assert!((prior_cost_usd - 0.5).abs() < 1e-12);
            }
            other => panic!("expected fresh, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn released_unit_can_be_claimed_again() {
        let l = MemoryLedger::new();
        l.claim("T:1", "T", 0, "w").await.unwrap();
        l.release("T:1", "w").await.unwrap();
        assert!(matches!(l.claim("T:1", "T", 0, "w").await.unwrap(), Claim::Fresh { attempts: 1, .. }));
    }
}
