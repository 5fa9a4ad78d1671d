//! Units of work recorded per second by the PostgreSQL ledger with the worker's access
//! pattern: claim, finish (reply, two cost records, routing decision) and mark
//! published, with many units in flight at once, as a worker at its in-flight budget
//! (`limits.max_in_flight`) with its default pool (`database.pool_size`). Providers
//! answer instantly here, so this is the ledger's worst case: nothing else paces it.
//!
//! Run: `cargo bench --bench ledger_throughput` (env: UNITS, IN_FLIGHT, RUNS,
//! TLS (default `database.tls`, prefer: TLS on a server that offers it), DATABASE_SERVER,
//! default postgres://postgres@127.0.0.1:5432). It creates and drops
//! its own database (KEEP_DATABASE=1 keeps it, for inspection).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use ticketflow::ledger::postgres::{self, PgLedger};
use ticketflow::ledger::{Claim, Ledger};
use ticketflow::ticket::*;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A realistic reply and cost record, read once.
fn templates() -> (Reply, CostRecord) {
    let root = env!("CARGO_MANIFEST_DIR");
    let read = |f: &str| std::fs::read_to_string(format!("{root}/tests/golden/{f}")).unwrap();
    (serde_json::from_str(&read("reply.json")).unwrap(), serde_json::from_str(&read("cost_record.json")).unwrap())
}

fn output(unit_id: &str, (reply, cost): &(Reply, CostRecord)) -> Output {
    let costs = (0..2)
        .map(|_| CostRecord { unit_id: unit_id.into(), call_id: uuid::Uuid::new_v4().to_string(), ..cost.clone() })
        .collect();
    Output::Reply { reply: Reply { unit_id: unit_id.into(), ..reply.clone() }, costs }
}

/// Busy and stolen CPU time of the whole machine so far (server, bench and anything
/// else), in clock ticks, from /proc/stat; `None` where there is no /proc.
fn machine_cpu() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy = fields[0] + fields[1] + fields[2] + fields[5] + fields[6];
    Some((busy, *fields.get(7).unwrap_or(&0)))
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let units: usize = if measuring { env_or("UNITS", 50_000) } else { 500 };
    let runs: usize = if measuring { env_or("RUNS", 5) } else { 1 };
    let server: String = env_or("DATABASE_SERVER", "postgres://postgres@127.0.0.1:5432".to_string());

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    runtime.block_on(async {
        let name = format!("tf_bench_{}", uuid::Uuid::new_v4().simple());
        let base = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
        let in_flight: usize = env_or("IN_FLIGHT", base.limits.max_in_flight);
        let mut db = base.database.clone();
        db.url = format!("{server}/{name}");
        if let Ok(tls) = std::env::var("TLS") {
            db.tls = ticketflow::settings::TlsMode::parse(&tls).expect("TLS: disable, prefer, require, ...");
        }
        postgres::migrate(&db).await.expect("a PostgreSQL server");
        let ledger = Arc::new(PgLedger::connect(&db).await.unwrap());
        let templates = Arc::new(templates());
        let mut rates = Vec::new();
        for run in 1..=runs {
            let started = Instant::now();
            let cpu_before = machine_cpu();
            let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            for w in 0..in_flight {
                let (ledger, next, templates) = (ledger.clone(), next.clone(), templates.clone());
                tasks.spawn(async move {
                    let worker = format!("bench-{w}");
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if i >= units {
                            return;
                        }
                        let ticket = format!("R{run}-T-{i}");
                        let unit = format!("{ticket}:00c0ffee");
                        let out = output(&unit, &templates);
                        match ledger.claim(&unit, &ticket, 0, &worker).await.unwrap() {
                            Claim::Fresh { .. } => {
                                ledger.finish(&unit, &worker, &out).await.unwrap();
                                ledger.mark_published(&unit).await.unwrap();
                            }
                            other => panic!("unexpected {other:?}"),
                        }
                    }
                });
            }
            while let Some(r) = tasks.join_next().await {
                r.unwrap();
            }
            let elapsed = started.elapsed().as_secs_f64();
            let rate = units as f64 / elapsed;
            // CPU per unit is steadier than units/s on a machine whose neighbours steal
            // time: it says what the ledger costs, whatever was left for it to use.
            let cpu = match (cpu_before, machine_cpu()) {
                (Some((b0, s0)), Some((b1, s1))) => {
                    let tick = 1e6 / 100.0; // µs per USER_HZ tick
                    let steal = (s1 - s0) as f64 * tick / 1e6 / elapsed;
                    format!(
                        ", machine CPU {:.0} µs/unit, {steal:.2} cores stolen",
                        (b1 - b0) as f64 * tick / units as f64
                    )
                }
                _ => String::new(),
            };
            println!("run {run}: {units} units with {in_flight} in flight: {rate:.0} units/s{cpu}");
            rates.push(rate);
        }
        rates.sort_by(|a, b| a.total_cmp(b));
        println!("median: {:.0} units/s (claim + finish with 2 cost records + mark published)", rates[rates.len() / 2]);
        drop(ledger);
        if std::env::var_os("KEEP_DATABASE").is_some() {
            println!("kept database {name}");
            return;
        }
        let (client, conn) =
            tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls).await.unwrap();
        let driver = tokio::spawn(conn);
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await.unwrap();
        driver.abort();
    });
}
