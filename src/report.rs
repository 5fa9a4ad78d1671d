//! `ticketflow report`: where the money goes, from the PostgreSQL ledger. Spend by
//! provider, model, tier, category and day; the all-premium baseline (one premium
//! reply call per answered unit, priced from the answering call's tokens) and the
//! savings; the share of answered units per tier and the cost per answered ticket;
//! escalation, moderation-bypass, human-handoff and dead-letter counts; latency
//! percentiles. Filtered by `--since` / `--until` on the
//! time of each call (spend) and of each decision (counts).

use chrono::{DateTime, NaiveDate, Utc};
use comfy_table::{presets::UTF8_FULL_CONDENSED, Cell, CellAlignment, Table};
use serde::Serialize;

use crate::ledger::postgres::classify;
use crate::ledger::LedgerError;

/// Spend of one group.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Spend {
    pub key: String,
    pub calls: i64,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub cost_usd: f64,
    #[serde(serialize_with = "crate::ticket::usd")]
    pub baseline_cost_usd: f64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub total: Spend,
    #[serde(serialize_with = "crate::ticket::usd")]
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
    /// Spend per UTC day and tier, for the HTML chart.
    pub by_day_and_tier: Vec<(String, String, f64)>,
    /// Finished units per route (tier, `human`, or `dead_letter`).
    pub route_mix: Vec<(String, i64)>,
}

impl Report {
    /// Units answered per tier (`human` and dead letters are not tiers), with each
    /// one's share of the answered units, largest first.
    pub fn answered_by_tier(&self) -> Vec<(String, i64, f64)> {
        let tiers: Vec<&(String, i64)> = self
            .route_mix
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "human" | "needs_human" | "dead_letter"))
            .collect();
        let answered: i64 = tiers.iter().map(|(_, n)| n).sum();
        tiers.into_iter().map(|(k, n)| (k.clone(), *n, *n as f64 / answered.max(1) as f64 * 100.0)).collect()
    }

    /// What an answered ticket cost on average, every call included.
    pub fn cost_per_answered(&self) -> f64 {
        self.total.cost_usd / self.answered.max(1) as f64
    }
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

/// Runs a query filtered by `$1` (since) and `$2` (until) and maps its rows.
async fn rows<T>(
    client: &deadpool_postgres::Object,
    sql: &str,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    map: impl Fn(&tokio_postgres::Row) -> T,
) -> Result<Vec<T>, LedgerError> {
    Ok(client.query(sql, &[&since, &until]).await.map_err(classify)?.iter().map(map).collect())
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
    let client = pool.get().await.map_err(classify)?;
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
        groups.push(
            rows(&client, &spend(key), since, until, |r| Spend {
                key: r.get(0),
                calls: r.get(1),
                cost_usd: r.get(2),
                baseline_cost_usd: r.get(3),
            })
            .await?,
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
        .map_err(classify)?;
    let dead_letters = rows(
        &client,
        "SELECT kind, count(*) FROM dead_letters
             WHERE ($1::timestamptz IS NULL OR failed_at >= $1) AND ($2::timestamptz IS NULL OR failed_at < $2)
             GROUP BY 1 ORDER BY 1",
        since,
        until,
        |r| (r.get(0), r.get(1)),
    )
    .await?;
    let latency = client
        .query_one(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY latency_ms),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY latency_ms)
             FROM units WHERE latency_ms IS NOT NULL
               AND ($1::timestamptz IS NULL OR finished_at >= $1) AND ($2::timestamptz IS NULL OR finished_at < $2)",
            &[&since, &until],
        )
        .await
        .map_err(classify)?;
    let by_day_and_tier = rows(
        &client,
        "SELECT to_char(c.at AT TIME ZONE 'UTC', 'YYYY-MM-DD'), coalesce(u.tier, '(none)'), sum(c.cost_usd)
             FROM cost_records c LEFT JOIN units u ON u.unit_id = c.unit_id
             WHERE ($1::timestamptz IS NULL OR c.at >= $1) AND ($2::timestamptz IS NULL OR c.at < $2)
             GROUP BY 1, 2 ORDER BY 1, 2",
        since,
        until,
        |r| (r.get(0), r.get(1), r.get(2)),
    )
    .await?;
    let route_mix = rows(
        &client,
        "SELECT CASE WHEN status = 'dead_letter' THEN 'dead_letter' ELSE coalesce(tier, status) END, count(*)
             FROM units WHERE status <> 'in_progress'
               AND ($1::timestamptz IS NULL OR finished_at >= $1) AND ($2::timestamptz IS NULL OR finished_at < $2)
             GROUP BY 1 ORDER BY 2 DESC, 1",
        since,
        until,
        |r| (r.get(0), r.get(1)),
    )
    .await?;
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
        by_day_and_tier,
        route_mix,
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
        ("cost per answered ticket", money(r.cost_per_answered())),
        (crate::summary::BASELINE_LABEL, money(r.total.baseline_cost_usd)),
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
    out.push_str(crate::summary::BASELINE_NOTE);
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
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED).set_header(vec!["tier", "answered", "share"]);
    for (tier, n, share) in r.answered_by_tier() {
        t.add_row(vec![
            Cell::new(tier),
            Cell::new(n).set_alignment(CellAlignment::Right),
            Cell::new(format!("{share:.1}%")).set_alignment(CellAlignment::Right),
        ]);
    }
    out.push_str(&t.to_string());
    out.push('\n');
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

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

const PALETTE: &[&str] = &["#2f6fdf", "#e0803a", "#3aa872", "#c2457a", "#8a63d2", "#c9a227", "#4bb3c4", "#7a7a7a"];

/// The colour of a tier (or route, or figure), the same in every chart and every
/// report: the shipped tiers have fixed colours, any other name a colour derived
/// from the name itself, never from its position in a chart.
pub fn colour(name: &str) -> &'static str {
    match name {
        "cheap" | "spent" => "#3aa872",
        "premium" | "all-premium baseline" => "#2f6fdf",
        "empathy" => "#c2457a",
        "code" => "#8a63d2",
        "multilingual" => "#4bb3c4",
        "human" | "needs_human" => "#7a7a7a",
        "dead_letter" => "#d64545",
        other => {
            let hash = other.bytes().fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
            PALETTE[hash as usize % PALETTE.len()]
        }
    }
}

/// Horizontal bars: one row per (label, value), scaled to the largest value, each
/// in its label's [`colour`].
fn bars(rows: &[(String, f64)], unit: &dyn Fn(f64) -> String) -> String {
    let max = rows.iter().map(|r| r.1).fold(0.0f64, f64::max).max(f64::MIN_POSITIVE);
    let height = rows.len() * 30 + 10;
    let mut svg = format!("<svg viewBox=\"0 0 640 {height}\" role=\"img\">");
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = i * 30 + 5;
        let w = (v / max * 380.0).max(1.0);
        let color = colour(label);
        svg.push_str(&format!(
            "<text x=\"0\" y=\"{}\" class=\"l\">{}</text><rect x=\"170\" y=\"{y}\" width=\"{w:.1}\" height=\"20\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{}\" class=\"v\">{}</text>",
            y + 15,
            esc(label),
            170.0 + w + 6.0,
            y + 15,
            esc(&unit(*v))
        ));
    }
    svg.push_str("</svg>");
    svg
}

/// Stacked columns of spend per day, one colour per tier.
fn stacked_days(r: &Report) -> String {
    let mut days: Vec<&str> = r.by_day_and_tier.iter().map(|(d, _, _)| d.as_str()).collect();
    days.dedup();
    let mut tiers: Vec<&str> = r.by_day_and_tier.iter().map(|(_, t, _)| t.as_str()).collect();
    tiers.sort();
    tiers.dedup();
    let total = |d: &str| r.by_day_and_tier.iter().filter(|x| x.0 == d).map(|x| x.2).sum::<f64>();
    let max = days.iter().map(|d| total(d)).fold(0.0f64, f64::max).max(f64::MIN_POSITIVE);
    let col = 48.0;
    let width = (days.len() as f64 * (col + 16.0) + 80.0).max(360.0);
    let mut svg = format!("<svg viewBox=\"0 0 {width:.0} 260\" width=\"{width:.0}\" height=\"260\" role=\"img\">");
    svg.push_str(&format!("<text x=\"0\" y=\"14\" class=\"v\">${max:.4}</text><line x1=\"60\" y1=\"20\" x2=\"{width:.0}\" y2=\"20\" stroke=\"#ddd\"/>"));
    for (i, day) in days.iter().enumerate() {
        let x = 70.0 + i as f64 * (col + 16.0);
        let mut y = 220.0;
        for tier in &tiers {
            let v: f64 = r.by_day_and_tier.iter().filter(|x| x.0 == *day && x.1 == *tier).map(|x| x.2).sum();
            let h = v / max * 200.0;
            if h > 0.0 {
                y -= h;
                svg.push_str(&format!(
                    "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{col}\" height=\"{h:.1}\" fill=\"{}\"><title>{} {}: ${v:.6}</title></rect>",
                    colour(tier),
                    esc(day),
                    esc(tier)
                ));
            }
        }
        svg.push_str(&format!("<text x=\"{x:.1}\" y=\"238\" class=\"s\">{}</text>", esc(&day[5..])));
    }
    svg.push_str("</svg>");
    let legend: String = tiers
        .iter()
        .map(|t| format!("<span class=\"k\"><i style=\"background:{}\"></i>{}</span>", colour(t), esc(t)))
        .collect();
    format!("{svg}<div>{legend}</div>")
}

/// The report as one self-contained HTML page with charts (no scripts, no external files).
pub fn render_html(r: &Report) -> String {
    let money = |v: f64| format!("${v:.4}");
    let range = match (r.since, r.until) {
        (None, None) => "all time".to_string(),
        (s, u) => format!(
            "{} to {}",
            s.map_or("the beginning".into(), |t| t.to_rfc3339()),
            u.map_or("now".into(), |t| t.to_rfc3339())
        ),
    };
    let spend_rows = |rows: &[Spend]| -> String {
        rows.iter()
            .map(|s| {
                format!(
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                    esc(&s.key),
                    s.calls,
                    money(s.cost_usd),
                    money(s.baseline_cost_usd)
                )
            })
            .collect()
    };
    let savings = bars(
        &[("spent".to_string(), r.total.cost_usd), ("all-premium baseline".to_string(), r.total.baseline_cost_usd)],
        &|v| format!("${v:.4}"),
    );
    let mix: Vec<(String, f64)> = r.route_mix.iter().map(|(k, n)| (k.clone(), *n as f64)).collect();
    let latency: Vec<(String, f64)> = [("p50", r.latency_p50_ms), ("p95", r.latency_p95_ms)]
        .iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect();
    let dead: i64 = r.dead_letters.iter().map(|(_, n)| n).sum();
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ticketflow report</title>
<style>
body{{font:14px/1.45 system-ui,sans-serif;margin:32px;color:#1d2330;max-width:1100px}}
h1{{font-size:22px;margin:0 0 4px}} h2{{font-size:16px;margin:28px 0 8px}}
.muted{{color:#667}} .cards{{display:flex;gap:12px;flex-wrap:wrap;margin:18px 0}}
.card{{border:1px solid #dde;border-radius:8px;padding:10px 14px;min-width:130px}}
.card b{{display:block;font-size:20px}} .grid{{display:grid;grid-template-columns:1fr 1fr;gap:24px}}
table{{border-collapse:collapse;width:100%}} td,th{{padding:4px 8px;border-bottom:1px solid #eee;text-align:right}}
td:first-child,th:first-child{{text-align:left}} svg{{max-width:100%;height:auto}} .grid>div{{min-width:0}}
svg text{{font:12px system-ui,sans-serif;fill:#334}}
svg .l{{fill:#334}} svg .v{{fill:#556}} svg .s{{font-size:11px;fill:#667}}
.k{{margin-right:12px;font-size:12px}} .k i{{display:inline-block;width:10px;height:10px;margin-right:4px;border-radius:2px}}
</style></head><body>
<h1>ticketflow: cost and routing</h1><div class="muted">{range}</div>
<div class="cards">
<div class="card">spent<b>{spent}</b></div>
<div class="card">all-premium baseline<b>{baseline}</b></div>
<div class="card">per answered ticket<b>{per_answered}</b></div>
<div class="card">saved<b>{saved} ({pct:.1}%)</b></div>
<div class="card">units<b>{units}</b></div>
<div class="card">escalated<b>{escalated}</b></div>
<div class="card">to a human<b>{human}</b></div>
<div class="card">moderation bypass<b>{bypassed}</b></div>
<div class="card">dead letters<b>{dead}</b></div>
</div>
<h2>Spend per day, by tier</h2>{days}
<div class="grid">
<div><h2>Savings against the all-premium baseline</h2>{savings}<div class="muted">{baseline_note}</div></div>
<div><h2>Route mix (units)</h2>{mix}</div>
<div><h2>Latency (ms)</h2>{latency}</div>
<div><h2>Spend by provider</h2><table><tr><th>provider</th><th>calls</th><th>spent</th><th>baseline</th></tr>{providers}</table></div>
<div><h2>Spend by model</h2><table><tr><th>model</th><th>calls</th><th>spent</th><th>baseline</th></tr>{models}</table></div>
<div><h2>Spend by category</h2><table><tr><th>category</th><th>calls</th><th>spent</th><th>baseline</th></tr>{categories}</table></div>
</div>
</body></html>
"#,
        spent = money(r.total.cost_usd),
        baseline = money(r.total.baseline_cost_usd),
        per_answered = money(r.cost_per_answered()),
        baseline_note = esc(crate::summary::BASELINE_NOTE),
        saved = money(r.savings_usd),
        pct = r.savings_pct,
        units = r.units,
        escalated = r.escalated,
        human = r.needs_human,
        bypassed = r.moderation_bypassed,
        days = stacked_days(r),
        mix = bars(&mix, &|v| format!("{v:.0}")),
        latency = bars(&latency, &|v| format!("{v:.0} ms")),
        providers = spend_rows(&r.by_provider),
        models = spend_rows(&r.by_model),
        categories = spend_rows(&r.by_category),
    )
}
