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

use super::{Claim, Ledger, LedgerError};
use crate::ticket::Output;

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
}

#[derive(Debug, Default)]
struct Units {
    /// Answered and published: nothing left to remember but that it is done.
    done: HashSet<u128>,
    /// Everything else.
    active: HashMap<u128, Entry>,
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
        let mut units = self.lock()?;
        if units.done.contains(&key) {
            return Ok(Claim::Done);
        }
        let entry = units.active.entry(key).or_insert(Entry {
            state: State::InProgress { owner: worker_id.to_owned() },
            attempts: 0,
            replay_count,
            cost_usd: 0.0,
        });
        match &mut entry.state {
            State::InProgress { owner } if entry.attempts > 0 && owner == worker_id => {
                Ok(Claim::Fresh { attempts: entry.attempts, prior_cost_usd: entry.cost_usd })
            }
            State::InProgress { .. } if entry.attempts > 0 => Ok(Claim::Busy),
            State::InProgress { .. } => {
                entry.attempts = 1;
                Ok(Claim::Fresh { attempts: 1, prior_cost_usd: 0.0 })
            }
            State::Finished { publishing: Some(_), .. } => Ok(Claim::Busy),
            State::Finished { dead_letter: true, unpublished: None, .. } if replay_count > entry.replay_count => {
                entry.state = State::InProgress { owner: worker_id.to_owned() };
                entry.attempts += 1;
                entry.replay_count = replay_count;
                Ok(Claim::Fresh { attempts: entry.attempts, prior_cost_usd: entry.cost_usd })
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
        Ok(())
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
            Claim::Fresh { attempts, prior_cost_usd } => {
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
