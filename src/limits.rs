//! `ticketflow limits`: the account-wide limits and budgets as the worker replicas
//! share them, read from the ledger's database. Per rate-limited provider: the
//! configured limits, each live replica's share and demand, a pause in force, and the
//! recorded use over the last minutes against the limit. Per capped tier: today's
//! cap, what the replicas leased, spent and hold reserved, and each replica's lease.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::NaiveDate;
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use serde::Serialize;

use crate::ledger::postgres::classify;
use crate::ledger::LedgerError;
use crate::settings::Settings;

/// One replica's share of a provider's limits.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Share {
    pub member: String,
    /// Of the provider's limits, 0 to 1: what the replica may enforce until its next
    /// heartbeat.
    pub share: f64,
    /// Requests per second it would make (recent rate plus backlog).
    pub demand: f64,
    /// Seconds since its last heartbeat.
    pub seen_s: f64,
}

/// One rate-limited provider.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProviderView {
    pub provider: String,
    pub requests_per_minute: u32,
    pub tokens_per_minute: u64,
    pub replicas: Vec<Share>,
    /// Seconds left of a pause after a 429, if one is in force.
    pub paused_s: Option<f64>,
    /// Calls recorded in the window (every call that reached the provider), per minute.
    pub requests_per_minute_used: f64,
    /// Tokens recorded in the window, per minute.
    pub tokens_per_minute_used: f64,
}

/// One replica's lease of a tier's cap.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Lease {
    pub member: String,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub leased_usd: f64,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub spent_usd: f64,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub reserved_usd: f64,
    pub seen_s: f64,
    /// Not heard from within the live window: killed or cut off; its unused lease is
    /// stranded until the day ends.
    pub gone: bool,
}

/// One capped tier today.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BudgetView {
    pub tier: String,
    pub day: NaiveDate,
    /// The cap of this configuration; none when only the ledger knows the tier.
    pub cap_usd: Option<f64>,
    /// The cap the replicas leased against today, when it differs from `cap_usd`.
    pub ledger_cap_usd: Option<f64>,
    /// Where a spent tier's tickets go (this configuration's).
    pub when_spent: Option<String>,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub leased_usd: f64,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub spent_usd: f64,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub reserved_usd: f64,
    pub replicas: Vec<Lease>,
}

/// Which live worker holds which RabbitMQ input shard, as the workers compute it
/// from the roster (`shard_members`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ShardsView {
    /// The roster's scope: the broker's vhost and the input.
    pub scope: String,
    pub shards: u16,
    /// Workers heard within this long divide the shards.
    pub live_for_s: f64,
    /// Each live worker and the shards it is given.
    pub members: BTreeMap<String, Vec<u16>>,
}

/// Everything `ticketflow limits` shows.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Limits {
    /// Whether the replicas divide the limits (`limits.account_heartbeat_ms` > 0).
    pub shared: bool,
    /// Replicas not heard from for this long are no longer counted.
    pub live_for_s: f64,
    /// The time zone of the budgets' day.
    pub budget_time_zone: String,
    /// The window of the use figures.
    pub minutes: u32,
    pub providers: Vec<ProviderView>,
    pub budgets: Vec<BudgetView>,
    /// RabbitMQ input shards (`broker.rabbitmq.shards` > 0); none otherwise.
    pub input_shards: Option<ShardsView>,
}

const MEMBERS: &str = "SELECT provider, member, share, demand, extract(epoch FROM now() - seen_at)::float8 \
     FROM limit_members WHERE seen_at > now() - make_interval(secs => $1) ORDER BY provider, member";
const PAUSES: &str = "SELECT provider, extract(epoch FROM until - now())::float8 FROM limit_pauses WHERE until > now()";
const USE: &str = "SELECT provider, count(*), coalesce(sum(input_tokens + output_tokens), 0)::bigint \
     FROM cost_records WHERE at > now() - make_interval(mins => $1) GROUP BY provider";
const LEASES: &str = "SELECT tier, member, granted_usd, spent_usd, reserved_usd, \
     extract(epoch FROM now() - seen_at)::float8, cap_usd FROM budget_leases WHERE day = $1 ORDER BY tier, member";

/// Reads the shared state from the ledger at `pool`, for the providers and tiers of
/// `settings`, with use over the last `minutes`.
pub async fn gather(pool: &deadpool_postgres::Pool, settings: &Settings, minutes: u32) -> Result<Limits, LedgerError> {
    let client = pool.get().await.map_err(classify)?;
    let shared = settings.limits.account_heartbeat_ms > 0;
    // Sharing off here: the window of the default heartbeat.
    let every = if shared { settings.limits.account_heartbeat_ms } else { 1000 };
    let heartbeat = std::time::Duration::from_millis(every);
    let live_for = crate::providers::account::Timing::every(heartbeat).live_for.as_secs_f64();
    let mut shares: BTreeMap<String, Vec<Share>> = BTreeMap::new();
    for r in client.query(MEMBERS, &[&live_for]).await.map_err(classify)? {
        let share = Share { member: r.get(1), share: r.get(2), demand: r.get(3), seen_s: r.get(4) };
        shares.entry(r.get(0)).or_default().push(share);
    }
    let pauses: BTreeMap<String, f64> =
        client.query(PAUSES, &[]).await.map_err(classify)?.iter().map(|r| (r.get(0), r.get(1))).collect();
    let window = i32::try_from(minutes.max(1)).unwrap_or(i32::MAX);
    let used: BTreeMap<String, (i64, i64)> = client
        .query(USE, &[&window])
        .await
        .map_err(classify)?
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2))))
        .collect();
    let per_minute = |n: i64| n as f64 / f64::from(window as u32);
    let providers = settings
        .providers
        .iter()
        .filter(|(_, p)| p.requests_per_minute > 0 || p.tokens_per_minute > 0)
        .map(|(name, p)| {
            let (requests, tokens) = used.get(name).copied().unwrap_or((0, 0));
            ProviderView {
                provider: name.clone(),
                requests_per_minute: p.requests_per_minute,
                tokens_per_minute: p.tokens_per_minute,
                replicas: shares.remove(name).unwrap_or_default(),
                paused_s: pauses.get(name).copied(),
                requests_per_minute_used: per_minute(requests),
                tokens_per_minute_used: per_minute(tokens),
            }
        })
        .collect();
    let day = chrono::Utc::now().with_timezone(&settings.budget_zone()).date_naive();
    let mut leases: BTreeMap<String, (Vec<Lease>, f64)> = BTreeMap::new();
    for r in client.query(LEASES, &[&day]).await.map_err(classify)? {
        let seen_s: f64 = r.get(5);
        let lease = Lease {
            member: r.get(1),
            leased_usd: r.get(2),
            spent_usd: r.get(3),
            reserved_usd: r.get(4),
            seen_s,
            // Replicas report their leases every heartbeat, and at least every second.
            gone: seen_s > live_for.max(3.0),
        };
        let entry = leases.entry(r.get(0)).or_insert_with(|| (Vec::new(), 0.0));
        entry.0.push(lease);
        entry.1 = entry.1.max(r.get::<_, f64>(6));
    }
    // The tiers configured here, and any other the replicas leased on today.
    let tiers: std::collections::BTreeSet<String> = settings.budgets.keys().chain(leases.keys()).cloned().collect();
    let budgets = tiers
        .into_iter()
        .map(|tier| {
            let configured = settings.budgets.get(&tier);
            let (replicas, ledger_cap) = leases.remove(&tier).unwrap_or_default();
            // From zero: an empty sum of floats is -0.
            let sum = |f: fn(&Lease) -> f64| replicas.iter().map(f).fold(0.0, |a, b| a + b);
            let cap_usd = configured.map(|c| c.daily_usd);
            BudgetView {
                day,
                cap_usd,
                ledger_cap_usd: (!replicas.is_empty() && cap_usd != Some(ledger_cap)).then_some(ledger_cap),
                when_spent: configured.map(|c| c.when_spent.clone()),
                leased_usd: sum(|l| l.leased_usd),
                spent_usd: sum(|l| l.spent_usd),
                reserved_usd: sum(|l| l.reserved_usd),
                replicas,
                tier,
            }
        })
        .collect();
    let input_shards = shards_view(pool, settings).await?;
    Ok(Limits {
        input_shards,
        shared,
        live_for_s: live_for,
        budget_time_zone: settings.limits.budget_time_zone.clone(),
        minutes: window as u32,
        providers,
        budgets,
    })
}

/// The input shards' division among the live workers, when the broker is RabbitMQ
/// with shards.
async fn shards_view(pool: &deadpool_postgres::Pool, settings: &Settings) -> Result<Option<ShardsView>, LedgerError> {
    use crate::broker::rabbitmq::shards;
    use shards::Roster as _;
    let rabbit = &settings.broker.rabbitmq;
    if settings.broker.kind != crate::settings::BrokerKind::Rabbitmq || rabbit.shards == 0 {
        return Ok(None);
    }
    let scope = shards::scope(&rabbit.url, &settings.broker.topics.input);
    let live_for = std::time::Duration::from_millis(rabbit.member_heartbeat_ms.max(1)) * shards::LIVE_HEARTBEATS;
    let mut live = crate::ledger::meeting::PgRoster::new(pool.clone()).members(&scope, live_for).await?;
    live.sort();
    let members =
        live.iter().map(|m| (m.clone(), shards::assign(rabbit.shards, &live, m).into_iter().collect())).collect();
    Ok(Some(ShardsView { scope, shards: rabbit.shards, live_for_s: live_for.as_secs_f64(), members }))
}

/// The tables for a terminal.
pub fn render_table(l: &Limits) -> String {
    let mut out = String::new();
    let mut providers = Table::new();
    providers.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "provider",
        "limit rpm",
        &format!("used rpm ({} min)", l.minutes),
        "limit tpm",
        &format!("used tpm ({} min)", l.minutes),
        "replicas",
        "shares (demand req/s)",
        "paused",
    ]);
    let right = |s: String| Cell::new(s).set_alignment(CellAlignment::Right);
    for p in &l.providers {
        let shares: Vec<String> =
            p.replicas.iter().map(|s| format!("{} {:.1}% ({:.2})", s.member, s.share * 100.0, s.demand)).collect();
        providers.add_row(vec![
            Cell::new(&p.provider),
            right(p.requests_per_minute.to_string()),
            right(format!(
                "{:.1} ({})",
                p.requests_per_minute_used,
                pct(p.requests_per_minute_used, f64::from(p.requests_per_minute))
            )),
            right(p.tokens_per_minute.to_string()),
            right(format!(
                "{:.0} ({})",
                p.tokens_per_minute_used,
                pct(p.tokens_per_minute_used, p.tokens_per_minute as f64)
            )),
            right(p.replicas.len().to_string()),
            Cell::new(if shares.is_empty() { "-".to_string() } else { shares.join("\n") }),
            Cell::new(p.paused_s.map_or("-".to_string(), |s| format!("{s:.1} s"))),
        ]);
    }
    if l.shared {
        let _ = writeln!(out, "Provider limits (replicas heard within {:.0} s):\n{providers}", l.live_for_s);
    } else {
        let _ = writeln!(
            out,
            "Provider limits (limits.account_heartbeat_ms = 0 here: workers configured so enforce the whole limits each):\n{providers}"
        );
    }
    if l.budgets.is_empty() {
        out.push_str("\nNo budget caps configured ([budgets.<tier>]) and none leased today.\n");
        render_shards(l, &mut out);
        return out;
    }
    let mut budgets = Table::new();
    budgets.load_preset(UTF8_FULL_CONDENSED).set_header(vec![
        "tier",
        "day",
        "cap",
        "spent",
        "reserved",
        "leased",
        "when spent",
        "replicas (leased / spent)",
    ]);
    let money = |v: f64| format!("${v:.6}");
    for b in &l.budgets {
        let replicas: Vec<String> = b
            .replicas
            .iter()
            .map(|r| {
                let gone = if r.gone { format!(" (gone {:.0} s ago)", r.seen_s) } else { String::new() };
                format!("{} {} / {}{gone}", r.member, money(r.leased_usd), money(r.spent_usd))
            })
            .collect();
        let cap = match (b.cap_usd, b.ledger_cap_usd) {
            (Some(cap), None) => money(cap),
            (Some(cap), Some(leased)) => format!("{} (replicas: {})", money(cap), money(leased)),
            (None, Some(leased)) => format!("{} (replicas)", money(leased)),
            (None, None) => "-".to_string(),
        };
        let counted = b.ledger_cap_usd.or(b.cap_usd).unwrap_or(0.0);
        budgets.add_row(vec![
            Cell::new(&b.tier),
            Cell::new(b.day.to_string()),
            right(cap),
            right(format!("{} ({})", money(b.spent_usd), pct(b.spent_usd, counted))),
            right(money(b.reserved_usd)),
            right(money(b.leased_usd)),
            Cell::new(b.when_spent.as_deref().unwrap_or("-")),
            Cell::new(if replicas.is_empty() { "-".to_string() } else { replicas.join("\n") }),
        ]);
    }
    let _ = writeln!(out, "\nDaily budgets (days in {}):\n{budgets}", l.budget_time_zone);
    render_shards(l, &mut out);
    out
}

/// Which worker holds which input shard, when there are shards.
fn render_shards(l: &Limits, out: &mut String) {
    if let Some(view) = &l.input_shards {
        let mut table = Table::new();
        table.load_preset(UTF8_FULL_CONDENSED).set_header(["worker", "input shards"]);
        for (member, given) in &view.members {
            let list: Vec<String> = given.iter().map(u16::to_string).collect();
            table.add_row([member.clone(), list.join(",")]);
        }
        let heard = format!("workers heard within {:.0} s", view.live_for_s);
        if view.members.is_empty() {
            let _ =
                writeln!(out, "\nInput shards of {} ({} shards): no live worker ({heard})", view.scope, view.shards);
        } else {
            let _ = writeln!(out, "\nInput shards of {} ({} shards, {heard}):\n{table}", view.scope, view.shards);
        }
    }
}

/// `part` as a percentage of `whole`; a whole of nothing is over as soon as anything
/// is used.
fn pct(part: f64, whole: f64) -> String {
    if whole > 0.0 {
        format!("{:.0}%", part / whole * 100.0)
    } else if part > 0.0 {
        "over".to_string()
    } else {
        "0%".to_string()
    }
}
