//! The PostgreSQL ledger (deadpool-postgres): the worker's memory across restarts,
//! redeliveries, replays and replicas.
//!
//! Claim protocol: one `INSERT … ON CONFLICT DO UPDATE … WHERE` takes a unit when it
//! is new, when its owner's lease has expired (the owner died), or when it comes back
//! from the dead-letter topic with a higher replay count. PostgreSQL serialises
//! concurrent claims of one key, so two replicas never both work on a unit. Finishing
//! is one statement too (unit, cost records, routing decision and dead letter in CTEs)
//! and is fenced by ownership: a worker whose lease was taken over cannot finish.
//! Each unit costs three round trips: claim, finish, mark published.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::NoTls;

use super::{Claim, Ledger, LedgerError};
use crate::providers::pricing::PriceTable;
use crate::providers::Usage;
use crate::settings::DatabaseSettings;
use crate::ticket::{DeadLetter, Output};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// The PostgreSQL ledger.
#[derive(Clone)]
pub struct PgLedger {
    pool: Pool,
    lease: Duration,
    prices: PriceTable,
}

fn unavailable(e: impl std::error::Error) -> LedgerError {
    LedgerError::Unavailable(crate::error_chain(&e))
}

/// Builds a connection pool from the settings.
pub fn pool(settings: &DatabaseSettings) -> Result<Pool, LedgerError> {
    let mut config: tokio_postgres::Config =
        settings.url.parse().map_err(|e| LedgerError::Other(format!("database.url: {e}")))?;
    config.connect_timeout(Duration::from_millis(settings.connect_timeout_ms.max(1)));
    config.application_name("ticketflow");
    let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
    Pool::builder(manager)
        .max_size(settings.pool_size.max(1))
        .wait_timeout(Some(Duration::from_millis(settings.connect_timeout_ms.max(1))))
        .create_timeout(Some(Duration::from_millis(settings.connect_timeout_ms.max(1))))
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .build()
        .map_err(|e| LedgerError::Other(format!("database pool: {e}")))
}

/// Applies the embedded migrations (idempotent), creating the database first if the
/// server has no database of that name. Returns the versions applied now.
pub async fn migrate(settings: &DatabaseSettings) -> Result<Vec<i32>, LedgerError> {
    create_database_if_missing(settings).await?;
    let pool = pool(settings)?;
    let mut client = pool.get().await.map_err(unavailable)?;
    let report = embedded::migrations::runner()
        .run_async(&mut **client)
        .await
        .map_err(|e| LedgerError::Other(format!("migration failed: {e}")))?;
    Ok(report.applied_migrations().iter().map(|m| m.version() as i32).collect())
}

async fn create_database_if_missing(settings: &DatabaseSettings) -> Result<(), LedgerError> {
    let config: tokio_postgres::Config =
        settings.url.parse().map_err(|e| LedgerError::Other(format!("database.url: {e}")))?;
    let Some(name) = config.get_dbname().map(str::to_owned) else { return Ok(()) };
    let mut maintenance = config.clone();
    maintenance.dbname("postgres");
    maintenance.connect_timeout(Duration::from_millis(settings.connect_timeout_ms.max(1)));
    let (client, connection) = maintenance.connect(NoTls).await.map_err(unavailable)?;
    let driver = tokio::spawn(connection);
    let exists = client
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
        .await
        .map_err(unavailable)?
        .is_some();
    if !exists {
        let quoted = format!("\"{}\"", name.replace('"', "\"\""));
        client.batch_execute(&format!("CREATE DATABASE {quoted}")).await.map_err(unavailable)?;
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

impl PgLedger {
    /// Connects and checks that the database is migrated to this build's schema.
    pub async fn connect(settings: &DatabaseSettings, prices: PriceTable) -> Result<Self, LedgerError> {
        let pool = pool(settings)?;
        let client = match pool.get().await {
            Ok(c) => c,
            Err(e) => {
                let text = crate::error_chain(&e);
                let hint = if text.contains("does not exist") { " (`ticketflow migrate` creates it)" } else { "" };
                return Err(LedgerError::Unavailable(format!("cannot connect to the database: {text}{hint}")));
            }
        };
        let expected = latest_version();
        let found: Option<i32> = match client.query_one("SELECT max(version) FROM refinery_schema_history", &[]).await {
            Ok(row) => row.get(0),
            Err(e)
                if e.as_db_error().is_some_and(|d| d.code() == &tokio_postgres::error::SqlState::UNDEFINED_TABLE) =>
            {
                None
            }
            Err(e) => return Err(unavailable(e)),
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
                    "the database is not migrated (schema version {}, this build needs {expected}): run `ticketflow migrate`",
                    other.map_or("none".to_string(), |v| v.to_string())
                )))
            }
        }
        drop(client);
        Ok(PgLedger { pool, lease: Duration::from_millis(settings.lease_ms.max(1)), prices })
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, LedgerError> {
        self.pool.get().await.map_err(unavailable)
    }
}

const CLAIM: &str = "
INSERT INTO units (unit_id, ticket_id, status, owner, lease_until, attempts, replay_count)
VALUES ($1, $2, 'in_progress', $3, now() + make_interval(secs => $4), 1, $5)
ON CONFLICT (unit_id) DO UPDATE SET
    owner = EXCLUDED.owner,
    lease_until = EXCLUDED.lease_until,
    attempts = units.attempts + 1,
    status = 'in_progress',
    replay_count = EXCLUDED.replay_count,
    published = false
WHERE (units.status = 'in_progress' AND units.lease_until < now())
   OR (units.status = 'dead_letter' AND units.published AND EXCLUDED.replay_count > units.replay_count)
RETURNING attempts, cost_usd";

const FINISH: &str = "
WITH u AS (
    UPDATE units SET
        status = $2, pending_output = $3, published = false, cost_usd = cost_usd + $4,
        tier = $5, provider = $6, model = $7, category = $8, language = $9, latency_ms = $10,
        finished_at = now(), owner = NULL, lease_until = NULL
    WHERE unit_id = $1 AND owner = $11 AND status = 'in_progress'
    RETURNING unit_id, ticket_id
), costs AS (
    INSERT INTO cost_records (call_id, unit_id, ticket_id, stage, provider, model, input_tokens,
        cached_input_tokens, output_tokens, cost_usd, baseline_cost_usd, pricing_version, outcome,
        latency_ms, estimated, at)
    SELECT c.call_id::uuid, u.unit_id, u.ticket_id, c.stage, c.provider, c.model, c.input_tokens,
        c.cached_input_tokens, c.output_tokens, c.cost_usd, c.baseline_cost_usd, c.pricing_version,
        c.outcome, c.latency_ms, c.estimated, c.at::timestamptz
    FROM u, UNNEST($12::text[], $13::text[], $14::text[], $15::text[], $16::int8[], $17::int8[],
        $18::int8[], $19::float8[], $20::float8[], $21::text[], $22::text[], $23::int8[], $24::bool[],
        $25::text[])
        AS c(call_id, stage, provider, model, input_tokens, cached_input_tokens, output_tokens,
             cost_usd, baseline_cost_usd, pricing_version, outcome, latency_ms, estimated, at)
    ON CONFLICT (call_id) DO NOTHING
), decision AS (
    INSERT INTO decisions (unit_id, ticket_id, status, tier, reasons, triage, moderation, worker_id)
    SELECT u.unit_id, u.ticket_id, $2, $5, $26, $27, $28, $11 FROM u
), dead AS (
    INSERT INTO dead_letters (unit_id, ticket_id, kind, message, attempts, replay_count, source, payload,
        payload_encoding, worker_id, failed_at)
    SELECT u.unit_id, u.ticket_id, d.kind, d.message, d.attempts, d.replay_count, d.source, d.payload,
        d.payload_encoding, $11, d.failed_at::timestamptz
    FROM u, jsonb_to_record($29::jsonb) AS d(kind text, message text, attempts int, replay_count int,
        source jsonb, payload text, payload_encoding text, failed_at text)
    WHERE $29::jsonb IS NOT NULL
)
SELECT count(*) FROM u";

const INSERT_REJECTED: &str = "
INSERT INTO dead_letters (unit_id, ticket_id, kind, message, attempts, replay_count, source, payload,
    payload_encoding, worker_id, failed_at)
VALUES (NULL, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10::text::timestamptz)";

fn json<T: serde::Serialize>(v: &T) -> Result<serde_json::Value, LedgerError> {
    serde_json::to_value(v).map_err(|e| LedgerError::Other(format!("serializing for the ledger: {e}")))
}

/// The dead letter's fields as `jsonb_to_record` reads them.
fn dead_letter_record(d: &DeadLetter) -> Result<serde_json::Value, LedgerError> {
    Ok(serde_json::json!({
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

#[async_trait]
impl Ledger for PgLedger {
    async fn claim(
        &self,
        unit_id: &str,
        ticket_id: &str,
        replay_count: u32,
        worker_id: &str,
    ) -> Result<Claim, LedgerError> {
        let client = self.client().await?;
        let claim = client.prepare_cached(CLAIM).await.map_err(unavailable)?;
        let lease_secs = self.lease.as_secs_f64();
        let replay = i32::try_from(replay_count).unwrap_or(i32::MAX);
        if let Some(row) = client
            .query_opt(&claim, &[&unit_id, &ticket_id, &worker_id, &lease_secs, &replay])
            .await
            .map_err(unavailable)?
        {
            let attempts: i32 = row.get(0);
            let prior_cost_usd: f64 = row.get(1);
            return Ok(Claim::Fresh { attempts: attempts.max(1) as u32, prior_cost_usd });
        }
        let row = client
            .query_one("SELECT status, published, pending_output FROM units WHERE unit_id = $1", &[&unit_id])
            .await
            .map_err(unavailable)?;
        let status: String = row.get(0);
        let published: bool = row.get(1);
        let pending: Option<String> = row.get(2);
        Ok(match (status.as_str(), published, pending) {
            ("in_progress", _, _) => Claim::Busy,
            (_, false, Some(output)) => match serde_json::from_str::<Output>(&output) {
                Ok(output) => Claim::Unpublished(Box::new(output)),
                Err(e) => return Err(LedgerError::Other(format!("stored output of {unit_id} is unreadable: {e}"))),
            },
            _ => Claim::Done,
        })
    }

    async fn finish(&self, unit_id: &str, worker_id: &str, output: &Output) -> Result<(), LedgerError> {
        let costs = output.costs();
        let cost_sum: f64 = costs.iter().map(|c| c.cost_usd).sum();
        let baseline: Vec<f64> = costs
            .iter()
            .map(|c| {
                self.prices.baseline_cost(&Usage {
                    input_tokens: c.input_tokens,
                    cached_input_tokens: c.cached_input_tokens,
                    output_tokens: c.output_tokens,
                })
            })
            .collect();
        let text = |f: fn(&crate::ticket::CostRecord) -> String| costs.iter().map(f).collect::<Vec<String>>();
        let int = |f: fn(&crate::ticket::CostRecord) -> u64| costs.iter().map(|c| f(c) as i64).collect::<Vec<i64>>();
        let call_ids = text(|c| c.call_id.clone());
        let stages = text(|c| json(&c.stage).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default());
        let providers = text(|c| c.provider.clone());
        let models = text(|c| c.model.clone());
        let input = int(|c| c.input_tokens);
        let cached = int(|c| c.cached_input_tokens);
        let out_tokens = int(|c| c.output_tokens);
        let cost: Vec<f64> = costs.iter().map(|c| c.cost_usd).collect();
        let versions = text(|c| c.pricing_version.clone());
        let outcomes = text(|c| json(&c.outcome).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default());
        let latency = int(|c| c.latency_ms);
        let estimated: Vec<bool> = costs.iter().map(|c| c.estimated).collect();
        let at = text(|c| c.at.clone());

        let pending = serde_json::to_string(output)
            .map_err(|e| LedgerError::Other(format!("serializing for the ledger: {e}")))?;
        type Columns =
            (String, Option<String>, Option<String>, Option<String>, Option<String>, Option<String>, Option<i64>);
        let (status, tier, provider, model, category, language, latency_ms): Columns;
        let (reasons, triage, moderation, dead): (
            Vec<String>,
            Option<serde_json::Value>,
            Option<serde_json::Value>,
            Option<serde_json::Value>,
        );
        match output {
            Output::Reply { reply, .. } => {
                status = json(&reply.status)?.as_str().unwrap_or("answered").to_owned();
                tier = Some(reply.route.tier.clone());
                provider = reply.route.provider.clone();
                model = reply.route.model.clone();
                category = Some(reply.triage.category.clone());
                language = Some(reply.triage.language.clone());
                latency_ms = Some(reply.latency_ms as i64);
                reasons = reply.route.reasons.clone();
                triage = Some(json(&reply.triage)?);
                moderation = reply.moderation.as_ref().map(json).transpose()?;
                dead = None;
            }
            Output::DeadLetter { dead_letter, .. } => {
                status = "dead_letter".into();
                (tier, provider, model, category, language, latency_ms) = (None, None, None, None, None, None);
                reasons = vec![format!("dead_letter:{}", dead_letter.error.kind.as_str())];
                (triage, moderation) = (None, None);
                dead = Some(dead_letter_record(dead_letter)?);
            }
        }
        let client = self.client().await?;
        let statement = client.prepare_cached(FINISH).await.map_err(unavailable)?;
        let row = client
            .query_one(
                &statement,
                &[
                    &unit_id,
                    &status,
                    &pending,
                    &cost_sum,
                    &tier,
                    &provider,
                    &model,
                    &category,
                    &language,
                    &latency_ms,
                    &worker_id,
                    &call_ids,
                    &stages,
                    &providers,
                    &models,
                    &input,
                    &cached,
                    &out_tokens,
                    &cost,
                    &baseline,
                    &versions,
                    &outcomes,
                    &latency,
                    &estimated,
                    &at,
                    &reasons,
                    &triage,
                    &moderation,
                    &dead,
                ],
            )
            .await
            .map_err(unavailable)?;
        let finished: i64 = row.get(0);
        if finished == 1 {
            Ok(())
        } else {
            Err(LedgerError::LeaseLost(unit_id.to_owned()))
        }
    }

    async fn mark_published(&self, unit_id: &str) -> Result<(), LedgerError> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached("UPDATE units SET published = true, pending_output = NULL WHERE unit_id = $1")
            .await
            .map_err(unavailable)?;
        client.execute(&statement, &[&unit_id]).await.map_err(unavailable)?;
        Ok(())
    }

    async fn release(&self, unit_id: &str, worker_id: &str) -> Result<(), LedgerError> {
        let client = self.client().await?;
        client
            .execute(
                "UPDATE units SET lease_until = now() - interval '1 second'
                 WHERE unit_id = $1 AND owner = $2 AND status = 'in_progress'",
                &[&unit_id, &worker_id],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn record_rejected(&self, d: &DeadLetter) -> Result<(), LedgerError> {
        let client = self.client().await?;
        let source = json(&d.source)?;
        let encoding = json(&d.payload_encoding)?.as_str().unwrap_or("utf8").to_owned();
        let attempts = d.attempts as i32;
        let replay = d.replay_count as i32;
        client
            .execute(
                INSERT_REJECTED,
                &[
                    &d.ticket_id,
                    &d.error.kind.as_str(),
                    &d.error.message,
                    &attempts,
                    &replay,
                    &source,
                    &d.payload,
                    &encoding,
                    &d.worker_id,
                    &d.failed_at,
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
