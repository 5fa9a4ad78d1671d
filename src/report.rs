//! `ticketflow report`: where the money goes, from the PostgreSQL ledger. Spend by
//! provider, model, tier, category and day; the same tokens priced at the baseline
//! premium model (savings); escalation, moderation-bypass, human-handoff and
//! dead-letter counts; latency percentiles. Filtered by `--since` / `--until` on the
//! time of each call (spend) and of each decision (counts).

use chrono::{DateTime, NaiveDate, Utc};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use serde::Serialize;

use crate::ledger::LedgerError;

/// Spend of one group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spend {
    pub key: String,
    pub calls: i64,
    pub cost_usd: f64,
    pub baseline_cost_usd: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub total: Spend,
    pub savings_usd: f64,
    pub savings_pct: f64,
    pub by_provider: Vec<Spend>,
    pub by_model: Vec<Spend>,
    pub by_tier: Vec<Spend>,
    pub by_category: Vec<Spend>,
    pub by_day: Vec<Spend>,
    pub units: i64,
    pub answered: i64,
    pub needs_human: i64,
    /// Answered by a tier other than `cheap`.
    pub escalated: i64,
    pub moderation_bypassed: i64,
    pub dead_letters: Vec<(String, i64)>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
}

/// Parses `--since`/`--until`: an RFC 3339 time or a date (midnight UTC).
pub fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    NaiveDate::parse_from_str(s, "%Y-%m-%d")
        .map(|d| d.and_hms_opt(0, 0, 0).unwrap_or_default().and_utc())
        .map_err(|_| format!("`{s}` is neither an RFC 3339 time nor a YYYY-MM-DD date"))
}

fn unavailable(e: impl std::error::Error) -> LedgerError {
    LedgerError::Unavailable(crate::error_chain(&e))
}

/// Spend grouped by a SQL expression over `cost_records c` joined with `units u`.
const SPEND_BY: &str = "
SELECT coalesce({key}, '(none)') AS key, count(*), coalesce(sum(c.cost_usd), 0), coalesce(sum(c.baseline_cost_usd), 0)
FROM cost_records c LEFT JOIN units u ON u.unit_id = c.unit_id
WHERE ($1::timestamptz IS NULL OR c.at >= $1) AND ($2::timestamptz IS NULL OR c.at < $2)
GROUP BY 1 ORDER BY 3 DESC, 1";

/// Reads the report from the ledger.
pub async fn gather(
    pool: &deadpool_postgres::Pool,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<Report, LedgerError> {
    let client = pool.get().await.map_err(unavailable)?;
    let spend = |key: &str| SPEND_BY.replace("{key}", key);
    let mut groups = Vec::new();
    for key in [
        "c.provider",
        "c.provider || '/' || c.model",
        "u.tier",
        "u.category",
        "to_char(c.at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
        "'all'",
    ] {
        let rows = client.query(&spend(key), &[&since, &until]).await.map_err(unavailable)?;
        groups.push(
            rows.iter()
                .map(|r| Spend { key: r.get(0), calls: r.get(1), cost_usd: r.get(2), baseline_cost_usd: r.get(3) })
                .collect::<Vec<_>>(),
        );
    }
    let total = groups.pop().and_then(|mut g| g.pop()).unwrap_or(Spend {
        key: "all".into(),
        calls: 0,
        cost_usd: 0.0,
        baseline_cost_usd: 0.0,
    });
    let by_day = {
        let mut days = groups.pop().unwrap_or_default();
        days.sort_by(|a, b| a.key.cmp(&b.key));
        days
    };
    let by_category = groups.pop().unwrap_or_default();
    let by_tier = groups.pop().unwrap_or_default();
    let by_model = groups.pop().unwrap_or_default();
    let by_provider = groups.pop().unwrap_or_default();

    let counts = client
        .query_one(
            "SELECT count(DISTINCT unit_id),
                count(DISTINCT unit_id) FILTER (WHERE status = 'answered'),
                count(DISTINCT unit_id) FILTER (WHERE status = 'needs_human'),
                count(DISTINCT unit_id) FILTER (WHERE status = 'answered' AND tier <> 'cheap'),
                count(DISTINCT unit_id) FILTER (WHERE (moderation->>'bypassed')::boolean)
             FROM decisions
             WHERE ($1::timestamptz IS NULL OR decided_at >= $1) AND ($2::timestamptz IS NULL OR decided_at < $2)",
            &[&since, &until],
        )
        .await
        .map_err(unavailable)?;
    let dead_letters = client
        .query(
            "SELECT kind, count(*) FROM dead_letters
             WHERE ($1::timestamptz IS NULL OR failed_at >= $1) AND ($2::timestamptz IS NULL OR failed_at < $2)
             GROUP BY 1 ORDER BY 1",
            &[&since, &until],
        )
        .await
        .map_err(unavailable)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let latency = client
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
             FROM units WHERE latency_ms IS NOT NULL
               AND ($1::timestamptz IS NULL OR finished_at >= $1) AND ($2::timestamptz IS NULL OR finished_at < $2)",
            &[&since, &until],
        )
        .await
        .map_err(unavailable)?;
    let savings_usd = total.baseline_cost_usd - total.cost_usd;
    let savings_pct = if total.baseline_cost_usd > 0.0 { savings_usd / total.baseline_cost_usd * 100.0 } else { 0.0 };
    Ok(Report {
        since,
        until,
        total,
        savings_usd,
        savings_pct,
        by_provider,
        by_model,
        by_tier,
        by_category,
        by_day,
        units: counts.get(0),
        answered: counts.get(1),
        needs_human: counts.get(2),
        escalated: counts.get(3),
        moderation_bypassed: counts.get(4),
        dead_letters,
        latency_p50_ms: latency.get(0),
        latency_p95_ms: latency.get(1),
    })
}

/// The report as tables.
pub fn render_table(r: &Report) -> String {
    let mut out = String::new();
    let money = |v: f64| format!("${v:.6}");
    let mut summary = Table::new();
    summary.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["figure", "value"]);
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0} ms"));
    for (k, v) in [
        ("provider calls", r.total.calls.to_string()),
        ("spend", money(r.total.cost_usd)),
        ("all-premium baseline", money(r.total.baseline_cost_usd)),
        ("savings", format!("{} ({:.1}%)", money(r.savings_usd), r.savings_pct)),
        ("units of work decided", r.units.to_string()),
        ("answered", r.answered.to_string()),
        ("escalated (answered above the cheap tier)", r.escalated.to_string()),
        ("handed to a human", r.needs_human.to_string()),
        ("answered through moderation bypass", r.moderation_bypassed.to_string()),
        ("dead letters", r.dead_letters.iter().map(|(_, n)| n).sum::<i64>().to_string()),
        ("latency p50", ms(r.latency_p50_ms)),
        ("latency p95", ms(r.latency_p95_ms)),
    ] {
        summary.add_row(vec![Cell::new(k), Cell::new(v).set_alignment(CellAlignment::Right)]);
    }
    out.push_str(&summary.to_string());
    out.push('\n');
    for (title, rows) in [
        ("provider", &r.by_provider),
        ("model", &r.by_model),
        ("tier", &r.by_tier),
        ("category", &r.by_category),
        ("day (UTC)", &r.by_day),
    ] {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header(vec![title, "calls", "spend", "baseline"]);
        for s in rows {
            t.add_row(vec![
                Cell::new(&s.key),
                Cell::new(s.calls).set_alignment(CellAlignment::Right),
                Cell::new(money(s.cost_usd)).set_alignment(CellAlignment::Right),
                Cell::new(money(s.baseline_cost_usd)).set_alignment(CellAlignment::Right),
            ]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    if !r.dead_letters.is_empty() {
        let mut t = Table::new();
        t.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["dead letter kind", "count"]);
        for (kind, n) in &r.dead_letters {
            t.add_row(vec![Cell::new(kind), Cell::new(n).set_alignment(CellAlignment::Right)]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    out
}
