//! The invariants, checked from what the output topics or queues, the ledger and the
//! mock provider hold once the run settled, never from the workers' own logs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use serde_json::Value;
use ticketflow::mock_provider::MockServer;

use crate::{Outputs, PLANTED_KEY};

/// Figures and violations of one run.
#[derive(Default)]
pub struct Verdict {
    pub violations: Vec<String>,
    pub replies: usize,
    pub copies: usize,
    pub dead_letters: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub double_paid: usize,
    /// Calls the provider was paid for but no cost record holds, not even a `lost` one.
    pub paid_unrecorded: usize,
    /// Cost records of calls cut off in flight (outcome `lost`).
    pub lost_calls: usize,
    pub order_violations: usize,
    /// Kinds of the dead letters of valid tickets.
    pub valid_dead: BTreeMap<String, usize>,
    /// Tickets dead-lettered and later answered after a replay.
    pub replayed_answered: usize,
}

impl Verdict {
    pub fn fail(&mut self, what: String) {
        if self.violations.len() < 30 {
            self.violations.push(what);
        }
    }
}

/// What a run promises, which depends on its scenario.
pub struct Promises {
    /// Valid tickets (`C-0` .. `C-{n-1}`) and poison messages sent.
    pub valid: usize,
    pub poison: usize,
    /// Conversations answered in order (Kafka; RabbitMQ's input shards, or one worker
    /// on a single queue).
    pub ordered: bool,
    /// Dead letters of valid tickets were replayed: each must end as a reply too.
    pub replayed: bool,
}

fn parse(bytes: &[u8], what: &str) -> Result<Value, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("an unreadable {what}: {e}"))
}

pub async fn check(
    outputs: &Outputs,
    db: &tokio_postgres::Client,
    mock: &MockServer,
    logs: &Path,
    p: &Promises,
) -> Result<Verdict, String> {
    let mut v = Verdict::default();
    // Tickets dead-lettered at some point: after a replay they are answered after the
    // later tickets of their conversation, so their order is not judged.
    let mut once_dead: HashSet<String> = HashSet::new();
    for bytes in &outputs.dead {
        if let Some(ticket) = parse(bytes, "dead letter")?["ticket_id"].as_str() {
            once_dead.insert(ticket.to_owned());
        }
    }
    // RabbitMQ's replay takes the dead letters off their queue: the ledger keeps them.
    let recorded = db
        .query(
            "SELECT ticket_id FROM dead_letters WHERE ticket_id IS NOT NULL \
             UNION SELECT ticket_id FROM units WHERE replay_count > 0",
            &[],
        )
        .await
        .map_err(|e| format!("reading the ledger: {e}"))?;
    once_dead.extend(recorded.iter().map(|r| r.get::<_, String>(0)));
    // Replies: one per ticket; copies identical; conversations in order. A
    // conversation's replies must share a partition (their key): in two, no consumer
    // could tell their order, which counts as a violation.
    let mut first: HashMap<String, Value> = HashMap::new();
    let mut home: HashMap<String, usize> = HashMap::new();
    for (at, partition) in outputs.replies.iter().enumerate() {
        let mut last: HashMap<String, usize> = HashMap::new();
        let mut inverted: HashSet<String> = HashSet::new();
        for bytes in partition {
            let reply = parse(bytes, "reply")?;
            let ticket = reply["ticket_id"].as_str().unwrap_or_default().to_owned();
            if let Some(earlier) = first.get(&ticket) {
                if *earlier != reply {
                    v.duplicated += 1;
                    v.fail(format!("{ticket} answered twice with different replies"));
                }
                v.copies += 1;
                continue;
            }
            let Some(index) = ticket.strip_prefix("C-").and_then(|i| i.parse::<usize>().ok()) else {
                v.fail(format!("a reply to `{ticket}`, which was never sent"));
                continue;
            };
            let conversation = reply["conversation_id"].as_str().unwrap_or_default().to_owned();
            if once_dead.contains(&ticket) {
                first.insert(ticket, reply);
                continue;
            }
            let elsewhere = *home.entry(conversation.clone()).or_insert(at) != at;
            if elsewhere && inverted.insert(conversation.clone()) {
                v.order_violations += 1;
                if p.ordered {
                    v.fail(format!("{conversation}: C-{index} answered in another partition than its earlier turns"));
                }
            }
            if let Some(before) = last.insert(conversation.clone(), index) {
                if before > index && inverted.insert(conversation.clone()) {
                    v.order_violations += 1;
                    if p.ordered {
                        v.fail(format!("{conversation}: C-{index} answered after C-{before}"));
                    }
                }
            }
            first.insert(ticket, reply);
        }
    }
    v.replies = first.len();
    // Dead letters: the poison, once each (copies alike: a message that never became
    // a ticket has no unit in the ledger, so one redelivered after its ack was lost
    // is dead-lettered again), and valid tickets no reply answered.
    let mut dead: HashMap<String, Value> = HashMap::new();
    let mut valid_dead: HashSet<String> = HashSet::new();
    for bytes in &outputs.dead {
        let letter = parse(bytes, "dead letter")?;
        if let Some(ticket) = letter["ticket_id"].as_str().filter(|t| t.starts_with("C-")) {
            if first.contains_key(ticket) && !p.replayed {
                v.duplicated += 1;
                v.fail(format!("{ticket} both answered and dead-lettered"));
            }
            if valid_dead.insert(ticket.to_owned()) {
                let kind = letter["error"]["kind"].as_str().unwrap_or("?").to_owned();
                *v.valid_dead.entry(kind).or_default() += 1;
            }
            continue;
        }
        if dead.insert(letter["payload"].to_string(), letter).is_some() {
            v.copies += 1;
        }
    }
    v.dead_letters = dead.len() + valid_dead.len();
    if dead.len() != p.poison {
        v.fail(format!("{} poison messages sent, {} distinct ones dead-lettered", p.poison, dead.len()));
    }
    for i in 0..p.valid {
        let ticket = format!("C-{i}");
        let answered = first.contains_key(&ticket);
        if !answered && !valid_dead.contains(&ticket) {
            v.lost += 1;
            v.fail(format!("{ticket} ended as neither a reply nor a dead letter"));
        }
        if p.replayed && !answered {
            v.fail(format!("{ticket} still dead after its replay"));
        }
    }
    // Paid calls: each published once (copies identical), each recorded once, and
    // the money adds up everywhere.
    let mut calls: HashMap<String, f64> = HashMap::new();
    for bytes in &outputs.costs {
        let cost = parse(bytes, "cost record")?;
        let amount = cost["cost_usd"].as_f64().unwrap_or(f64::NAN);
        if let Some(earlier) = calls.insert(cost["call_id"].as_str().unwrap_or_default().to_owned(), amount) {
            if earlier != amount {
                v.double_paid += 1;
                v.fail(format!("call {} published with two prices", cost["call_id"]));
            }
        }
    }
    let row = db
        .query_one("SELECT count(*), coalesce(sum(cost_usd), 0) FROM cost_records", &[])
        .await
        .map_err(|e| format!("reading the ledger: {e}"))?;
    let (recorded, spend): (i64, f64) = (row.get(0), row.get(1));
    if recorded as usize != calls.len() {
        v.double_paid += (recorded as usize).abs_diff(calls.len());
        v.fail(format!("{recorded} calls in the ledger, {} published", calls.len()));
    }
    let published: f64 = calls.values().sum();
    // Every reply carries its ticket's spend; a dead letter's calls are in its cost
    // records only. A replayed ticket's reply carries the cost of every attempt.
    let replied: f64 = first.values().map(|r| r["cost_usd"].as_f64().unwrap_or(0.0)).sum();
    let dead_spend: f64 = if p.replayed {
        0.0
    } else {
        db.query_one("SELECT coalesce(sum(cost_usd), 0) FROM units WHERE status = 'dead_letter'", &[])
            .await
            .map_err(|e| format!("reading the ledger: {e}"))?
            .get(0)
    };
    // Written so that a NaN anywhere fails it.
    let adds_up = (spend - published).abs() <= 1e-9 && (spend - replied - dead_spend).abs() <= 1e-6;
    if !adds_up {
        v.fail(format!(
            "costs do not add up: ledger ${spend:.6}, cost records ${published:.6}, replies ${replied:.6} + dead letters ${dead_spend:.6}"
        ));
    }
    v.lost_calls = paid_calls(&mut v, db, mock).await?;
    // A ticket must never die waiting on our own rate limiter: pacing is ours.
    let paced: i64 = db
        .query_one(
            "SELECT count(*) FROM dead_letters WHERE message LIKE '%no capacity before the ticket''s deadline%'",
            &[],
        )
        .await
        .map_err(|e| format!("reading the ledger: {e}"))?
        .get(0);
    if paced > 0 {
        v.fail(format!("{paced} tickets dead-lettered while waiting on our own rate limiter"));
    }
    // RabbitMQ's replay takes the dead letters off their queue: the ledger tells.
    v.replayed_answered = db
        .query_one("SELECT count(*) FROM units WHERE replay_count > 0 AND status <> 'dead_letter'", &[])
        .await
        .map(|r| r.get::<_, i64>(0) as usize)
        .map_err(|e| format!("reading the ledger: {e}"))?;
    // No secret anywhere.
    let mut leaked = Vec::new();
    for entry in std::fs::read_dir(logs).map_err(|e| e.to_string())?.flatten() {
        if std::fs::read(entry.path()).is_ok_and(|t| t.windows(PLANTED_KEY.len()).any(|w| w == PLANTED_KEY.as_bytes()))
        {
            leaked.push(entry.path().display().to_string());
        }
    }
    let everything = outputs.replies.iter().flatten().chain(&outputs.dead).chain(&outputs.costs);
    if everything.into_iter().any(|o| o.windows(PLANTED_KEY.len()).any(|w| w == PLANTED_KEY.as_bytes())) {
        leaked.push("an output".into());
    }
    if !leaked.is_empty() {
        v.fail(format!("the API key appears in {}", leaked.join(", ")));
    }
    Ok(v)
}

/// The provider's own count of paid calls (answers and refusals) per ticket, stage and
/// provider against the ledger's cost records. Every call is recorded exactly once,
/// as what it was (`ok`, `refused`) or, when its answer never came back to a worker,
/// as `lost` (or `timeout`: the answer came after we stopped waiting), so per ticket,
/// stage and provider: known answers and refusals ≤ paid ≤ known + lost + timed out.
/// More known than paid: a call recorded that was never made, or twice. More paid
/// than all records: a call whose record vanished. And one stage of a ticket answered
/// twice is paid twice, replays included (a replay resumes from the unit's journal).
/// Returns the number of `lost` records.
async fn paid_calls(v: &mut Verdict, db: &tokio_postgres::Client, mock: &MockServer) -> Result<usize, String> {
    type Key = (String, String, String);
    // Per ticket, stage and provider: known (ok, refused), uncertain (lost, timeout), ok.
    let mut ledger: HashMap<Key, (i64, i64, i64)> = HashMap::new();
    let rows = db
        .query(
            "SELECT ticket_id, stage, provider, count(*) FILTER (WHERE outcome IN ('ok', 'refused')), \
             count(*) FILTER (WHERE outcome IN ('lost', 'timeout')), count(*) FILTER (WHERE outcome = 'ok') \
             FROM cost_records GROUP BY 1, 2, 3",
            &[],
        )
        .await
        .map_err(|e| format!("reading the ledger: {e}"))?;
    for row in rows {
        ledger.insert((row.get(0), row.get(1), row.get(2)), (row.get(3), row.get(4), row.get(5)));
    }
    let lost: i64 = db
        .query_one("SELECT count(*) FROM cost_records WHERE outcome = 'lost'", &[])
        .await
        .map_err(|e| format!("reading the ledger: {e}"))?
        .get(0);
    let mut provider: HashMap<Key, i64> = HashMap::new();
    for c in mock.tagged_calls() {
        *provider.entry((c.tag, c.stage, c.provider)).or_default() += c.paid as i64;
    }
    let keys: HashSet<_> = ledger.keys().chain(provider.keys()).cloned().collect();
    let mut answers: HashMap<(String, String), i64> = HashMap::new();
    for key in keys {
        let (known, uncertain, ok) = ledger.get(&key).copied().unwrap_or((0, 0, 0));
        let paid = provider.get(&key).copied().unwrap_or(0);
        if known > paid {
            v.double_paid += (known - paid) as usize;
            v.fail(format!("{} {} at {}: {known} calls recorded as made, {paid} paid", key.0, key.1, key.2));
        } else if paid > known + uncertain {
            v.paid_unrecorded += (paid - known - uncertain) as usize;
        }
        *answers.entry((key.0, key.1)).or_default() += ok;
    }
    for ((ticket, stage), ok) in answers {
        if ok > 1 {
            v.double_paid += (ok - 1) as usize;
            v.fail(format!("{ticket}: its {stage} answered and paid {ok} times"));
        }
    }
    Ok(lost as usize)
}
