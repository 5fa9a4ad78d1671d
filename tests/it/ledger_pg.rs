//! The PostgreSQL ledger against the real local server. Each test gets a database of
//! its own (CREATE DATABASE + migrations), dropped when the test ends.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ticketflow::ledger::postgres::{self, PgLedger};
use ticketflow::ledger::{Claim, Ledger, LedgerError};
use ticketflow::settings::DatabaseSettings;
use ticketflow::ticket::*;

use crate::helpers::{bin, repo_path, Proxy};

const SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// A migrated database of one's own.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub settings: DatabaseSettings,
}

impl TestDb {
    pub async fn new() -> TestDb {
        TestDb::at_version(None).await
    }

    /// A database migrated up to schema version `target` only (all if `None`).
    pub async fn at_version(target: Option<u32>) -> TestDb {
        let name = format!("tf_test_{}", uuid::Uuid::new_v4().simple());
        let url = format!("{SERVER}/{name}");
        let mut settings = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap().database;
        settings.url = url.clone();
        settings.pool_size = 32;
        postgres::migrate_to(&settings, target)
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (scripts/test.sh starts it)");
        TestDb { name, url, settings }
    }

    pub async fn ledger(&self) -> PgLedger {
        PgLedger::connect(&self.settings).await.unwrap()
    }

    pub async fn client(&self) -> deadpool_postgres::Object {
        self.ledger().await.pool().get().await.unwrap()
    }

    pub async fn drop_db(self) {
        let (client, conn) =
            tokio_postgres::connect(&format!("{SERVER}/postgres"), tokio_postgres::NoTls).await.unwrap();
        let driver = tokio::spawn(conn);
        client.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)).await.unwrap();
        driver.abort();
    }
}

fn reply_output(unit_id: &str, cost: f64) -> Output {
    let reply: Reply =
        serde_json::from_str(&std::fs::read_to_string(repo_path("tests/golden/reply.json")).unwrap()).unwrap();
    let reply = Reply { unit_id: unit_id.into(), cost_usd: cost, ..reply };
    let cost_record: CostRecord =
        serde_json::from_str(&std::fs::read_to_string(repo_path("tests/golden/cost_record.json")).unwrap()).unwrap();
    let costs = vec![
        CostRecord {
            unit_id: unit_id.into(),
            call_id: uuid::Uuid::new_v4().to_string(),
            cost_usd: cost / 2.0,
            ..cost_record.clone()
        },
        CostRecord {
            unit_id: unit_id.into(),
            call_id: uuid::Uuid::new_v4().to_string(),
            stage: Stage::Reply,
            cost_usd: cost / 2.0,
            ..cost_record
        },
    ];
    Output::Reply { reply, costs }
}

fn dead_letter_output(unit_id: &str, cost: f64) -> Output {
    let Output::Reply { costs, .. } = reply_output(unit_id, cost) else { unreachable!() };
    let dead_letter: DeadLetter =
        serde_json::from_str(&std::fs::read_to_string(repo_path("tests/golden/dead_letter.json")).unwrap()).unwrap();
    let dead_letter = DeadLetter {
        unit_id: Some(unit_id.into()),
        ticket_id: Some("T".into()),
        error: DeadLetterError { kind: ErrorKind::ProvidersExhausted, message: "outage".into() },
        ..dead_letter
    };
    Output::DeadLetter { dead_letter, costs }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_workers_claiming_the_same_thousand_units_process_each_exactly_once() {
    let db = TestDb::new().await;
    let ledger = Arc::new(db.ledger().await);
    let units: Arc<Vec<String>> = Arc::new((0..1000).map(|i| format!("T-{i}:0000abcd")).collect());
    let processed = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u32>::new()));
    let mut workers = tokio::task::JoinSet::new();
    for w in 0..50 {
        let (ledger, units, processed) = (ledger.clone(), units.clone(), processed.clone());
        workers.spawn(async move {
            let worker = format!("worker-{w}");
            // Each worker walks the units from a different starting point.
            for k in 0..units.len() {
                let unit = &units[(k + w * 20) % units.len()];
                match ledger.claim(unit, "T", 0, &worker).await.unwrap() {
                    Claim::Fresh { .. } => {
                        *processed.lock().unwrap().entry(unit.clone()).or_default() += 1;
                        ledger.finish(unit, &worker, &reply_output(unit, 0.002)).await.unwrap();
                        ledger.mark_published(unit).await.unwrap();
                    }
                    Claim::Busy | Claim::Done => {}
                    Claim::Unpublished(_) => panic!("nothing is left unpublished in this test"),
                }
            }
        });
    }
    while let Some(r) = workers.join_next().await {
        r.unwrap();
    }
    let processed = processed.lock().unwrap().clone();
    assert_eq!(processed.len(), 1000, "every unit was processed");
    assert!(processed.values().all(|n| *n == 1), "no unit was processed twice");
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE status = 'answered' AND published), sum(cost_usd) FROM units",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (1000, 1000));
    assert!((row.get::<_, f64>(2) - 2.0).abs() < 1e-9, "one set of charges per unit");
    let costs: i64 = client.query_one("SELECT count(*) FROM cost_records", &[]).await.unwrap().get(0);
    assert_eq!(costs, 2000);
    drop(client);
    db.drop_db().await;
}

#[tokio::test]
async fn redelivery_republishes_replay_reopens_and_a_lost_lease_cannot_finish() {
    let db = TestDb::new().await;
    let ledger = db.ledger().await;

    // Finished and being published by its finisher: others wait instead of publishing
    // the same reply again. The publish fails and the finisher lets go: the stored
    // output comes back to the next claimer, with no provider called again.
    assert!(matches!(ledger.claim("A:1", "A", 0, "w1").await.unwrap(), Claim::Fresh { attempts: 1, .. }));
    ledger.finish("A:1", "w1", &reply_output("A:1", 0.01)).await.unwrap();
    assert!(matches!(ledger.claim("A:1", "A", 0, "w2").await.unwrap(), Claim::Busy));
    ledger.release("A:1", "w1").await.unwrap();
    match ledger.claim("A:1", "A", 0, "w2").await.unwrap() {
        Claim::Unpublished(output) => assert!(matches!(*output, Output::Reply { .. })),
        other => panic!("{other:?}"),
    }
    ledger.mark_published("A:1").await.unwrap();
    assert!(matches!(ledger.claim("A:1", "A", 0, "w2").await.unwrap(), Claim::Done));

    // A dead letter comes back with a higher replay count: a fresh attempt that knows
    // what the failed one cost.
    ledger.claim("B:1", "B", 0, "w1").await.unwrap();
    ledger.finish("B:1", "w1", &dead_letter_output("B:1", 0.004)).await.unwrap();
    ledger.mark_published("B:1").await.unwrap();
    assert!(matches!(ledger.claim("B:1", "B", 0, "w1").await.unwrap(), Claim::Done), "a plain redelivery is done");
    match ledger.claim("B:1", "B", 1, "w1").await.unwrap() {
        Claim::Fresh { attempts, prior_cost_usd, .. } => {
            assert_eq!(attempts, 2);
            assert!((prior_cost_usd - 0.004).abs() < 1e-12);
        }
        other => panic!("{other:?}"),
    }
    let dl: i64 = db
        .client()
        .await
        .query_one("SELECT count(*) FROM dead_letters WHERE unit_id = 'B:1'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dl, 1);

    // A live lease keeps others out; once released (or expired) another worker takes
    // over, and the first can no longer finish.
    ledger.claim("C:1", "C", 0, "w1").await.unwrap();
    assert!(matches!(ledger.claim("C:1", "C", 0, "w2").await.unwrap(), Claim::Busy));
    ledger.release("C:1", "w1").await.unwrap();
    assert!(matches!(ledger.claim("C:1", "C", 0, "w2").await.unwrap(), Claim::Fresh { attempts: 2, .. }));
    let err = ledger.finish("C:1", "w1", &reply_output("C:1", 0.01)).await.unwrap_err();
    assert!(matches!(err, LedgerError::LeaseLost(_)));
    ledger.finish("C:1", "w2", &reply_output("C:1", 0.01)).await.unwrap();
    db.drop_db().await;
}

/// The journal: a call's intent is fenced by ownership, its end replaces the lost
/// estimate, and the next owner gets every call back (answers to reuse, calls cut off
/// as `lost`); finishing moves them into the cost records and empties the journal.
#[tokio::test]
async fn the_next_owner_resumes_from_the_journal_and_finishing_records_every_call() {
    let db = TestDb::new().await;
    let ledger = db.ledger().await;
    let Output::Reply { costs: golden, .. } = reply_output("J:1", 0.002) else { unreachable!() };
    let call = |stage: Stage, outcome: CallOutcome, cost: f64| CostRecord {
        call_id: uuid::Uuid::new_v4().to_string(),
        stage,
        outcome,
        cost_usd: cost,
        estimated: outcome == CallOutcome::Lost,
        ..golden[0].clone()
    };
    ledger.claim("J:1", "J", 0, "w#1").await.unwrap();
    // Nobody but the owner journals a call of the unit: the call must not be sent.
    let stray = call(Stage::Triage, CallOutcome::Lost, 0.0001);
    assert!(matches!(ledger.call_sent("w#2", &stray).await, Err(LedgerError::LeaseLost(_))));

    let triage_sent = call(Stage::Triage, CallOutcome::Lost, 0.0001);
    ledger.call_sent("w#1", &triage_sent).await.unwrap();
    let triage = CostRecord { outcome: CallOutcome::Ok, cost_usd: 0.0003, estimated: false, ..triage_sent.clone() };
    ledger.call_ended("J:1", &triage.call_id, Some(&triage), Some("{\"category\": \"billing\"}")).await.unwrap();
    // A call that never reached the provider leaves nothing.
    let unreached = call(Stage::Reply, CallOutcome::Lost, 0.002);
    ledger.call_sent("w#1", &unreached).await.unwrap();
    ledger.call_ended("J:1", &unreached.call_id, None, None).await.unwrap();
    // The owner dies while its reply call is in flight.
    let reply_sent = call(Stage::Reply, CallOutcome::Lost, 0.002);
    ledger.call_sent("w#1", &reply_sent).await.unwrap();
    assert_eq!(ledger.journal("J:1").await.unwrap().len(), 2);

    ledger.release("J:1", "w#1").await.unwrap();
    let journal = match ledger.claim("J:1", "J", 0, "w#3").await.unwrap() {
        Claim::Fresh { attempts: 2, journal, .. } => journal,
        other => panic!("{other:?}"),
    };
    let seen: Vec<_> = journal.iter().map(|c| (c.record.call_id.clone(), c.record.outcome, c.answer.clone())).collect();
    assert_eq!(
        seen,
        vec![
            (triage.call_id.clone(), CallOutcome::Ok, Some("{\"category\": \"billing\"}".to_owned())),
            (reply_sent.call_id.clone(), CallOutcome::Lost, None),
        ]
    );
    assert!((journal[0].record.cost_usd - 0.0003).abs() < 1e-12, "the real record replaced the estimate");
    // The old owner's further calls are fenced off.
    let late = call(Stage::Reply, CallOutcome::Lost, 0.002);
    assert!(matches!(ledger.call_sent("w#1", &late).await, Err(LedgerError::LeaseLost(_))));

    // The new owner answers with one more call and finishes with all three records.
    let Output::Reply { reply, .. } = reply_output("J:1", 0.0) else { unreachable!() };
    let mut costs: Vec<CostRecord> = journal.into_iter().map(|c| c.record).collect();
    costs.push(call(Stage::Reply, CallOutcome::Ok, 0.004));
    let total: f64 = costs.iter().map(|c| c.cost_usd).sum();
    let output = Output::Reply { reply: Reply { cost_usd: total, ..reply }, costs };
    ledger.finish("J:1", "w#3", &output).await.unwrap();
    let client = db.client().await;
    let row = client
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE outcome = 'lost' AND estimated), sum(cost_usd) FROM cost_records",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (3, 1));
    assert!((row.get::<_, f64>(2) - total).abs() < 1e-12);
    let journaled: i64 = client.query_one("SELECT count(*) FROM calls", &[]).await.unwrap().get(0);
    assert_eq!(journaled, 0, "a finished unit leaves no journal behind");
    drop(client);
    db.drop_db().await;
}

/// A claim whose answer was lost with the connection is retried under the same name:
/// it gets the unit back (without counting another attempt); anyone else still waits.
#[tokio::test]
async fn a_claim_retried_by_its_claimer_is_granted_again() {
    let db = TestDb::new().await;
    let ledger = db.ledger().await;
    assert!(matches!(ledger.claim("R:1", "R", 0, "w#1").await.unwrap(), Claim::Fresh { attempts: 1, .. }));
    assert!(matches!(ledger.claim("R:1", "R", 0, "w#1").await.unwrap(), Claim::Fresh { attempts: 1, .. }));
    assert!(matches!(ledger.claim("R:1", "R", 0, "w#2").await.unwrap(), Claim::Busy));
    ledger.finish("R:1", "w#1", &reply_output("R:1", 0.01)).await.unwrap();
    assert!(matches!(ledger.claim("R:1", "R", 0, "w#1").await.unwrap(), Claim::Busy), "finished: no longer claimable");
    drop(ledger);
    db.drop_db().await;
}

/// Version 2 moved the unpublished output from `units` into the decision row: a unit
/// finished but unpublished under version 1 is still republished, not answered again.
#[tokio::test]
async fn upgrading_keeps_unpublished_outputs_for_republishing() {
    let db = TestDb::at_version(Some(1)).await;
    let pool = postgres::pool(&db.settings, ticketflow::ledger::connect::Session::Admin).unwrap();
    let client = pool.get().await.unwrap();
    let pending = serde_json::to_string(&reply_output("U:1", 0.02)).unwrap();
    for (unit, published, output) in [("U:1", false, Some(pending.as_str())), ("U:2", true, None)] {
        client
            .execute(
                "INSERT INTO units (unit_id, ticket_id, status, owner, lease_until, attempts, pending_output, published)
                 VALUES ($1, 'U', 'answered', 'old', now() - interval '1 minute', 1, $2, $3)",
                &[&unit, &output, &published],
            )
            .await
            .unwrap();
        for _ in 0..2 {
            client
                .execute(
                    "INSERT INTO decisions (unit_id, ticket_id, status, reasons, worker_id)
                     VALUES ($1, 'U', 'answered', '{}', 'old')",
                    &[&unit],
                )
                .await
                .unwrap();
        }
    }
    drop(client);
    assert_eq!(postgres::migrate(&db.settings).await.unwrap(), (2..=postgres::latest_version()).collect::<Vec<_>>());
    let ledger = db.ledger().await;
    match ledger.claim("U:1", "U", 0, "new").await.unwrap() {
        Claim::Unpublished(output) => assert_eq!(serde_json::to_string(&output).unwrap(), pending),
        other => panic!("expected the stored output, got {other:?}"),
    }
    assert!(matches!(ledger.claim("U:2", "U", 0, "new").await.unwrap(), Claim::Done));
    let client = db.client().await;
    let kept: i64 =
        client.query_one("SELECT count(*) FROM decisions WHERE output IS NOT NULL", &[]).await.unwrap().get(0);
    assert_eq!(kept, 1, "the output belongs to the unit's latest decision only");
    drop((client, ledger));
    db.drop_db().await;
}

#[tokio::test]
async fn an_unmigrated_database_is_refused_with_a_clear_message() {
    let name = format!("tf_test_{}", uuid::Uuid::new_v4().simple());
    let (client, conn) = tokio_postgres::connect(&format!("{SERVER}/postgres"), tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(conn);
    client.batch_execute(&format!("CREATE DATABASE {name}")).await.unwrap();
    let mut settings = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap().database;
    settings.url = format!("{SERVER}/{name}");
    let err = PgLedger::connect(&settings).await.err().expect("must refuse");
    // The hint is the command to run, naming this database.
    let hint = format!("run `ticketflow migrate --database-url postgres://postgres@127.0.0.1:5432/{name}`");
    assert!(err.to_string().contains(&hint), "{err}");
    client.batch_execute(&format!("DROP DATABASE {name} WITH (FORCE)")).await.unwrap();
    driver.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_loses_nothing_and_nothing_is_answered_or_paid_twice() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let examples = std::fs::read_to_string(repo_path("examples/tickets.jsonl")).unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, examples.lines().take(60).collect::<Vec<_>>().join("\n")).unwrap();
    let run = |latency_ms: u64, out: &str| {
        let mut cmd = bin();
        cmd.arg("process")
            .arg(&input)
            .args(["--out", out, "--ledger", &db.url])
            .env("TICKETFLOW__LIMITS__TICKET_DEADLINE_MS", "2000")
            .env("TICKETFLOW__DATABASE__LEASE_MS", "2500");
        for p in ["QWEN", "OPENAI", "ANTHROPIC", "MISTRAL", "DEEPSEEK"] {
            cmd.env(format!("TICKETFLOW__PROVIDERS__{p}__LATENCY_MS"), latency_ms.to_string())
                .env(format!("TICKETFLOW__PROVIDERS__{p}__JITTER_MS"), "0");
        }
        cmd
    };
    let first_out = dir.path().join("first").display().to_string();
    let mut first = run(600, &first_out).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    // Wait until the first worker holds leases, then kill it without warning.
    let mut stderr = BufReader::new(first.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let client = db.client().await;
    let started = Instant::now();
    loop {
        let held: i64 =
            client.query_one("SELECT count(*) FROM units WHERE status = 'in_progress'", &[]).await.unwrap().get(0);
        if held > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "the first worker never claimed anything");
        tokio::task::yield_now().await;
    }
    first.kill().unwrap();
    first.wait().unwrap();

    let second_out = dir.path().join("second").display().to_string();
    let second = run(0, &second_out).args(["--quiet"]).output().unwrap();
    assert!(second.status.success(), "{}", String::from_utf8_lossy(&second.stderr));

    let client = db.client().await;
    let rows = client.query("SELECT status, published, count(*) FROM units GROUP BY 1, 2", &[]).await.unwrap();
    let units: i64 = rows.iter().map(|r| r.get::<_, i64>(2)).sum();
    assert_eq!(units, 60);
    for r in &rows {
        let status: String = r.get(0);
        assert!(status == "answered" || status == "needs_human", "{status}");
        assert!(r.get::<_, bool>(1), "everything published");
    }
    // One set of charges: per unit, at most one successful reply call and one triage call
    // that answered, and the unit's cost is exactly its cost records.
    let doubled: i64 = client
        .query_one(
            "SELECT count(*) FROM (SELECT unit_id FROM cost_records WHERE outcome = 'ok'
             GROUP BY unit_id, stage HAVING count(*) > 1) d",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(doubled, 0, "a unit was paid for twice");
    let mismatch: i64 = client
        .query_one(
            "SELECT count(*) FROM units u WHERE abs(u.cost_usd -
               coalesce((SELECT sum(cost_usd) FROM cost_records c WHERE c.unit_id = u.unit_id), 0)) > 1e-12",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(mismatch, 0);
    // Every ticket has exactly one reply across the two runs' outputs.
    let mut replies = BTreeMap::<String, u32>::new();
    for out in [&first_out, &second_out] {
        let path = std::path::Path::new(out).join("replies.jsonl");
        for l in std::fs::read_to_string(path).unwrap_or_default().lines() {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            *replies.entry(v["ticket_id"].as_str().unwrap().to_owned()).or_default() += 1;
        }
    }
    assert_eq!(replies.len(), 60);
    assert!(replies.values().all(|n| *n == 1), "a ticket was answered twice");
    drop(client);
    db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_figures_match_the_records_of_the_run() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let cfg = crate::helpers::instant_config(dir.path());
    let run = bin()
        .args(["process", "--quiet", "--ledger", &db.url, "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out_dir)
        .arg(repo_path("examples/tickets.jsonl"))
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let out = crate::helpers::Outputs::read(&out_dir);
    let report = |extra: &[&str]| -> serde_json::Value {
        let r = bin()
            .args(["report", "--format", "json"])
            .args(extra)
            .env("TICKETFLOW__DATABASE__URL", &db.url)
            .output()
            .unwrap();
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        serde_json::from_slice(&r.stdout).unwrap()
    };
    let r = report(&[]);
    let spent: f64 = out.costs.iter().map(|c| c["cost_usd"].as_f64().unwrap()).sum();
    assert!((r["total"]["cost_usd"].as_f64().unwrap() - spent).abs() < 1e-9);
    assert_eq!(r["total"]["calls"].as_u64().unwrap() as usize, out.costs.len());
    let human = out.replies.iter().filter(|x| x["status"] == "needs_human").count();
    assert_eq!(r["needs_human"].as_u64().unwrap() as usize, human);
    assert_eq!(r["answered"].as_u64().unwrap() as usize, out.replies.len() - human);
    let bypassed = out.replies.iter().filter(|x| x["moderation"]["bypassed"] == true).count();
    assert_eq!(r["moderation_bypassed"].as_u64().unwrap() as usize, bypassed);
    let escalated = out.replies.iter().filter(|x| x["status"] == "answered" && x["route"]["tier"] != "cheap").count();
    assert_eq!(r["escalated"].as_u64().unwrap() as usize, escalated);
    for group in ["by_provider", "by_model", "by_tier", "by_category", "by_day"] {
        let sum: f64 = r[group].as_array().unwrap().iter().map(|s| s["cost_usd"].as_f64().unwrap()).sum();
        assert!((sum - spent).abs() < 1e-9, "{group} adds up to the total");
    }
    for p in r["by_provider"].as_array().unwrap() {
        let name = p["key"].as_str().unwrap();
        let expected: f64 =
            out.costs.iter().filter(|c| c["provider"] == name).map(|c| c["cost_usd"].as_f64().unwrap()).sum();
        assert!((p["cost_usd"].as_f64().unwrap() - expected).abs() < 1e-9, "{name}");
    }
    // The baseline is one premium reply per answered unit, from the reply records.
    let baseline = crate::helpers::expected_baseline(&out.costs);
    assert!((r["total"]["baseline_cost_usd"].as_f64().unwrap() - baseline).abs() < 1e-9, "{}", r["total"]);
    let pct = r["savings_pct"].as_f64().unwrap();
    assert!((pct - (baseline - spent) / baseline * 100.0).abs() < 1e-6 && pct > 20.0, "{pct}");
    let empty = report(&["--since", "2999-01-01"]);
    assert_eq!(empty["total"]["calls"], 0);
    assert_eq!(empty["units"], 0);
    let bad =
        bin().args(["report", "--since", "yesterday"]).env("TICKETFLOW__DATABASE__URL", &db.url).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    db.drop_db().await;
}

/// Whether a connection made with these settings is encrypted, or why it failed.
async fn encrypted(settings: &DatabaseSettings) -> Result<bool, String> {
    let pool = postgres::pool(settings, ticketflow::ledger::connect::Session::Admin).map_err(|e| e.to_string())?;
    let client = pool.get().await.map_err(|e| ticketflow::error_chain(&e))?;
    let row = client
        .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

/// libpq's TLS modes against the local server. Debian's PostgreSQL serves TLS with its
/// self-signed "snakeoil" certificate, issued for `localhost`; a server without TLS is
/// checked for the plain-text side only.
#[tokio::test]
async fn tls_modes_connect_as_libpq_would() {
    use ticketflow::settings::TlsMode;
    let (admin, conn) = tokio_postgres::connect(&format!("{SERVER}/postgres"), tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(conn);
    let ssl_on = admin.query_one("SHOW ssl", &[]).await.unwrap().get::<_, String>(0) == "on";
    let cert: String = admin.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
    driver.abort();
    let base = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap().database;
    let with = |url: &str, tls: TlsMode, ca: &str| DatabaseSettings {
        url: url.into(),
        tls,
        tls_ca_file: ca.into(),
        connect_timeout_ms: 3000,
        ..base.clone()
    };
    let by_ip = format!("{SERVER}/postgres");
    let by_name = "postgres://postgres@localhost:5432/postgres";

    assert_eq!(encrypted(&with(&by_ip, TlsMode::Disable, "")).await, Ok(false));
    if !ssl_on {
        assert_eq!(encrypted(&with(&by_ip, TlsMode::Prefer, "")).await, Ok(false));
        let err = encrypted(&with(&by_ip, TlsMode::Require, "")).await.unwrap_err();
        assert!(err.contains("TLS") || err.contains("SSL"), "{err}");
        return;
    }
    assert_eq!(encrypted(&with(&by_ip, TlsMode::Prefer, "")).await, Ok(true));
    assert_eq!(encrypted(&with(&by_ip, TlsMode::Require, "")).await, Ok(true));
    // The URL's sslmode wins over the setting, as an operator pasting a libpq URL expects.
    assert_eq!(encrypted(&with(&format!("{by_ip}?sslmode=disable"), TlsMode::Require, "")).await, Ok(false));
    // A self-signed certificate is trusted only when its authority is configured (the
    // public authorities of Debian's bundle do not vouch for it)...
    let public_cas = "/etc/ssl/certs/ca-certificates.crt";
    if std::path::Path::new(public_cas).exists() {
        let err = encrypted(&with(by_name, TlsMode::VerifyFull, public_cas)).await.unwrap_err();
        assert!(err.contains("certificate"), "{err}");
    }
    assert_eq!(encrypted(&with(by_name, TlsMode::VerifyFull, &cert)).await, Ok(true));
    assert_eq!(
        encrypted(&with(&format!("{by_name}?sslmode=verify-full&sslrootcert={cert}"), TlsMode::Disable, "")).await,
        Ok(true)
    );
    // ...and verify-full also wants it issued for the host connected to; verify-ca does not.
    let err = encrypted(&with(&by_ip, TlsMode::VerifyFull, &cert)).await.unwrap_err();
    assert!(err.contains("certificate"), "{err}");
    assert_eq!(encrypted(&with(&by_ip, TlsMode::VerifyCa, &cert)).await, Ok(true));
}

/// Polls `condition` every 10 ms until it holds; panics after `limit`.
async fn wait_for<F, Fut>(what: &str, limit: Duration, condition: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SPEC §6: with PostgreSQL down the worker takes no new ticket, reports not ready,
/// retries, and resumes without losing or double-processing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_pauses_intake_and_nothing_is_lost_or_done_twice() {
    use std::collections::HashMap;
    use std::sync::atomic::Ordering;
    use ticketflow::backoff::Backoff;
    use ticketflow::broker::memory::{self, MemoryPublisher};
    use ticketflow::dispatch::{DispatchConfig, Dispatcher, RetryPolicy, RunStats, Shutdown, Unlimited};
    use ticketflow::ledger::resilient::{Health, Resilient};

    let db = TestDb::new().await;
    let proxy = Proxy::start("127.0.0.1:5432").await;
    // Quick simulated providers, so that tickets are in every stage when the cut comes.
    let base = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
    let mut env = BTreeMap::new();
    for name in base.providers.keys() {
        let key = |field: &str| format!("TICKETFLOW__PROVIDERS__{}__{field}", name.to_uppercase());
        env.insert(key("LATENCY_MS"), "20".to_string());
        env.insert(key("JITTER_MS"), "10".to_string());
    }
    env.insert("TICKETFLOW__LIMITS__MAX_IN_FLIGHT".into(), "64".into());
    let settings = Arc::new(ticketflow::policy::load_from(None, &env).unwrap());
    let mut through_proxy = db.settings.clone();
    through_proxy.url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, db.name);
    through_proxy.tls = ticketflow::settings::TlsMode::Disable;
    through_proxy.connect_timeout_ms = 1000;
    let store = Arc::new(PgLedger::connect(&through_proxy).await.unwrap());
    let health = Health::new();
    let backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) };
    let ledger = Arc::new(Resilient::new(store, health.clone(), backoff));
    let analyzer = Arc::new(ticketflow::triage::Analyzer::new(&settings.triage));
    let providers = ticketflow::providers::Providers::from_settings(&settings, analyzer.clone()).unwrap();
    let publisher = Arc::new(MemoryPublisher::new());
    let pipeline =
        Arc::new(ticketflow::pipeline::Pipeline::new(settings.clone(), analyzer, providers, ledger, publisher.clone()));

    let lines: Vec<String> = std::fs::read_to_string(repo_path("examples/tickets.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_owned)
        .collect();
    let total = lines.len();
    let (producer, queue) = memory::queue(16);
    // Tickets arrive every 5 ms, so most of the 64 in-flight permits are free when the
    // cut comes: only the readiness gate keeps the runner from taking more.
    let feeder = tokio::spawn(async move {
        let mut arrivals = tokio::time::interval(Duration::from_millis(5));
        for (i, line) in lines.into_iter().enumerate() {
            arrivals.tick().await;
            let message = ticketflow::broker::Message {
                key: ticketflow::intake::conversation_key(line.as_bytes()),
                payload: bytes::Bytes::from(line),
                full_len: None,
                source: SourceRef { topic: "tickets".into(), partition: 0, offset: i as i64 },
                redelivered: false,
                stable_offset: false,
                replay_count: 0,
            };
            assert!(producer.send(message).await);
        }
    });
    let stats = Arc::new(RunStats::default());
    let dispatcher = Dispatcher {
        handler: pipeline,
        config: DispatchConfig { max_in_flight: 64, retry: RetryPolicy::from_settings(&settings.limits) },
        observers: Vec::new(),
        admission: Arc::new(Unlimited),
        health: health.clone(),
        stats: stats.clone(),
    };
    let run = tokio::spawn(async move { dispatcher.run(queue, Shutdown::new(Duration::from_secs(60))).await });

    let observer = Arc::new(db.client().await);
    let published = |observer: Arc<deadpool_postgres::Object>| async move {
        observer.query_one("SELECT count(*) FROM units WHERE published", &[]).await.unwrap().get::<_, i64>(0)
    };
    wait_for("40 published units", Duration::from_secs(60), || {
        let observer = observer.clone();
        async move { published(observer).await >= 40 }
    })
    .await;

    proxy.cut();
    wait_for("readiness to go false", Duration::from_secs(10), || async { !health.is_ready() }).await;
    wait_for("a first probe", Duration::from_secs(10), || async { health.probes() >= 1 }).await;
    let taken = stats.received.load(Ordering::SeqCst);
    let at_cut = published(observer.clone()).await;
    wait_for("six probes", Duration::from_secs(10), || async { health.probes() >= 6 }).await;
    assert_eq!(stats.received.load(Ordering::SeqCst), taken, "no new ticket is taken while the database is down");
    assert!(!health.is_ready());
    assert_eq!(published(observer.clone()).await, at_cut, "nothing is recorded while the database is down");

    proxy.restore();
    feeder.await.unwrap();
    tokio::time::timeout(Duration::from_secs(120), run).await.expect("the run resumes and ends").unwrap().unwrap();
    assert!(health.is_ready());
    assert!(health.outages() >= 1);
    assert!(at_cut < total as i64, "the cut came in the middle of the run");

    // Every delivery ends as one output; every unit is answered once and paid once.
    assert_eq!(stats.acked.load(Ordering::SeqCst), total as u64);
    let outputs = publisher.outputs();
    let mut per_unit: HashMap<String, usize> = HashMap::new();
    let (mut cost, mut records) = (0.0, 0i64);
    for output in &outputs {
        let unit = match output {
            Output::Reply { reply, .. } => reply.unit_id.clone(),
            Output::DeadLetter { dead_letter, .. } => dead_letter.unit_id.clone().expect("no rejected input here"),
        };
        *per_unit.entry(unit).or_default() += 1;
        cost += output.costs().iter().map(|c| c.cost_usd).sum::<f64>();
        records += output.costs().len() as i64;
    }
    assert!(per_unit.values().all(|&n| n == 1), "a unit was published twice");
    let row = observer
        .query_one(
            "SELECT (SELECT count(*) FROM units), (SELECT count(*) FROM units WHERE NOT published),
                    (SELECT count(*) FROM decisions), (SELECT count(*) FROM cost_records),
                    (SELECT coalesce(sum(cost_usd), 0) FROM cost_records)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), per_unit.len() as i64, "one unit row per unit published");
    assert_eq!(row.get::<_, i64>(1), 0, "every unit is marked published");
    assert_eq!(row.get::<_, i64>(2), per_unit.len() as i64, "one decision per unit: nothing done twice");
    assert_eq!(row.get::<_, i64>(3), records, "the ledger holds exactly the published cost records");
    assert!((row.get::<_, f64>(4) - cost).abs() < 1e-9, "ledger spend equals published spend");
    drop(observer);
    drop(proxy);
    db.drop_db().await;
}

/// Version 3 keeps a baseline price only on each unit's answering call: ledgers
/// written before it stop counting triage, moderation and failed calls as baseline.
#[tokio::test]
async fn upgrading_prices_the_baseline_on_answering_calls_only() {
    let db = TestDb::at_version(Some(2)).await;
    let pool = postgres::pool(&db.settings, ticketflow::ledger::connect::Session::Admin).unwrap();
    let client = pool.get().await.unwrap();
    for (stage, outcome, baseline) in [("triage", "ok", 0.5), ("reply", "refused", 0.25), ("reply", "ok", 2.0)] {
        client
            .execute(
                "INSERT INTO cost_records (call_id, unit_id, ticket_id, stage, provider, model, input_tokens,
                     cached_input_tokens, output_tokens, cost_usd, baseline_cost_usd, pricing_version, outcome,
                     latency_ms, estimated, at)
                 VALUES (gen_random_uuid(), 'B:1', 'B', $1, 'qwen', 'qwen-plus', 10, 0, 10, 0.1, $2, 'v', $3, 1, false, now())",
                &[&stage, &baseline, &outcome],
            )
            .await
            .unwrap();
    }
    drop(client);
    postgres::migrate(&db.settings).await.unwrap();
    let client = db.client().await;
    let row = client.query_one("SELECT sum(baseline_cost_usd), sum(cost_usd) FROM cost_records", &[]).await.unwrap();
    assert_eq!(row.get::<_, f64>(0), 2.0, "only the answering call keeps its baseline");
    assert!((row.get::<_, f64>(1) - 0.3).abs() < 1e-12, "spend is untouched");
    drop(client);
    db.drop_db().await;
}

/// Issue 14: three replicas' budgets sharing one cap through the database, many
/// tickets in flight on each: the leases never sum above the cap and one
/// reservation, the spend stays within them, and the replicas that stop give back
/// what they did not use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_leased_through_the_database_never_exceed_the_cap_and_one_reservation() {
    use ticketflow::routing::budget::{BudgetSettings, Budgets};
    const CAP: f64 = 0.05;
    const MOST: f64 = 0.008;
    let db = TestDb::new().await;
    let ledger = db.ledger().await;
    let caps = BTreeMap::from([("premium".to_string(), BudgetSettings { daily_usd: CAP, when_spent: "cheap".into() })]);
    let bank = Arc::new(ticketflow::ledger::meeting::PgBank::new(ledger.pool().clone()));
    let zone = chrono_tz::Tz::UTC;
    let replicas: Vec<Arc<Budgets>> =
        (0..3).map(|i| Arc::new(Budgets::shared(caps.clone(), zone, bank.clone(), &format!("r{i}")))).collect();
    let mut lanes = Vec::new();
    for (i, b) in replicas.iter().enumerate() {
        for lane in 0..8 {
            let b = b.clone();
            lanes.push(tokio::spawn(async move {
                let mut spent = 0.0;
                for k in 0..10 {
                    if let Ok(Some(hold)) = b.reserve("premium", MOST).await {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        let cost = 0.001 + 0.007 * (((i * 80 + lane * 10 + k) * 37 % 100) as f64 / 100.0);
                        hold.settle(cost);
                        spent += cost;
                    }
                    if lane == 0 && k % 3 == 0 {
                        b.sync().await.unwrap();
                    }
                }
                spent
            }));
        }
    }
    let mut spent = 0.0;
    for lane in lanes {
        spent += lane.await.unwrap();
    }
    let client = db.client().await;
    let sums =
        "SELECT sum(granted_usd), sum(spent_usd), count(*) FROM budget_leases WHERE tier = 'premium' AND day = $1";
    let today = replicas[0].today();
    let row = client.query_one(sums, &[&today]).await.unwrap();
    let (granted, _, members): (f64, f64, i64) = (row.get(0), row.get(1), row.get(2));
    assert!(granted <= CAP + MOST + 1e-12, "leased {granted}");
    assert!(spent <= CAP + MOST + 1e-12, "spent {spent}");
    assert!(spent > CAP / 2.0, "spent {spent}: the cap was used");
    assert_eq!(members, 3);
    for b in &replicas {
        b.leave().await.unwrap();
    }
    let row = client.query_one(sums, &[&today]).await.unwrap();
    let (granted, recorded): (f64, f64) = (row.get(0), row.get(1));
    assert!((recorded - spent).abs() < 1e-9, "the rows say {recorded} spent, the replicas {spent}");
    assert!((granted - spent).abs() < 1e-9, "after leaving, the leases hold only what was spent: {granted}");
    drop(client);
    db.drop_db().await;
}

/// The pipeline of the default configuration (simulated providers) on `db`'s ledger,
/// publishing into memory.
async fn pg_pipeline(
    db: &TestDb,
) -> (
    Arc<ticketflow::settings::Settings>,
    Arc<PgLedger>,
    Arc<ticketflow::broker::memory::MemoryPublisher>,
    ticketflow::pipeline::Pipeline,
) {
    let ledger = Arc::new(db.ledger().await);
    let settings = Arc::new(ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap());
    let analyzer = Arc::new(ticketflow::triage::Analyzer::new(&settings.triage));
    let providers = ticketflow::providers::Providers::from_settings(&settings, analyzer.clone()).unwrap();
    let publisher = Arc::new(ticketflow::broker::memory::MemoryPublisher::new());
    let pipeline =
        ticketflow::pipeline::Pipeline::new(settings.clone(), analyzer, providers, ledger.clone(), publisher.clone());
    (settings, ledger, publisher, pipeline)
}

/// A unit whose workers keep dying on it (a ticket that crashes its worker) is taken
/// over a bounded number of times: then it ends as an `internal` dead letter naming
/// the takeovers, carrying the calls the dead owners made, and is not worked on again.
#[tokio::test]
async fn a_unit_taken_over_too_often_becomes_one_internal_dead_letter_with_its_calls() {
    use ticketflow::dispatch::Attempt;
    use ticketflow::pipeline::{HandleError, Handled};

    let db = TestDb::new().await;
    let (settings, ledger, publisher, pipeline) = pg_pipeline(&db).await;
    let payload = r#"{"ticket_id": "K-1", "messages": [{"role": "customer", "text": "where is my order?"}]}"#;
    let ticket = ticketflow::intake::parse(payload.as_bytes(), 1 << 20).unwrap();
    let message = ticketflow::broker::Message {
        payload: bytes::Bytes::from(payload),
        full_len: None,
        source: SourceRef { topic: "tickets".into(), partition: 0, offset: 3 },
        key: Some("K-1".into()),
        redelivered: true,
        stable_offset: false,
        replay_count: 0,
    };
    // Each owner dies in its triage call: the call is journaled, never answered.
    let bound = settings.limits.max_delivery_attempts;
    let Output::Reply { costs: golden, .. } = reply_output(&ticket.unit_id, 0.002) else { unreachable!() };
    for owner in 0..bound {
        let claimer = format!("dead-{owner}#1");
        assert!(matches!(ledger.claim(&ticket.unit_id, "K-1", 0, &claimer).await.unwrap(), Claim::Fresh { .. }));
        let lost = CostRecord {
            call_id: uuid::Uuid::new_v4().to_string(),
            unit_id: ticket.unit_id.clone(),
            outcome: CallOutcome::Lost,
            ..golden[0].clone()
        };
        ledger.call_sent(&claimer, &lost).await.unwrap();
        ledger.release(&ticket.unit_id, &claimer).await.unwrap();
    }
    let attempt = Attempt::first(9);
    match pipeline.handle(&message, &attempt).await {
        Err(HandleError::TakenOver { takeovers, .. }) => assert_eq!(takeovers, bound),
        other => panic!("expected the takeover bound, got {other:?}"),
    }
    let reason = format!("unit {} was taken over {bound} times", ticket.unit_id);
    let done = pipeline.give_up(&message, &attempt, &reason).await.unwrap();
    assert_eq!(done.handled, Handled::DeadLettered(ErrorKind::Internal));
    match publisher.outputs().as_slice() {
        [Output::DeadLetter { dead_letter, costs }] => {
            assert!(dead_letter.error.message.contains("taken over"), "{}", dead_letter.error.message);
            assert_eq!(costs.len() as u32, bound, "every dead owner's call is a cost record");
            assert!(costs.iter().all(|c| c.outcome == CallOutcome::Lost));
        }
        other => panic!("expected one dead letter, got {other:?}"),
    }
    assert!(matches!(ledger.claim(&ticket.unit_id, "K-1", 0, "late#1").await.unwrap(), Claim::Done));
    drop((pipeline, ledger));
    db.drop_db().await;
}

/// A poison message whose ack is lost comes back: it yields one dead letter, however
/// often it is delivered; a replay of its dead letter is new input and is judged again.
#[tokio::test]
async fn a_poison_message_delivered_three_times_yields_one_dead_letter() {
    use ticketflow::dispatch::Attempt;
    use ticketflow::pipeline::Handled;

    let db = TestDb::new().await;
    let (_, ledger, publisher, pipeline) = pg_pipeline(&db).await;
    let poison = |replay_count| ticketflow::broker::Message {
        payload: bytes::Bytes::from_static(b"not json at all"),
        full_len: None,
        source: SourceRef { topic: "tickets".into(), partition: 0, offset: 5 },
        key: None,
        redelivered: true,
        stable_offset: false,
        replay_count,
    };
    let mut handled = Vec::new();
    for seq in 0..3 {
        handled.push(pipeline.handle(&poison(0), &Attempt::first(seq)).await.unwrap().handled);
    }
    assert_eq!(
        handled,
        vec![Handled::DeadLettered(ErrorKind::InvalidJson), Handled::Duplicate, Handled::Duplicate],
        "the copies are acked with no new output"
    );
    assert_eq!(publisher.outputs().len(), 1, "one dead letter on the topic");
    let recorded: i64 = db.client().await.query_one("SELECT count(*) FROM dead_letters", &[]).await.unwrap().get(0);
    assert_eq!(recorded, 1, "one dead letter in the ledger");
    let replayed = pipeline.handle(&poison(1), &Attempt::first(9)).await.unwrap().handled;
    assert_eq!(replayed, Handled::DeadLettered(ErrorKind::InvalidJson), "a replay is judged again");
    assert_eq!(publisher.outputs().len(), 2);
    drop((pipeline, ledger));
    db.drop_db().await;
}

/// A dead letter's calls stay in the journal, settled: its replay reuses their
/// answers (no triage paid twice) without publishing their records again.
#[tokio::test]
async fn a_replay_reuses_the_answers_its_dead_letter_paid_for() {
    let db = TestDb::new().await;
    let ledger = db.ledger().await;
    let Output::Reply { costs: golden, .. } = reply_output("P:1", 0.002) else { unreachable!() };
    let triage =
        CostRecord { call_id: uuid::Uuid::new_v4().to_string(), outcome: CallOutcome::Ok, ..golden[0].clone() };
    ledger.claim("P:1", "P", 0, "w#1").await.unwrap();
    ledger.call_sent("w#1", &CostRecord { outcome: CallOutcome::Lost, ..triage.clone() }).await.unwrap();
    ledger.call_ended("P:1", &triage.call_id, Some(&triage), Some("{}")).await.unwrap();
    let Output::DeadLetter { dead_letter, .. } = dead_letter_output("P:1", 0.0) else { unreachable!() };
    let output = Output::DeadLetter { dead_letter, costs: vec![triage.clone()] };
    ledger.finish("P:1", "w#1", &output).await.unwrap();
    ledger.mark_published("P:1").await.unwrap();
    assert!(ledger.journal("P:1").await.unwrap().is_empty(), "nothing left to publish");
    match ledger.claim("P:1", "P", 1, "w#2").await.unwrap() {
        Claim::Fresh { attempts: 2, journal, .. } => {
            assert_eq!(journal.len(), 1);
            assert!(journal[0].settled && journal[0].answer.as_deref() == Some("{}"), "{journal:?}");
            assert_eq!(journal[0].record.call_id, triage.call_id);
        }
        other => panic!("{other:?}"),
    }
    // Answered this time: the journal is gone, and the triage was recorded once.
    ledger.finish("P:1", "w#2", &reply_output("P:1", 0.002)).await.unwrap();
    let client = db.client().await;
    let left: i64 = client.query_one("SELECT count(*) FROM calls", &[]).await.unwrap().get(0);
    assert_eq!(left, 0);
    let triages: i64 = client
        .query_one("SELECT count(*) FROM cost_records WHERE call_id = $1::text::uuid", &[&triage.call_id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(triages, 1);
    drop(client);
    db.drop_db().await;
}
