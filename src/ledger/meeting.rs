//! Where worker replicas meet in the ledger's database:
//! - [`PgMeeting`] divides their accounts' rate limits ([`crate::providers::account`])
//!   in the `limit_members` and `limit_pauses` tables. The database's clock decides
//!   who is live, so the members' clocks need not agree.
//! - [`PgRoster`] keeps the members among which the RabbitMQ input shards are
//!   divided, in `shard_members`.
//! - [`PgBank`] leases parts of the tiers' daily budget caps
//!   ([`crate::routing::budget`]) in `budget_leases`: one transaction per lease,
//!   serialized per tier and day by an advisory lock.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::Pool;

use super::postgres::classify;
use super::LedgerError;
use crate::broker::rabbitmq::shards::Roster;
use crate::providers::account::{Meeting, Report, Seen, Snapshot};
use crate::routing::budget::{grant, Bank, Use};

/// Rows of members gone this long (or twice the live window, if longer) are deleted:
/// they stopped being counted long before.
const FORGET_AFTER: Duration = Duration::from_secs(600);

const UPSERT: &str = "INSERT INTO limit_members (member, provider, demand, share, seen_at) \
     SELECT $1, p, d, s, now() FROM unnest($2::text[], $3::float8[], $4::float8[]) AS t(p, d, s) \
     ON CONFLICT (member, provider) DO UPDATE \
     SET demand = EXCLUDED.demand, share = EXCLUDED.share, seen_at = now()";
const PAUSE: &str = "INSERT INTO limit_pauses (provider, until) \
     SELECT p, now() + make_interval(secs => s) FROM unnest($1::text[], $2::float8[]) AS t(p, s) \
     ON CONFLICT (provider) DO UPDATE SET until = greatest(limit_pauses.until, EXCLUDED.until)";
const LIVE: &str = "SELECT provider, member, demand, share FROM limit_members \
     WHERE seen_at > now() - make_interval(secs => $1) ORDER BY provider, member";
const PAUSES: &str = "SELECT provider, extract(epoch FROM until - now())::float8 FROM limit_pauses WHERE until > now()";
const FORGET: &str = "DELETE FROM limit_members WHERE seen_at < now() - make_interval(secs => $1)";
const LEAVE: &str = "DELETE FROM limit_members WHERE member = $1";

/// The division's tables in the ledger's database.
pub struct PgMeeting {
    pool: Pool,
}

impl PgMeeting {
    pub fn new(pool: Pool) -> Self {
        PgMeeting { pool }
    }
}

#[async_trait]
impl Meeting for PgMeeting {
    async fn heartbeat(
        &self,
        member: &str,
        reports: &[Report],
        pauses: &[(String, Duration)],
        live_for: Duration,
    ) -> Result<Snapshot, LedgerError> {
        let client = self.pool.get().await.map_err(classify)?;
        let providers: Vec<&str> = reports.iter().map(|r| r.provider.as_str()).collect();
        let demands: Vec<f64> = reports.iter().map(|r| r.demand).collect();
        let claims: Vec<f64> = reports.iter().map(|r| r.claim).collect();
        let upsert = client.prepare_cached(UPSERT).await.map_err(classify)?;
        client.execute(&upsert, &[&member, &providers, &demands, &claims]).await.map_err(classify)?;
        if !pauses.is_empty() {
            let names: Vec<&str> = pauses.iter().map(|(p, _)| p.as_str()).collect();
            let secs: Vec<f64> = pauses.iter().map(|(_, d)| d.as_secs_f64()).collect();
            let pause = client.prepare_cached(PAUSE).await.map_err(classify)?;
            client.execute(&pause, &[&names, &secs]).await.map_err(classify)?;
        }
        let live = client.prepare_cached(LIVE).await.map_err(classify)?;
        let mut snapshot = Snapshot::default();
        for row in client.query(&live, &[&live_for.as_secs_f64()]).await.map_err(classify)? {
            let seen = Seen { member: row.get(1), demand: row.get(2), claim: row.get(3) };
            snapshot.members.entry(row.get(0)).or_default().push(seen);
        }
        let paused = client.prepare_cached(PAUSES).await.map_err(classify)?;
        for row in client.query(&paused, &[]).await.map_err(classify)? {
            let secs: f64 = row.get(1);
            snapshot.pauses.insert(row.get(0), Duration::from_secs_f64(secs.max(0.0)));
        }
        let forget = client.prepare_cached(FORGET).await.map_err(classify)?;
        let forget_after = FORGET_AFTER.max(live_for * 2).as_secs_f64();
        client.execute(&forget, &[&forget_after]).await.map_err(classify)?;
        Ok(snapshot)
    }

    async fn leave(&self, member: &str) -> Result<(), LedgerError> {
        let client = self.pool.get().await.map_err(classify)?;
        client.execute(LEAVE, &[&member]).await.map_err(classify)?;
        Ok(())
    }
}

/// Serializes the leases of one tier and day (the leases' sum is read, then grown).
const LOCK_DAY: &str =
    "SELECT pg_advisory_xact_lock(hashtextextended('budget:' || $1::text || ':' || ($2::date)::text, 0))";
const LEASED: &str = "SELECT coalesce(sum(granted_usd), 0)::float8 FROM budget_leases WHERE tier = $1 AND day = $2";
const GRANT: &str = "INSERT INTO budget_leases (tier, day, member, cap_usd, granted_usd) VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (tier, day, member) DO UPDATE \
     SET granted_usd = budget_leases.granted_usd + EXCLUDED.granted_usd, cap_usd = EXCLUDED.cap_usd, seen_at = now()";
/// Leases of days more than a month past are deleted (`limits` shows today's).
const FORGET_DAYS: &str = "DELETE FROM budget_leases WHERE day < $1::date - 31";
const REPORT: &str = "UPDATE budget_leases SET spent_usd = $4, reserved_usd = $5, granted_usd = $6, seen_at = now() \
     WHERE tier = $1 AND day = $2 AND member = $3";

/// The tiers' daily caps in the ledger's database, shared by every replica.
pub struct PgBank {
    pool: Pool,
}

impl PgBank {
    pub fn new(pool: Pool) -> Self {
        PgBank { pool }
    }
}

#[async_trait]
impl Bank for PgBank {
    async fn lease(
        &self,
        member: &str,
        tier: &str,
        day: chrono::NaiveDate,
        cap: f64,
        need: f64,
        want: f64,
    ) -> Result<f64, LedgerError> {
        let mut client = self.pool.get().await.map_err(classify)?;
        let tx = client.transaction().await.map_err(classify)?;
        tx.execute(LOCK_DAY, &[&tier, &day]).await.map_err(classify)?;
        let leased: f64 = tx.query_one(LEASED, &[&tier, &day]).await.map_err(classify)?.get(0);
        let granted = grant(cap, leased, need, want);
        if granted > 0.0 {
            tx.execute(GRANT, &[&tier, &day, &member, &cap, &granted]).await.map_err(classify)?;
        }
        // An index range that is empty but for the first lease of a day.
        tx.execute(FORGET_DAYS, &[&day]).await.map_err(classify)?;
        tx.commit().await.map_err(classify)?;
        Ok(granted)
    }

    async fn report(&self, member: &str, tier: &str, day: chrono::NaiveDate, use_: Use) -> Result<(), LedgerError> {
        let client = self.pool.get().await.map_err(classify)?;
        let report = client.prepare_cached(REPORT).await.map_err(classify)?;
        client
            .execute(&report, &[&tier, &day, &member, &use_.spent, &use_.reserved, &use_.keep])
            .await
            .map_err(classify)?;
        Ok(())
    }
}

const ROSTER_BEAT: &str = "INSERT INTO shard_members (scope, member, seen_at) VALUES ($1, $2, now()) \
     ON CONFLICT (scope, member) DO UPDATE SET seen_at = now()";
const ROSTER_LIVE: &str = "SELECT member FROM shard_members \
     WHERE scope = $1 AND seen_at > now() - make_interval(secs => $2) ORDER BY member";
const ROSTER_FORGET: &str =
    "DELETE FROM shard_members WHERE scope = $1 AND seen_at < now() - make_interval(secs => $2)";
const ROSTER_LEAVE: &str = "DELETE FROM shard_members WHERE scope = $1 AND member = $2";

/// The roster of the RabbitMQ input shards in `shard_members`
/// ([`crate::broker::rabbitmq::shards`]).
pub struct PgRoster {
    pool: Pool,
}

impl PgRoster {
    pub fn new(pool: Pool) -> Self {
        PgRoster { pool }
    }
}

#[async_trait]
impl Roster for PgRoster {
    async fn beat(&self, scope: &str, member: &str, live_for: Duration) -> Result<Vec<String>, LedgerError> {
        let client = self.pool.get().await.map_err(classify)?;
        let beat = client.prepare_cached(ROSTER_BEAT).await.map_err(classify)?;
        client.execute(&beat, &[&scope, &member]).await.map_err(classify)?;
        let live = client.prepare_cached(ROSTER_LIVE).await.map_err(classify)?;
        let members = client
            .query(&live, &[&scope, &live_for.as_secs_f64()])
            .await
            .map_err(classify)?
            .into_iter()
            .map(|row| row.get(0))
            .collect();
        let forget = client.prepare_cached(ROSTER_FORGET).await.map_err(classify)?;
        client.execute(&forget, &[&scope, &FORGET_AFTER.max(live_for * 2).as_secs_f64()]).await.map_err(classify)?;
        Ok(members)
    }

    async fn members(&self, scope: &str, live_for: Duration) -> Result<Vec<String>, LedgerError> {
        let client = self.pool.get().await.map_err(classify)?;
        let rows = client.query(ROSTER_LIVE, &[&scope, &live_for.as_secs_f64()]).await.map_err(classify)?;
        Ok(rows.into_iter().map(|row| row.get(0)).collect())
    }

    async fn leave(&self, scope: &str, member: &str) -> Result<(), LedgerError> {
        let client = self.pool.get().await.map_err(classify)?;
        client.execute(ROSTER_LEAVE, &[&scope, &member]).await.map_err(classify)?;
        Ok(())
    }
}
