//! The unit's calls journaled in the ledger: the chain's [`CallJournal`] for one
//! claim, and the resumption of a unit from the journal its claim returned.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use crate::ledger::{JournaledCall, Ledger, LedgerError};
use crate::providers::chain::{CallJournal, JournalStop, UnitCalls};
use crate::providers::pricing::PriceTable;
use crate::ticket::CostRecord;

/// Journals one claim's calls in the ledger, keeping the first failure for the
/// pipeline to act on (a lost lease, an outage the ledger did not ride out).
pub(super) struct LedgerJournal {
    ledger: Arc<dyn Ledger>,
    unit_id: String,
    claimer: String,
    failure: Mutex<Option<LedgerError>>,
}

impl LedgerJournal {
    pub fn new(ledger: Arc<dyn Ledger>, unit_id: &str, claimer: &str) -> Arc<Self> {
        Arc::new(LedgerJournal {
            ledger,
            unit_id: unit_id.to_owned(),
            claimer: claimer.to_owned(),
            failure: Mutex::new(None),
        })
    }

    /// Why the journal stopped the unit's calls, if it did.
    pub fn failure(&self) -> Option<LedgerError> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    fn stop(&self, e: LedgerError) -> JournalStop {
        tracing::info!(unit_id = %self.unit_id, error = %e, "the journal stopped the unit's calls");
        if let Ok(mut f) = self.failure.lock() {
            f.get_or_insert(e);
        }
        JournalStop
    }
}

#[async_trait]
impl CallJournal for LedgerJournal {
    async fn sent(&self, estimate: &CostRecord) -> Result<(), JournalStop> {
        self.ledger.call_sent(&self.claimer, estimate).await.map_err(|e| self.stop(e))
    }

    async fn ended(&self, call_id: &str, record: Option<&CostRecord>, answer: Option<&str>) -> Result<(), JournalStop> {
        self.ledger.call_ended(&self.unit_id, call_id, record, answer).await.map_err(|e| self.stop(e))
    }
}

/// Takes the calls of earlier owners into `calls`: their records count for the unit
/// (a call cut off in flight as `lost`), and their answers are reused.
pub(super) fn resume(calls: &mut UnitCalls, journal: Vec<JournaledCall>, prices: &PriceTable) {
    if journal.is_empty() {
        return;
    }
    let lost = journal.iter().filter(|c| c.record.outcome == crate::ticket::CallOutcome::Lost).count();
    tracing::info!(unit_id = %calls.unit_id, calls = journal.len(), lost, "resuming the unit from its journal");
    for JournaledCall { mut record, answer, settled } in journal {
        // The baseline price is not stored with the record.
        prices.fill_baseline(&mut record);
        calls.resume(record, answer, settled);
    }
}
