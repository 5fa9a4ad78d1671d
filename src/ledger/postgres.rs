//! The PostgreSQL ledger (deadpool-postgres): the worker's memory across restarts,
//! redeliveries, replays and replicas.
//!
//! Claim protocol: one `INSERT … ON CONFLICT DO UPDATE … WHERE` takes a unit when it
//! is new, when its owner's lease has expired (the owner died), when it comes back
//! from the dead-letter topic with a higher replay count, or when the same claimer asks
//! again (its first claim committed but the answer was lost with the connection). PostgreSQL serialises
//! concurrent claims of one key, so two replicas never both work on a unit. Finishing
//! is one statement too (unit, cost records, routing decision and dead letter in CTEs)
//! and is fenced by ownership: a worker whose lease was taken over cannot finish.
//! The output is kept in the decision row, so a redelivery of a unit whose publish was
//! never confirmed republishes it instead of calling providers again.
//!
//! Leases are short (`database.lease_ms`, seconds) and renewed: every unit a worker
//! holds (claimed, or finished and not yet marked published) has its lease extended
//! by one statement every quarter lease while the worker lives. A dead worker's units
//! are taken over within a lease, not after the longest a ticket could take.
//!
//! The calls in between are journaled (`calls`, see the V6 migration): an intent
//! before each call, fenced by ownership, and its end as it completes; a takeover's
//! claim reads the journal back, and finishing moves it into `cost_records`.
//!
//! Each unit takes three statements (claim, finish, mark published) plus two journal
//! writes per provider call, each shared by every unit queued at the time (group
//! commit, `batch.rs`).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

use std::collections::{HashMap, HashSet};

use super::batch::Batcher;
use super::connect::{self, Session};
use super::{Claim, JournaledCall, Ledger, LedgerError, Rejected};
use crate::settings::DatabaseSettings;
use crate::ticket::{CostRecord, DeadLetter, Output};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The PostgreSQL ledger.
#[derive(Clone)]
pub struct PgLedger {
    pool: Pool,
    claims: Batcher<ClaimRequest, Claim>,
    finishes: Batcher<FinishRow, ()>,
    publishes: Batcher<String, ()>,
    journal: Batcher<JournalWrite, ()>,
    /// Units this process holds, with their claimer: the leases it renews.
    held: Arc<Mutex<HashMap<String, String>>>,
    lease_secs: f64,
}

/// One write to the call journal.
enum JournalWrite {
    /// A call about to be sent: its lost estimate, under its unit's owner.
    Sent { call_id: String, unit_id: String, owner: String, record: String },
    /// How it ended: its record and answer, or `None` when it never reached the provider.
    Ended { call_id: String, record: Option<String>, answer: Option<String> },
}

/// Units per batch: a batch is one statement, so this bounds its parameters' size.
const MAX_BATCH: usize = 256;
/// Batches of one kind in flight at once; the second starts only when a quarter batch
/// is waiting (`Batcher::spawn`). Eager parallel batches were smaller and cost the
/// server more per unit (BENCHMARKS.md).
const BATCH_CONCURRENCY: usize = 2;

struct ClaimRequest {
    unit_id: String,
    ticket_id: String,
    replay_count: i32,
    worker_id: String,
}

/// One unit's share of a finish statement, prepared in the finishing task: each
/// caller serialises its own output instead of the batch doing all of them in turn,
/// and nothing of the output is copied.
struct FinishRow {
    unit_id: String,
    owner: String,
    status: String,
    output: String,
    cost: f64,
    tier: Option<String>,
    provider: Option<String>,
    model: Option<String>,
    category: Option<String>,
    language: Option<String>,
    latency_ms: Option<i64>,
    decision: serde_json::Value,
    dead_letter: Option<serde_json::Value>,
    costs: Vec<CostRow>,
}

struct CostRow {
    call_id: String,
    stage: String,
    provider: String,
    model: String,
    input: i64,
    cached: i64,
    output: i64,
    cost: f64,
    baseline: f64,
    version: String,
    outcome: String,
    latency: i64,
    estimated: bool,
    at: String,
}

/// Classifies a database error: the server unreachable, restarting, failing over or
/// overloaded is [`LedgerError::Unavailable`] (wait and retry); a statement the server
/// rejects for what it is, is [`LedgerError::Other`].
pub(crate) fn classify(e: impl std::error::Error + 'static) -> LedgerError {
    let text = crate::error_chain(&e);
    // Anything but a query's own error (the pool failing to connect, say) is the
    // database being out of reach.
    let Some(pg) = (&e as &dyn std::error::Error).downcast_ref::<tokio_postgres::Error>() else {
        return LedgerError::Unavailable(text);
    };
    let reachable = match pg.as_db_error() {
        Some(db) => !transient(db.code().code()),
        // The connection closed or failed underneath; a type conversion error is a bug.
        None => {
            !(pg.is_closed()
                || std::error::Error::source(pg).is_some_and(|s| s.is::<std::io::Error>())
                || text.contains("timeout")
                || text.contains("TLS"))
        }
    };
    if reachable {
        LedgerError::Other(text)
    } else {
        LedgerError::Unavailable(text)
    }
}

/// SQLSTATEs that retrying later can cure.
fn transient(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources: connections, memory, disk
        || code.starts_with("58") // system error (I/O)
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" // shut down by an administrator or a crash; starting up
            | "57014" // canceled: the statement timeout
            | "40001" | "40P01" // serialization failure, deadlock
            | "25006" // read-only transaction: a standby, during a failover
        )
}

/// Builds a connection pool from the settings (URL or parts, TLS, timeouts).
pub fn pool(settings: &DatabaseSettings, session: Session) -> Result<Pool, LedgerError> {
    let target = connect::target(settings, session)?;
    let manager =
        Manager::from_config(target.config, target.tls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    let timeout = Duration::from_millis(settings.connect_timeout_ms.max(1));
    Pool::builder(manager)
        .max_size(settings.pool_size.max(1))
        .wait_timeout(Some(timeout))
        .create_timeout(Some(timeout))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| LedgerError::Other(format!("database pool: {e}")))
}

/// A pool for reading the ledger (`report`): checked against this build's schema, and
/// without the ledger sessions' statement timeout.
pub async fn reader_pool(settings: &DatabaseSettings) -> Result<Pool, LedgerError> {
    let pool = pool(settings, Session::Admin)?;
    check_schema(&pool, settings).await?;
    Ok(pool)
}

/// Applies the embedded migrations (idempotent), creating the database first if the
/// server has no database of that name. Returns the versions applied now.
pub async fn migrate(settings: &DatabaseSettings) -> Result<Vec<i32>, LedgerError> {
    migrate_to(settings, None).await
}

/// [`migrate`], stopping at schema version `target` (all of them if `None`): for
/// testing an upgrade from an older schema with data in it.
pub async fn migrate_to(settings: &DatabaseSettings, target: Option<u32>) -> Result<Vec<i32>, LedgerError> {
    create_database_if_missing(settings).await?;
    let pool = pool(settings, Session::Admin)?;
    let mut client = pool.get().await.map_err(classify)?;
    let mut runner = embedded::migrations::runner();
    if let Some(version) = target {
        runner = runner.set_target(refinery::Target::Version(version));
    }
    let report =
        runner.run_async(&mut **client).await.map_err(|e| LedgerError::Other(format!("migration failed: {e}")))?;
    Ok(report.applied_migrations().iter().map(|m| m.version() as i32).collect())
}

async fn create_database_if_missing(settings: &DatabaseSettings) -> Result<(), LedgerError> {
    let connect::Target { config, tls } = connect::target(settings, Session::Admin)?;
    let Some(name) = config.get_dbname().map(str::to_owned) else { return Ok(()) };
    let mut maintenance = config.clone();
    maintenance.dbname("postgres");
    let (client, connection) = maintenance.connect(tls).await.map_err(classify)?;
    let driver = tokio::spawn(connection);
    let exists =
        client.query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name]).await.map_err(classify)?.is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        client.batch_execute(&format!("CREATE DATABASE {quoted}")).await.map_err(classify)?;
        tracing::info!(database = %name, "created the database");
    }
    drop(client);
    driver.abort();
    Ok(())
}

/// The newest migration this build knows.
pub fn latest_version() -> i32 {
    embedded::migrations::runner().get_migrations().iter().map(|m| m.version() as i32).max().unwrap_or(0)
}

/// The database the settings point at, as a URL without its password: what a hint
/// to the operator names.
fn database_of(settings: &DatabaseSettings) -> String {
    let Ok(target) = connect::target(settings, Session::Admin) else {
        return crate::settings::redact_url(&settings.url);
    };
    let c = &target.config;
    let host = match c.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = c.get_ports().first().copied().unwrap_or(5432);
    let user = c.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    format!("postgres://{user}{host}:{port}/{}", c.get_dbname().unwrap_or("postgres"))
}

/// Refuses a database whose schema is not this build's, naming the fix.
async fn check_schema(pool: &Pool, settings: &DatabaseSettings) -> Result<(), LedgerError> {
    let migrate = format!("`ticketflow migrate --database-url {}`", database_of(settings));
    let client = match pool.get().await {
        Ok(c) => c,
        Err(e) => {
            let text = crate::error_chain(&e);
            let hint = if text.contains("does not exist") { format!(" ({migrate} creates it)") } else { String::new() };
            return Err(LedgerError::Unavailable(format!("cannot connect to the database: {text}{hint}")));
        }
    };
    let expected = latest_version();
    let found: Option<i32> = match client.query_one("SELECT max(version) FROM refinery_schema_history", &[]).await {
        Ok(row) => row.get(0),
        Err(e) if e.as_db_error().is_some_and(|d| d.code() == &tokio_postgres::error::SqlState::UNDEFINED_TABLE) => {
            None
        }
        Err(e) => return Err(classify(e)),
    };
    match found {
        Some(v) if v == expected => {}
        Some(v) if v > expected => {
            return Err(LedgerError::Other(format!(
                "the database schema is version {v}, newer than this build's {expected}: upgrade ticketflow"
            )))
        }
        other => {
            return Err(LedgerError::Other(format!(
                "the database is not migrated (schema version {}, this build needs {expected}): run {migrate}",
                other.map_or("none".to_string(), |v| v.to_string())
            )))
        }
    }
    Ok(())
}

impl PgLedger {
    /// Connects and checks that the database is migrated to this build's schema.
    pub async fn connect(settings: &DatabaseSettings) -> Result<Self, LedgerError> {
        let pool = pool(settings, Session::Ledger)?;
        check_schema(&pool, settings).await?;
        let lease_secs = Duration::from_millis(settings.lease_ms.max(1)).as_secs_f64();
        let claims = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, BATCH_CONCURRENCY, move |batch| claim_batch(pool.clone(), lease_secs, batch))
        };
        let finishes = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, BATCH_CONCURRENCY, move |batch| finish_batch(pool.clone(), lease_secs, batch))
        };
        let publishes = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, BATCH_CONCURRENCY, move |batch| publish_batch(pool.clone(), batch))
        };
        let journal = {
            let pool = pool.clone();
            Batcher::spawn(MAX_BATCH, BATCH_CONCURRENCY, move |batch| journal_batch(pool.clone(), batch))
        };
        let held = Arc::new(Mutex::new(HashMap::new()));
        let every = Duration::from_millis(settings.lease_ms.max(4) / 4);
        tokio::spawn(renew_leases(pool.clone(), Arc::downgrade(&held), every, lease_secs));
        Ok(PgLedger { pool, claims, finishes, publishes, journal, held, lease_secs })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        self.pool.get().await.map_err(classify)
    }

    fn hold(&self, unit_id: &str, claimer: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.insert(unit_id.to_owned(), claimer.to_owned());
        }
    }

    fn let_go(&self, unit_id: &str) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(unit_id);
        }
    }
}

/// Extends the lease of every unit `held` lists, every `every`, until the ledger is
/// dropped. A failed renewal is retried at the next tick; if the database stays away
/// for a whole lease, the units may be taken over, and the fence stops this worker
/// from finishing them.
async fn renew_leases(pool: Pool, held: Weak<Mutex<HashMap<String, String>>>, every: Duration, lease_secs: f64) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(held) = held.upgrade() else { return };
        let (units, owners): (Vec<String>, Vec<String>) = match held.lock() {
            Ok(h) => h.iter().map(|(u, o)| (u.clone(), o.clone())).unzip(),
            Err(_) => return,
        };
        drop(held);
        if units.is_empty() {
            continue;
        }
        let renewed = async {
            let client = pool.get().await.map_err(classify)?;
            let statement = client.prepare_cached(RENEW).await.map_err(classify)?;
            client.execute(&statement, &[&units, &owners, &lease_secs]).await.map_err(classify)
        };
        match renewed.await {
            Ok(n) => tracing::trace!(held = units.len(), renewed = n, "leases renewed"),
            Err(e) => tracing::warn!(held = units.len(), error = %e, "could not renew leases; retrying"),
        }
    }
}

const CLAIM: &str = "
INSERT INTO units (unit_id, ticket_id, status, owner, lease_until, attempts, replay_count)
SELECT c.unit_id, c.ticket_id, 'in_progress', c.owner, now() + make_interval(secs => $5), 1, c.replay_count
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[]) AS c(unit_id, ticket_id, owner, replay_count)
ON CONFLICT (unit_id) DO UPDATE SET
    owner = EXCLUDED.owner,
    lease_until = EXCLUDED.lease_until,
    attempts = units.attempts + CASE WHEN units.owner = EXCLUDED.owner THEN 0 ELSE 1 END,
    status = 'in_progress',
    replay_count = EXCLUDED.replay_count,
    published = false
WHERE (units.status = 'in_progress' AND (units.lease_until < now() OR units.owner = EXCLUDED.owner))
   OR (units.status = 'dead_letter' AND units.published AND EXCLUDED.replay_count > units.replay_count)
RETURNING unit_id, attempts, cost_usd, xmax <> 0, extract(epoch FROM now() - created_at)::float8";

/// Lease renewal of the units a worker holds: in progress, or finished and still
/// being published by it.
const RENEW: &str = "
UPDATE units SET lease_until = now() + make_interval(secs => $3)
FROM UNNEST($1::text[], $2::text[]) AS h(unit_id, owner)
WHERE units.unit_id = h.unit_id AND units.owner = h.owner AND (units.status = 'in_progress' OR NOT units.published)";

/// The journal of units claimed again (a takeover, a retry, a replay), in the order sent.
const JOURNAL_OF: &str = "
SELECT unit_id, done, record, answer, settled FROM calls WHERE unit_id = ANY($1::text[])
ORDER BY sent_at, call_id";

/// Journal writes of many units: intents (fenced by ownership, and locking the unit's
/// row so that a takeover committing meanwhile is seen), ends, and intents of calls
/// that never reached the provider dropped. Each is idempotent: a batch whose commit
/// was not acknowledged (a cut connection) is run again.
const JOURNAL: &str = "
WITH sent AS (
    INSERT INTO calls (call_id, unit_id, owner, record)
    SELECT s.call_id::uuid, s.unit_id, s.owner, s.record
    FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[]) AS s(call_id, unit_id, owner, record)
    JOIN units u ON u.unit_id = s.unit_id AND u.owner = s.owner AND u.status = 'in_progress'
    FOR SHARE OF u
    -- A write retried after its answer was lost with the connection finds its row.
    ON CONFLICT (call_id) DO UPDATE SET owner = EXCLUDED.owner WHERE calls.owner = EXCLUDED.owner
    RETURNING call_id::text
), ended AS (
    UPDATE calls SET done = true, record = e.record, answer = e.answer
    FROM UNNEST($5::text[], $6::text[], $7::text[]) AS e(call_id, record, answer)
    WHERE calls.call_id = e.call_id::uuid AND e.record IS NOT NULL
), dropped AS (
    DELETE FROM calls USING UNNEST($5::text[], $6::text[]) AS e(call_id, record)
    WHERE calls.call_id = e.call_id::uuid AND e.record IS NULL
)
SELECT call_id FROM sent";

/// What a unit that could not be claimed is doing; for a finished but unpublished unit,
/// its output, from the latest decision row.
const CLAIM_STATE: &str = "
SELECT u.unit_id, u.status, u.published, d.output, coalesce(u.lease_until > now(), false)
FROM units u
LEFT JOIN LATERAL (
    SELECT output FROM decisions
    WHERE decisions.unit_id = u.unit_id AND u.status <> 'in_progress' AND NOT u.published
    ORDER BY id DESC LIMIT 1
) d ON true
WHERE u.unit_id = ANY($1::text[])";

const FINISH: &str = "
WITH f AS (
    SELECT * FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::float8[], $6::text[], $7::text[],
        $8::text[], $9::text[], $10::text[], $11::int8[])
        AS f(unit_id, owner, status, output, cost, tier, provider, model, category, language, latency_ms)
), u AS (
    UPDATE units SET
        status = f.status, published = false, cost_usd = units.cost_usd + f.cost,
        tier = f.tier, provider = f.provider, model = f.model, category = f.category, language = f.language,
        latency_ms = f.latency_ms, finished_at = now(),
        -- The finisher keeps the lease while it publishes: nobody else republishes
        -- the output unless the finisher dies before confirming.
        lease_until = now() + make_interval(secs => $29)
    FROM f
    WHERE units.unit_id = f.unit_id AND units.owner = f.owner AND units.status = 'in_progress'
    RETURNING units.unit_id, units.ticket_id, units.status
), costs AS (
    INSERT INTO cost_records (call_id, unit_id, ticket_id, stage, provider, model, input_tokens,
        cached_input_tokens, output_tokens, cost_usd, baseline_cost_usd, pricing_version, outcome,
        latency_ms, estimated, at)
    SELECT c.call_id::uuid, u.unit_id, u.ticket_id, c.stage, c.provider, c.model, c.input_tokens,
        c.cached_input_tokens, c.output_tokens, c.cost_usd, c.baseline_cost_usd, c.pricing_version,
        c.outcome, c.latency_ms, c.estimated, c.at::timestamptz
    FROM UNNEST($12::text[], $13::text[], $14::text[], $15::text[], $16::text[], $17::int8[], $18::int8[],
        $19::int8[], $20::float8[], $21::float8[], $22::text[], $23::text[], $24::int8[], $25::bool[],
        $26::text[])
        AS c(unit_id, call_id, stage, provider, model, input_tokens, cached_input_tokens, output_tokens,
             cost_usd, baseline_cost_usd, pricing_version, outcome, latency_ms, estimated, at)
    -- No ON CONFLICT: a call's id is a fresh UUID and the ownership fence lets a unit's
    -- output be finished once, so a duplicate is a bug to surface, not to skip; and the
    -- conflict check cost an extra index probe per record.
    JOIN u ON u.unit_id = c.unit_id
), decision AS (
    INSERT INTO decisions (unit_id, ticket_id, status, tier, reasons, triage, moderation, worker_id, output)
    SELECT d.unit_id, u.ticket_id, d.status, d.tier, ARRAY(SELECT jsonb_array_elements_text(d.reasons)),
        d.triage, d.moderation, d.worker_id, f.output
    FROM jsonb_to_recordset($27::jsonb) AS d(unit_id text, status text, tier text, reasons jsonb,
        triage jsonb, moderation jsonb, worker_id text)
    JOIN u ON u.unit_id = d.unit_id
    JOIN f ON f.unit_id = d.unit_id
), dead AS (
    INSERT INTO dead_letters (unit_id, ticket_id, kind, message, attempts, replay_count, source, payload,
        payload_encoding, worker_id, failed_at)
    SELECT d.unit_id, u.ticket_id, d.kind, d.message, d.attempts, d.replay_count, d.source, d.payload,
        d.payload_encoding, d.worker_id, d.failed_at::timestamptz
    FROM jsonb_to_recordset($28::jsonb) AS d(unit_id text, kind text, message text, attempts int,
        replay_count int, source jsonb, payload text, payload_encoding text, worker_id text, failed_at text)
    JOIN u ON u.unit_id = d.unit_id
), journaled AS (
    -- The unit's calls are in its output's cost records now. A dead letter's stay,
    -- settled, for its replay to reuse.
    DELETE FROM calls USING u WHERE calls.unit_id = u.unit_id AND u.status <> 'dead_letter'
), settled AS (
    UPDATE calls SET settled = true FROM u WHERE calls.unit_id = u.unit_id AND u.status = 'dead_letter'
)
SELECT unit_id FROM u";

const PUBLISH: &str = "UPDATE units SET published = true, owner = NULL, lease_until = NULL
     WHERE unit_id = ANY($1::text[])";

/// Takes a rejected input: new, or seen but unpublished with its publisher gone.
/// Returns whether it was seen before; no row when it is published or being published.
const CLAIM_REJECTED: &str = "
INSERT INTO rejected_inputs (key, owner, lease_until) VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (key) DO UPDATE SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until
WHERE NOT rejected_inputs.published AND (rejected_inputs.lease_until < now() OR rejected_inputs.owner = EXCLUDED.owner)
RETURNING xmax <> 0";

const INSERT_REJECTED: &str = "
INSERT INTO dead_letters (unit_id, ticket_id, kind, message, attempts, replay_count, source, payload,
    payload_encoding, worker_id, failed_at)
VALUES (NULL, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::timestamptz)";

fn record_text(record: &CostRecord) -> Result<String, LedgerError> {
    serde_json::to_string(record).map_err(|e| LedgerError::Other(format!("serializing for the ledger: {e}")))
}

fn json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, LedgerError> {
    serde_json::to_value(v).map_err(|e| LedgerError::Other(format!("serializing for the ledger: {e}")))
}

/// The dead letter's fields as `jsonb_to_recordset` reads them.
fn dead_letter_record(unit_id: &str, d: &DeadLetter) -> Result<serde_json::Value, LedgerError> {
    Ok(serde_json::json!({
        "unit_id": unit_id,
        "worker_id": d.worker_id,
        "kind": d.error.kind.as_str(),
        "message": d.error.message,
        "attempts": d.attempts,
        "replay_count": d.replay_count,
        "source": json(&d.source)?,
        "payload": d.payload,
        "payload_encoding": json(&d.payload_encoding)?,
        "failed_at": d.failed_at,
    }))
}

async fn claim_batch(pool: Pool, lease_secs: f64, batch: Vec<ClaimRequest>) -> Vec<Result<Claim, LedgerError>> {
    let n = batch.len();
    match claim_batch_inner(&pool, lease_secs, batch).await {
        Ok(results) => results,
        Err(e) => vec![Err(e); n],
    }
}

async fn claim_batch_inner(
    pool: &Pool,
    lease_secs: f64,
    batch: Vec<ClaimRequest>,
) -> Result<Vec<Result<Claim, LedgerError>>, LedgerError> {
    // One statement cannot claim the same row twice: a repeated unit in a batch is
    // answered from its first occurrence (Busy if that one was taken).
    let mut first: HashMap<&str, usize> = HashMap::new();
    let (mut ids, mut tickets, mut owners, mut replays) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (i, r) in batch.iter().enumerate() {
        if let std::collections::hash_map::Entry::Vacant(slot) = first.entry(r.unit_id.as_str()) {
            slot.insert(i);
            ids.push(r.unit_id.as_str());
            tickets.push(r.ticket_id.as_str());
            owners.push(r.worker_id.as_str());
            replays.push(r.replay_count);
        }
    }
    let client = pool.get().await.map_err(classify)?;
    let statement = client.prepare_cached(CLAIM).await.map_err(classify)?;
    let rows = client.query(&statement, &[&ids, &tickets, &owners, &replays, &lease_secs]).await.map_err(classify)?;
    let mut claims: HashMap<String, Claim> = HashMap::new();
    let mut again: Vec<String> = Vec::new();
    for row in rows {
        let unit_id: String = row.get(0);
        let attempts: i32 = row.get(1);
        if row.get::<_, bool>(3) {
            again.push(unit_id.clone());
        }
        let age = std::time::Duration::from_secs_f64(row.get::<_, f64>(4).max(0.0));
        let claim =
            Claim::Fresh { attempts: attempts.max(1) as u32, prior_cost_usd: row.get(2), journal: Vec::new(), age };
        claims.insert(unit_id, claim);
    }
    if !again.is_empty() {
        let statement = client.prepare_cached(JOURNAL_OF).await.map_err(classify)?;
        for row in client.query(&statement, &[&again]).await.map_err(classify)? {
            let unit_id: String = row.get(0);
            let call = journaled_call(&unit_id, row.get(1), row.get(2), row.get(3), row.get(4))?;
            if let Some(Claim::Fresh { journal, .. }) = claims.get_mut(&unit_id) {
                journal.push(call);
            }
        }
    }
    let missing: Vec<&str> = ids.iter().copied().filter(|id| !claims.contains_key(*id)).collect();
    if !missing.is_empty() {
        let statement = client.prepare_cached(CLAIM_STATE).await.map_err(classify)?;
        for row in client.query(&statement, &[&missing]).await.map_err(classify)? {
            let unit_id: String = row.get(0);
            let status: String = row.get(1);
            let published: bool = row.get(2);
            let output: Option<String> = row.get(3);
            let leased: bool = row.get(4);
            let claim = match (status.as_str(), published, output) {
                ("in_progress", _, _) => Claim::Busy,
                // Finished and still being published by a live worker.
                (_, false, Some(_)) if leased => Claim::Busy,
                (_, false, Some(output)) => match serde_json::from_str::<Output>(&output) {
                    Ok(output) => Claim::Unpublished(Box::new(output)),
                    Err(e) => return Err(LedgerError::Other(format!("stored output of {unit_id} is unreadable: {e}"))),
                },
                _ => Claim::Done,
            };
            claims.insert(unit_id, claim);
        }
    }
    Ok(batch
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let claim = claims
                .get(&r.unit_id)
                .cloned()
                .ok_or_else(|| LedgerError::Other(format!("unit {} neither claimed nor found", r.unit_id)))?;
            let repeated = first.get(r.unit_id.as_str()).is_some_and(|&f| f != i);
            Ok(match claim {
                Claim::Fresh { .. } if repeated => Claim::Busy,
                other => other,
            })
        })
        .collect())
}

async fn finish_batch(pool: Pool, lease_secs: f64, batch: Vec<FinishRow>) -> Vec<Result<(), LedgerError>> {
    let units: Vec<String> = batch.iter().map(|r| r.unit_id.clone()).collect();
    match finish_batch_inner(&pool, lease_secs, batch).await {
        Ok(finished) => units
            .into_iter()
            .map(|unit| if finished.contains(&unit) { Ok(()) } else { Err(LedgerError::LeaseLost(unit)) })
            .collect(),
        Err(e) => vec![Err(e); units.len()],
    }
}

/// Column arrays of a finish batch.
#[derive(Default)]
struct FinishColumns {
    unit_id: Vec<String>,
    owner: Vec<String>,
    status: Vec<String>,
    output: Vec<String>,
    cost: Vec<f64>,
    tier: Vec<Option<String>>,
    provider: Vec<Option<String>>,
    model: Vec<Option<String>>,
    category: Vec<Option<String>>,
    language: Vec<Option<String>>,
    latency_ms: Vec<Option<i64>>,
    decisions: Vec<serde_json::Value>,
    dead_letters: Vec<serde_json::Value>,
}

/// Column arrays of the batch's cost records.
#[derive(Default)]
struct CostColumns {
    unit_id: Vec<String>,
    call_id: Vec<String>,
    stage: Vec<String>,
    provider: Vec<String>,
    model: Vec<String>,
    input: Vec<i64>,
    cached: Vec<i64>,
    output: Vec<i64>,
    cost: Vec<f64>,
    baseline: Vec<f64>,
    version: Vec<String>,
    outcome: Vec<String>,
    latency: Vec<i64>,
    estimated: Vec<bool>,
    at: Vec<String>,
}

fn enum_text<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// Prepares one unit's finish: its columns, cost records (with the baseline price the
/// pipeline gave them), routing decision and dead letter.
fn finish_row(unit_id: &str, worker_id: &str, output: &Output) -> Result<FinishRow, LedgerError> {
    let records = output.costs();
    let costs = records
        .iter()
        .map(|record| CostRow {
            call_id: record.call_id.clone(),
            stage: enum_text(&record.stage),
            provider: record.provider.clone(),
            model: record.model.clone(),
            input: record.input_tokens as i64,
            cached: record.cached_input_tokens as i64,
            output: record.output_tokens as i64,
            cost: record.cost_usd,
            baseline: record.baseline_cost_usd,
            version: record.pricing_version.clone(),
            outcome: enum_text(&record.outcome),
            latency: record.latency_ms as i64,
            estimated: record.estimated,
            at: record.at.clone(),
        })
        .collect();
    let text =
        serde_json::to_string(output).map_err(|e| LedgerError::Other(format!("serializing for the ledger: {e}")))?;
    let cost = records.iter().map(|x| x.cost_usd).sum();
    Ok(match output {
        Output::Reply { reply, .. } => {
            let status = enum_text(&reply.status);
            FinishRow {
                decision: serde_json::json!({
                    "unit_id": unit_id, "status": status, "tier": reply.route.tier,
                    "reasons": reply.route.reasons, "triage": json(&reply.triage)?,
                    "moderation": reply.moderation.as_ref().map(json).transpose()?, "worker_id": worker_id,
                }),
                dead_letter: None,
                unit_id: unit_id.to_owned(),
                owner: worker_id.to_owned(),
                status,
                output: text,
                cost,
                tier: Some(reply.route.tier.clone()),
                provider: reply.route.provider.clone(),
                model: reply.route.model.clone(),
                category: Some(reply.triage.category.clone()),
                language: Some(reply.triage.language.clone()),
                latency_ms: Some(reply.latency_ms as i64),
                costs,
            }
        }
        Output::DeadLetter { dead_letter, .. } => FinishRow {
            decision: serde_json::json!({
                "unit_id": unit_id, "status": "dead_letter", "tier": null,
                "reasons": [format!("dead_letter:{}", dead_letter.error.kind.as_str())],
                "triage": null, "moderation": null, "worker_id": worker_id,
            }),
            dead_letter: Some(dead_letter_record(unit_id, dead_letter)?),
            unit_id: unit_id.to_owned(),
            owner: worker_id.to_owned(),
            status: "dead_letter".into(),
            output: text,
            cost,
            tier: None,
            provider: None,
            model: None,
            category: None,
            language: None,
            latency_ms: None,
            costs,
        },
    })
}

async fn finish_batch_inner(
    pool: &Pool,
    lease_secs: f64,
    batch: Vec<FinishRow>,
) -> Result<HashSet<String>, LedgerError> {
    let mut f = FinishColumns::default();
    let mut c = CostColumns::default();
    for r in batch {
        for record in r.costs {
            c.unit_id.push(r.unit_id.clone());
            c.call_id.push(record.call_id);
            c.stage.push(record.stage);
            c.provider.push(record.provider);
            c.model.push(record.model);
            c.input.push(record.input);
            c.cached.push(record.cached);
            c.output.push(record.output);
            c.cost.push(record.cost);
            c.baseline.push(record.baseline);
            c.version.push(record.version);
            c.outcome.push(record.outcome);
            c.latency.push(record.latency);
            c.estimated.push(record.estimated);
            c.at.push(record.at);
        }
        f.unit_id.push(r.unit_id);
        f.owner.push(r.owner);
        f.status.push(r.status);
        f.output.push(r.output);
        f.cost.push(r.cost);
        f.tier.push(r.tier);
        f.provider.push(r.provider);
        f.model.push(r.model);
        f.category.push(r.category);
        f.language.push(r.language);
        f.latency_ms.push(r.latency_ms);
        f.decisions.push(r.decision);
        f.dead_letters.extend(r.dead_letter);
    }
    let decisions = serde_json::Value::Array(f.decisions);
    let dead_letters = serde_json::Value::Array(f.dead_letters);
    let client = pool.get().await.map_err(classify)?;
    let statement = client.prepare_cached(FINISH).await.map_err(classify)?;
    let rows = client
        .query(
            &statement,
            &[
                &f.unit_id,
                &f.owner,
                &f.status,
                &f.output,
                &f.cost,
                &f.tier,
                &f.provider,
                &f.model,
                &f.category,
                &f.language,
                &f.latency_ms,
                &c.unit_id,
                &c.call_id,
                &c.stage,
                &c.provider,
                &c.model,
                &c.input,
                &c.cached,
                &c.output,
                &c.cost,
                &c.baseline,
                &c.version,
                &c.outcome,
                &c.latency,
                &c.estimated,
                &c.at,
                &decisions,
                &dead_letters,
                &lease_secs,
            ],
        )
        .await
        .map_err(classify)?;
    Ok(rows.into_iter().map(|row| row.get::<_, String>(0)).collect())
}

/// A journal row as a claim returns it: an unfinished call's lost estimate, or the
/// call's record and answer.
fn journaled_call(
    unit_id: &str,
    done: bool,
    record: String,
    answer: Option<String>,
    settled: bool,
) -> Result<JournaledCall, LedgerError> {
    let record: CostRecord = serde_json::from_str(&record)
        .map_err(|e| LedgerError::Other(format!("journaled call of {unit_id} is unreadable: {e}")))?;
    Ok(JournaledCall { record, answer: if done { answer } else { None }, settled })
}

async fn journal_batch(pool: Pool, batch: Vec<JournalWrite>) -> Vec<Result<(), LedgerError>> {
    let n = batch.len();
    let (mut s_call, mut s_unit, mut s_owner, mut s_record) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut e_call, mut e_record, mut e_answer) = (Vec::new(), Vec::new(), Vec::new());
    for write in &batch {
        match write {
            JournalWrite::Sent { call_id, unit_id, owner, record } => {
                s_call.push(call_id.as_str());
                s_unit.push(unit_id.as_str());
                s_owner.push(owner.as_str());
                s_record.push(record.as_str());
            }
            JournalWrite::Ended { call_id, record, answer } => {
                e_call.push(call_id.as_str());
                e_record.push(record.as_deref());
                e_answer.push(answer.as_deref());
            }
        }
    }
    let result = async {
        let client = pool.get().await.map_err(classify)?;
        let statement = client.prepare_cached(JOURNAL).await.map_err(classify)?;
        let rows = client
            .query(&statement, &[&s_call, &s_unit, &s_owner, &s_record, &e_call, &e_record, &e_answer])
            .await
            .map_err(classify)?;
        Ok::<HashSet<String>, LedgerError>(rows.into_iter().map(|row| row.get(0)).collect())
    };
    match result.await {
        Ok(sent) => batch
            .iter()
            .map(|write| match write {
                JournalWrite::Sent { call_id, unit_id, .. } if !sent.contains(call_id) => {
                    Err(LedgerError::LeaseLost(unit_id.clone()))
                }
                _ => Ok(()),
            })
            .collect(),
        Err(e) => vec![Err(e); n],
    }
}

async fn publish_batch(pool: Pool, batch: Vec<String>) -> Vec<Result<(), LedgerError>> {
    let n = batch.len();
    let result = async {
        let client = pool.get().await.map_err(classify)?;
        let statement = client.prepare_cached(PUBLISH).await.map_err(classify)?;
        client.execute(&statement, &[&batch]).await.map_err(classify)?;
        Ok::<(), LedgerError>(())
    }
    .await;
    match result {
        Ok(()) => vec![Ok(()); n],
        Err(e) => vec![Err(e); n],
    }
}

#[async_trait]
impl Ledger for PgLedger {
    async fn claim(
        &self,
        unit_id: &str,
        ticket_id: &str,
        replay_count: u32,
        worker_id: &str,
    ) -> Result<Claim, LedgerError> {
        let claim = self
            .claims
            .call(ClaimRequest {
                unit_id: unit_id.to_owned(),
                ticket_id: ticket_id.to_owned(),
                replay_count: i32::try_from(replay_count).unwrap_or(i32::MAX),
                worker_id: worker_id.to_owned(),
            })
            .await?;
        if let Claim::Fresh { .. } = claim {
            self.hold(unit_id, worker_id);
        }
        Ok(claim)
    }

    async fn finish(&self, unit_id: &str, worker_id: &str, output: &Output) -> Result<(), LedgerError> {
        let finished = self.finishes.call(finish_row(unit_id, worker_id, output)?).await;
        if let Err(LedgerError::LeaseLost(_)) = finished {
            self.let_go(unit_id);
        }
        finished
    }

    async fn mark_published(&self, unit_id: &str) -> Result<(), LedgerError> {
        // Renewal stops whatever the outcome: a unit left unpublished by a failed
        // mark must become republishable once its lease runs out.
        self.let_go(unit_id);
        self.publishes.call(unit_id.to_owned()).await
    }

    async fn call_sent(&self, owner: &str, estimate: &CostRecord) -> Result<(), LedgerError> {
        self.journal
            .call(JournalWrite::Sent {
                call_id: estimate.call_id.clone(),
                unit_id: estimate.unit_id.clone(),
                owner: owner.to_owned(),
                record: record_text(estimate)?,
            })
            .await
    }

    async fn call_ended(
        &self,
        _unit_id: &str,
        call_id: &str,
        record: Option<&CostRecord>,
        answer: Option<&str>,
    ) -> Result<(), LedgerError> {
        let record = record.map(record_text).transpose()?;
        let answer = answer.map(|a| a.replace('\0', "\u{FFFD}"));
        self.journal.call(JournalWrite::Ended { call_id: call_id.to_owned(), record, answer }).await
    }

    async fn journal(&self, unit_id: &str) -> Result<Vec<JournaledCall>, LedgerError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(JOURNAL_OF).await.map_err(classify)?;
        let rows = client.query(&statement, &[&vec![unit_id]]).await.map_err(classify)?;
        rows.into_iter()
            .map(|row| journaled_call(unit_id, row.get(1), row.get(2), row.get(3), row.get(4)))
            .filter(|call| !call.as_ref().is_ok_and(|c| c.settled))
            .collect()
    }

    async fn release(&self, unit_id: &str, worker_id: &str) -> Result<(), LedgerError> {
        self.let_go(unit_id);
        let client = self.client().await?;
        client
            .execute(
                "UPDATE units SET lease_until = now() - interval '1 second'
                 WHERE unit_id = $1 AND owner = $2 AND (status = 'in_progress' OR NOT published)",
                &[&unit_id, &worker_id],
            )
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn ping(&self) -> Result<(), LedgerError> {
        let client = self.client().await?;
        let standby: bool = client.query_one("SELECT pg_is_in_recovery()", &[]).await.map_err(classify)?.get(0);
        if standby {
            return Err(LedgerError::Unavailable(
                "the server is a standby (in recovery): it cannot take writes".into(),
            ));
        }
        Ok(())
    }

    async fn claim_rejected(&self, key: &str, worker_id: &str) -> Result<Rejected, LedgerError> {
        let client = self.client().await?;
        let lease_secs = self.lease_secs;
        let claimed = client.query_opt(CLAIM_REJECTED, &[&key, &worker_id, &lease_secs]).await.map_err(classify)?;
        if let Some(row) = claimed {
            return Ok(if row.get::<_, bool>(0) { Rejected::Unpublished } else { Rejected::New });
        }
        let row = client
            .query_one("SELECT published FROM rejected_inputs WHERE key = $1", &[&key])
            .await
            .map_err(classify)?;
        Ok(if row.get::<_, bool>(0) { Rejected::Done } else { Rejected::Busy })
    }

    async fn rejected_published(&self, key: &str) -> Result<(), LedgerError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE rejected_inputs SET published = true, owner = NULL, lease_until = NULL WHERE key = $1",
                &[&key],
            )
            .await
            .map_err(classify)?;
        Ok(())
    }

    async fn record_rejected(&self, d: &DeadLetter) -> Result<(), LedgerError> {
        let client = self.client().await?;
        let source = json(&d.source)?;
        let encoding = json(&d.payload_encoding)?.as_str().unwrap_or("utf8").to_owned();
        let attempts = d.attempts as i32;
        let replay = d.replay_count as i32;
        // PostgreSQL text cannot hold NUL: such a payload is stored base64-encoded
        // (so it can still be replayed byte for byte), other text with U+FFFD.
        let (payload, encoding) = if d.payload.contains('\0') {
            use base64::Engine as _;
            let bytes = d.payload_bytes().map_err(|e| LedgerError::Other(format!("dead letter payload: {e}")))?;
            (base64::engine::general_purpose::STANDARD.encode(bytes), "base64".to_owned())
        } else {
            (d.payload.clone(), encoding)
        };
        let text = |s: &str| s.replace('\0', "\u{FFFD}");
        let ticket_id = d.ticket_id.as_deref().map(text);
        let message = text(&d.error.message);
        client
            .execute(
                INSERT_REJECTED,
                &[
                    &ticket_id,
                    &d.error.kind.as_str(),
                    &message,
                    &attempts,
                    &replay,
                    &source,
                    &payload,
                    &encoding,
                    &d.worker_id,
                    &d.failed_at,
                ],
            )
            .await
            .map_err(classify)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outages_are_told_from_rejected_statements_by_sqlstate() {
        for code in ["08006", "57P01", "57P03", "53300", "57014", "40P01", "25006"] {
            assert!(transient(code), "{code} is an outage");
        }
        for code in ["23505", "42P01", "22P02", "42501"] {
            assert!(!transient(code), "{code} is not cured by waiting");
        }
    }
}
