//! `ticketflow-chaos`: runs `ticketflow worker` processes against RabbitMQ, the
//! PostgreSQL ledger and the mock provider, injects faults on a seeded schedule, and
//! checks the delivery guarantees from what the outputs and the ledger hold (never
//! from the workers' own logs). Prints one line of figures; exits 1 on any violation,
//! 2 when it cannot run.
//!
//! ```text
//! ticketflow-chaos --scenario kill --tickets 2000 --workers 3 --seconds 60 --seed 7
//! ```
//!
//! Scenarios: `calm` (no fault: the baseline), `kill` (a random worker SIGKILLed and
//! started again every `--every` seconds), `term` (the same with SIGTERM, waiting for
//! the drain), `db-cut` (the workers' PostgreSQL connections cut through a proxy for
//! one to four seconds every `--every` seconds). Claims are leased for `--lease-ms` (5 s; a killed worker's tickets
//! wait that long for another worker). Everything runs on loopback with queues and a database of its own,
//! removed at the end (kept with `--keep` for a look after a failure).
//!
//! Invariants: every valid ticket ends as exactly one reply (copies of a reply must
//! be identical: a confirm lost to a kill) or one dead letter, every poison message as
//! one dead letter; replies of a conversation in order (with one worker: RabbitMQ
//! keeps order within a worker; across workers inversions are counted); every paid call published
//! once and recorded once (the ledger's cost records against the published ones); the
//! replies' cost adds up to the published cost records and the ledger's spend; the
//! planted API key in no output and no worker log.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const AMQP: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const POSTGRES: &str = "postgres://postgres@127.0.0.1:5432";
const KEY_ENV: &str = "TF_CHAOS_KEY";
const PLANTED_KEY: &str = "sk-chaos-planted-4b1d9e";

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    Calm,
    Kill,
    Term,
    DbCut,
}

#[derive(Debug, Clone)]
struct Options {
    scenario: Scenario,
    tickets: usize,
    workers: usize,
    seconds: u64,
    every: f64,
    seed: u64,
    settle_timeout: u64,
    lease_ms: u64,
    keep: bool,
    examples: PathBuf,
}

fn usage(problem: &str) -> ! {
    eprintln!("error: {problem}");
    eprintln!(
        "usage: ticketflow-chaos --scenario calm|kill|term|db-cut [--tickets N] [--workers N] [--seconds S] [--every S] [--seed N] [--settle-timeout S] [--lease-ms MS] [--examples FILE] [--keep]"
    );
    std::process::exit(2)
}

fn parse() -> Options {
    let mut o = Options {
        scenario: Scenario::Kill,
        tickets: 2000,
        workers: 3,
        seconds: 60,
        every: 3.0,
        seed: 1,
        settle_timeout: 300,
        lease_ms: 5000,
        keep: false,
        examples: PathBuf::from("examples/tickets.jsonl"),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = |name: &str| args.next().unwrap_or_else(|| usage(&format!("{name} needs a value")));
        let number = |name: &str, v: String| -> u64 {
            v.parse().unwrap_or_else(|_| usage(&format!("{name}: `{v}` is not a whole number")))
        };
        match flag.as_str() {
            "--scenario" => {
                o.scenario = match value("--scenario").as_str() {
                    "calm" => Scenario::Calm,
                    "kill" => Scenario::Kill,
                    "term" => Scenario::Term,
                    "db-cut" => Scenario::DbCut,
                    other => usage(&format!("--scenario: `{other}` is none of calm, kill, term, db-cut")),
                }
            }
            "--tickets" => o.tickets = number("--tickets", value("--tickets")) as usize,
            "--workers" => o.workers = number("--workers", value("--workers")) as usize,
            "--seconds" => o.seconds = number("--seconds", value("--seconds")),
            "--every" => {
                let v = value("--every");
                o.every = v
                    .parse()
                    .ok()
                    .filter(|s: &f64| *s >= 0.1)
                    .unwrap_or_else(|| usage(&format!("--every: `{v}` is not a number of seconds of 0.1 or more")))
            }
            "--seed" => o.seed = number("--seed", value("--seed")),
            "--settle-timeout" => o.settle_timeout = number("--settle-timeout", value("--settle-timeout")),
            "--lease-ms" => o.lease_ms = number("--lease-ms", value("--lease-ms")).max(1000),
            "--examples" => o.examples = PathBuf::from(value("--examples")),
            "--keep" => o.keep = true,
            "-h" | "--help" => usage("help asked for"),
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    if o.tickets < 10 || o.workers == 0 {
        usage("--tickets must be at least 10 and --workers at least 1");
    }
    o
}

/// A TCP proxy in front of PostgreSQL that can be cut: every connection dropped and
/// new ones refused until it is restored (the workers' view of a database outage).
struct Proxy {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    links: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: &'static str) -> Result<Proxy, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("proxy: {e}"))?;
        let port = listener.local_addr().map_err(|e| format!("proxy: {e}"))?.port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let links = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (is_cut, held) = (cut.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if is_cut.load(std::sync::atomic::Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                if let Ok(mut held) = held.lock() {
                    held.retain(|l: &tokio::task::JoinHandle<()>| !l.is_finished());
                    held.push(link);
                }
            }
        });
        Ok(Proxy { port, cut, links })
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
        if cut {
            if let Ok(mut held) = self.links.lock() {
                for link in held.drain(..) {
                    link.abort();
                }
            }
        }
    }
}

/// The queues, database and environment of one run.
struct Run {
    tag: String,
    db_url: String,
    /// The database URL the workers use (through the proxy in `db-cut`).
    worker_db_url: String,
    env: Vec<(String, String)>,
    ticketflow: PathBuf,
    logs: PathBuf,
}

impl Run {
    fn queue(&self, what: &str) -> String {
        format!("{}-{what}", self.tag)
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ticketflow);
        cmd.args(args).env_clear();
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd
    }

    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<(), String> {
        let mut child = self
            .command(args)
            .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.ticketflow.display()))?;
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            std::io::Write::write_all(&mut pipe, text.as_bytes()).map_err(|e| format!("ticketflow {args:?}: {e}"))?;
        }
        let out = child.wait_with_output().map_err(|e| format!("ticketflow {args:?}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("ticketflow {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }

    /// Starts worker number `n`; its standard error goes to a log file of its own.
    fn worker(&self, n: usize, generation: usize) -> Result<Child, String> {
        let log = std::fs::File::create(self.logs.join(format!("worker-{n}-{generation}.log")))
            .map_err(|e| format!("cannot create a worker log in {}: {e}", self.logs.display()))?;
        self.command(&["worker"])
            .env("TICKETFLOW__DATABASE__URL", &self.worker_db_url)
            .env("TICKETFLOW_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))
    }
}

/// Tickets from the examples, `C-{i}` in conversations of up to four consecutive
/// tickets, and poison messages: not JSON, JSON without messages, bytes that are not
/// UTF-8 (2% of the input).
fn tickets(examples: &Path, n: usize, rng: &mut impl Rng) -> Result<(String, Vec<Vec<u8>>), String> {
    let text = std::fs::read_to_string(examples)
        .map_err(|e| format!("{}: {e} (run from the repository)", examples.display()))?;
    let base: Vec<Value> =
        text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect();
    if base.is_empty() {
        return Err(format!("{}: no tickets", examples.display()));
    }
    let mut valid = String::new();
    let mut conversation = 0;
    let mut left_in_conversation = 0;
    for i in 0..n {
        if left_in_conversation == 0 {
            conversation += 1;
            left_in_conversation = rng.gen_range(1..=4);
        }
        left_in_conversation -= 1;
        let mut t = base[rng.gen_range(0..base.len())].clone();
        t["ticket_id"] = format!("C-{i}").into();
        t["conversation_id"] = format!("CONV-{conversation}").into();
        valid.push_str(&t.to_string());
        valid.push('\n');
    }
    let poison = (0..n.div_ceil(50))
        .map(|i| match i % 3 {
            0 => format!("{{\"ticket_id\": \"P-{i}\", not json").into_bytes(),
            1 => format!("{{\"ticket_id\": \"P-{i}\"}}").into_bytes(),
            _ => [&[0xff, 0xfe][..], format!("P-{i}").as_bytes(), &[0x80]].concat(),
        })
        .collect();
    Ok((valid, poison))
}

async fn publish_raw(conn: &Connection, queue: &str, payloads: &[Vec<u8>]) -> Result<(), String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    ch.confirm_select(Default::default()).await.map_err(|e| e.to_string())?;
    for p in payloads {
        let props = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), p, props)
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(())
}

async fn take_all(conn: &Connection, queue: &str) -> Result<Vec<Vec<u8>>, String> {
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    while let Some(m) =
        ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.map_err(|e| format!("{queue}: {e}"))?
    {
        out.push(m.delivery.data);
    }
    let _ = ch.close(200, "done".into()).await;
    Ok(out)
}

async fn depth(conn: &Connection, queue: &str) -> u32 {
    let Ok(ch) = conn.create_channel().await else { return 0 };
    let options = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
    let n = ch.queue_declare(queue.into(), options, Default::default()).await.map(|q| q.message_count()).unwrap_or(0);
    let _ = ch.close(200, "done".into()).await;
    n
}

async fn sql(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// Figures and violations of one run.
#[derive(Default)]
struct Verdict {
    violations: Vec<String>,
    replies: usize,
    copies: usize,
    dead_letters: usize,
    lost: usize,
    duplicated: usize,
    double_paid: usize,
    order_violations: usize,
    /// Kinds of the dead letters of valid tickets.
    valid_dead: BTreeMap<String, usize>,
}

impl Verdict {
    fn fail(&mut self, what: String) {
        if self.violations.len() < 20 {
            self.violations.push(what);
        }
    }
}

async fn check(run: &Run, conn: &Connection, valid: usize, poison: usize, ordered: bool) -> Result<Verdict, String> {
    let mut v = Verdict::default();
    let parse = |bytes: &[u8], what: &str| -> Result<Value, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("an unreadable {what}: {e}"))
    };
    // Replies: one per ticket; copies identical; conversations in order.
    let mut first: HashMap<String, Value> = HashMap::new();
    let mut order: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for bytes in take_all(conn, &run.queue("replies")).await? {
        let reply = parse(&bytes, "reply")?;
        let ticket = reply["ticket_id"].as_str().unwrap_or_default().to_owned();
        if let Some(earlier) = first.get(&ticket) {
            if *earlier != reply {
                v.duplicated += 1;
                v.fail(format!("{ticket} answered twice with different replies"));
            }
            v.copies += 1;
            continue;
        }
        if let Some(index) = ticket.strip_prefix("C-").and_then(|i| i.parse::<usize>().ok()) {
            order.entry(reply["conversation_id"].as_str().unwrap_or_default().to_owned()).or_default().push(index);
        } else {
            v.fail(format!("a reply to `{ticket}`, which was never sent"));
        }
        first.insert(ticket, reply);
    }
    v.replies = first.len();
    for (conversation, indexes) in &order {
        if indexes.windows(2).any(|w| w[0] > w[1]) {
            v.order_violations += 1;
            if ordered {
                v.fail(format!("{conversation} answered out of order: {indexes:?}"));
            }
        }
    }
    // Dead letters: the poison, once each, and valid tickets that no reply answered.
    // A message that never became a ticket has no unit in the ledger: redelivered
    // after a kill (its dead letter published, its ack lost), it is dead-lettered
    // again, a copy with the same payload.
    let mut dead: HashMap<String, Value> = HashMap::new();
    let mut valid_dead: HashSet<String> = HashSet::new();
    for bytes in take_all(conn, &run.queue("dlq")).await? {
        let letter = parse(&bytes, "dead letter")?;
        if let Some(ticket) = letter["ticket_id"].as_str().filter(|t| t.starts_with("C-")) {
            if first.contains_key(ticket) {
                v.duplicated += 1;
                v.fail(format!("{ticket} both answered and dead-lettered"));
            }
            if valid_dead.insert(ticket.to_owned()) {
                let kind = letter["error"]["kind"].as_str().unwrap_or("?").to_owned();
                *v.valid_dead.entry(kind).or_default() += 1;
            }
        }
        if dead.insert(letter["payload"].to_string(), letter).is_some() {
            v.copies += 1;
        }
    }
    v.dead_letters = dead.len();
    let poison_dead = dead.len() - valid_dead.len().min(dead.len());
    if poison_dead != poison {
        v.fail(format!("{poison} poison messages sent, {poison_dead} distinct ones dead-lettered"));
    }
    for i in 0..valid {
        let ticket = format!("C-{i}");
        if !first.contains_key(&ticket) && !valid_dead.contains(&ticket) {
            v.lost += 1;
            v.fail(format!("{ticket} ended as neither a reply nor a dead letter"));
        }
    }
    // Paid calls: each published once (copies identical), each recorded once, and the
    // money adds up everywhere.
    let mut calls: HashMap<String, f64> = HashMap::new();
    for bytes in take_all(conn, &run.queue("costs")).await? {
        let cost = parse(&bytes, "cost record")?;
        let amount = cost["cost_usd"].as_f64().unwrap_or(f64::NAN);
        if let Some(earlier) = calls.insert(cost["call_id"].as_str().unwrap_or_default().to_owned(), amount) {
            if earlier != amount {
                v.double_paid += 1;
                v.fail(format!("call {} published with two prices", cost["call_id"]));
            }
        }
    }
    let db = sql(&run.db_url).await?;
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM cost_records), (SELECT coalesce(sum(cost_usd), 0) FROM cost_records), \
             (SELECT count(*) FROM (SELECT unit_id, stage, provider, model, input_tokens, output_tokens, outcome, count(*) \
              FROM cost_records GROUP BY 1, 2, 3, 4, 5, 6, 7 HAVING count(*) > 1 AND bool_and(outcome = 'ok')) d)",
            &[],
        )
        .await
        .map_err(|e| format!("reading the ledger: {e}"))?;
    let (recorded, spend, repeated): (i64, f64, i64) = (row.get(0), row.get(1), row.get(2));
    if recorded as usize != calls.len() {
        v.double_paid += (recorded as usize).abs_diff(calls.len());
        v.fail(format!("{recorded} paid calls in the ledger, {} published", calls.len()));
    }
    if repeated > 0 {
        v.double_paid += repeated as usize;
        v.fail(format!("{repeated} answering calls of one unit and stage made twice alike"));
    }
    let published: f64 = calls.values().sum();
    let replied: f64 = first.values().chain(dead.values()).map(|r| r["cost_usd"].as_f64().unwrap_or(0.0)).sum();
    if (spend - published).abs() > 1e-9 || (spend - replied).abs() > 1e-6 {
        v.fail(format!("costs do not add up: ledger ${spend:.6}, cost records ${published:.6}, outputs ${replied:.6}"));
    }
    // No secret anywhere.
    let mut leaked = Vec::new();
    for entry in std::fs::read_dir(&run.logs).map_err(|e| e.to_string())?.flatten() {
        if std::fs::read_to_string(entry.path()).is_ok_and(|t| t.contains(PLANTED_KEY)) {
            leaked.push(entry.path().display().to_string());
        }
    }
    if first.values().chain(dead.values()).any(|o| o.to_string().contains(PLANTED_KEY)) {
        leaked.push("an output".into());
    }
    if !leaked.is_empty() {
        v.fail(format!("the API key appears in {}", leaked.join(", ")));
    }
    Ok(v)
}

fn terminate(child: &mut Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
}

async fn chaos(o: &Options) -> Result<Verdict, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let tag = format!("tf-chaos-{}-{}", o.seed, std::process::id());
    let ticketflow = std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("ticketflow");
    if !ticketflow.is_file() {
        return Err(format!("{} not found: build it first (cargo build --release)", ticketflow.display()));
    }
    let logs = std::env::temp_dir().join(&tag);
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let (base, mock, proxy) = services()?;
    let db_name = tag.replace('-', "_");
    let db_url = format!("{POSTGRES}/{db_name}");
    let mut env: Vec<(String, String)> = vec![
        ("TICKETFLOW__BROKER__KIND".into(), "rabbitmq".into()),
        ("TICKETFLOW__BROKER__RABBITMQ__URL".into(), AMQP.into()),
        ("TICKETFLOW__BROKER__TOPICS__INPUT".into(), format!("{tag}-in")),
        ("TICKETFLOW__BROKER__TOPICS__REPLIES".into(), format!("{tag}-replies")),
        ("TICKETFLOW__BROKER__TOPICS__COSTS".into(), format!("{tag}-costs")),
        ("TICKETFLOW__BROKER__TOPICS__DEAD_LETTERS".into(), format!("{tag}-dlq")),
        ("TICKETFLOW__BROKER__RABBITMQ__DEAD_LETTER_EXCHANGE".into(), format!("{tag}-dlx")),
        ("TICKETFLOW__DATABASE__URL".into(), db_url.clone()),
        ("TICKETFLOW__HTTP__LISTEN".into(), String::new()),
        // A killed worker's claims wait for their lease to expire before another
        // worker takes them over: short leases keep a run short (the deadline stays
        // within the lease, as the configuration check wants).
        ("TICKETFLOW__DATABASE__LEASE_MS".into(), o.lease_ms.to_string()),
        ("TICKETFLOW__LIMITS__TICKET_DEADLINE_MS".into(), (o.lease_ms * 3 / 5).to_string()),
        // With leases this short a ticket may wait on our limiters for a second or
        // so, less than a restarted replica waits for its first share of the account
        // (two heartbeats): the limits are far above the load here, so each worker
        // keeps them whole. Shared limits have their own tests and benchmark.
        ("TICKETFLOW__LIMITS__ACCOUNT_HEARTBEAT_MS".into(), "0".into()),
        (KEY_ENV.into(), PLANTED_KEY.into()),
    ];
    for (name, kind) in [
        ("qwen", "dashscope"),
        ("openai", "openai"),
        ("anthropic", "anthropic"),
        ("mistral", "openai"),
        ("deepseek", "openai"),
    ] {
        let upper = name.to_uppercase();
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__KIND"), kind.into()));
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__BASE_URL"), format!("{base}/{name}/v1")));
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__API_KEY_ENV"), KEY_ENV.into()));
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__REQUESTS_PER_MINUTE"), "600000".into()));
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__TOKENS_PER_MINUTE"), "1000000000".into()));
    }
    let worker_db_url = match o.scenario {
        Scenario::DbCut => format!("postgres://postgres@127.0.0.1:{}/{db_name}", proxy.port),
        _ => db_url.clone(),
    };
    let run = Run { tag, db_url, worker_db_url, env, ticketflow, logs };
    let conn = Connection::connect(AMQP, ConnectionProperties::default())
        .await
        .map_err(|e| format!("RabbitMQ at 127.0.0.1:5672: {e}"))?;
    let result = drive(o, &run, &conn, &proxy, &mut rng).await;
    drop(mock);
    if !o.keep {
        if let Ok(ch) = conn.create_channel().await {
            for q in ["in", "replies", "costs", "dlq"] {
                let _ = ch.queue_delete(run.queue(q).as_str().into(), QueueDeleteOptions::default()).await;
            }
            let _ = ch.exchange_delete(run.queue("dlx").as_str().into(), Default::default()).await;
        }
        if let Ok(admin) = sql(&format!("{POSTGRES}/postgres")).await {
            let _ = admin.execute(&format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"), &[]).await;
        }
        let _ = std::fs::remove_dir_all(&run.logs);
    } else {
        eprintln!("kept: queues {}-*, database {db_name}, worker logs in {}", run.tag, run.logs.display());
    }
    result
}

/// The mock provider and the database proxy, on a runtime of their own: the runner's
/// waits on its child processes never slow their answers down.
fn services() -> Result<(String, ticketflow::mock_provider::MockServer, Proxy), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = tx.send(Err(format!("cannot start a runtime: {e}")));
                return;
            }
        };
        runtime.block_on(async move {
            let started = async {
                let (base, mock) = ticketflow::mock_provider::spawn(ticketflow::mock_provider::MockConfig::default())
                    .await
                    .map_err(|e| format!("cannot start the mock provider: {e}"))?;
                let proxy = Proxy::start("127.0.0.1:5432").await?;
                Ok::<_, String>((base, mock, proxy))
            };
            match started.await {
                Ok(services) => {
                    let _ = tx.send(Ok(services));
                    // Serve until the runner exits.
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    });
    rx.recv().map_err(|_| "the services thread stopped".to_string())?
}

async fn drive(
    o: &Options,
    run: &Run,
    conn: &Connection,
    proxy: &Proxy,
    rng: &mut rand::rngs::StdRng,
) -> Result<Verdict, String> {
    run.run(&["migrate"], None)?;
    run.run(&["topics"], None)?;
    let (valid, poison) = tickets(&o.examples, o.tickets, rng)?;
    run.run(&["produce", "-"], Some(&valid))?;
    publish_raw(conn, &run.queue("in"), &poison).await?;
    let started = Instant::now();
    let mut generation = 0;
    let mut workers: Vec<Child> = Vec::new();
    for n in 0..o.workers {
        workers.push(run.worker(n, generation)?);
    }
    // Faults on the seeded schedule, while there is work.
    let mut faults = 0;
    if o.scenario != Scenario::Calm {
        let until = started + Duration::from_secs(o.seconds);
        while Instant::now() < until {
            let jitter = rng.gen_range(0.5..1.5);
            tokio::time::sleep(Duration::from_secs_f64(o.every * jitter)).await;
            let n = rng.gen_range(0..workers.len());
            match o.scenario {
                Scenario::Kill => {
                    let _ = workers[n].kill();
                    let _ = workers[n].wait();
                }
                Scenario::Term => {
                    terminate(&mut workers[n]);
                    let _ = workers[n].wait();
                }
                Scenario::DbCut => {
                    // The database gone for one to four seconds, for every worker.
                    proxy.set_cut(true);
                    tokio::time::sleep(Duration::from_secs_f64(rng.gen_range(1.0..4.0))).await;
                    proxy.set_cut(false);
                    faults += 1;
                    continue;
                }
                Scenario::Calm => {}
            }
            generation += 1;
            workers[n] = run.worker(n, generation)?;
            faults += 1;
        }
    }
    // Settled: every valid ticket published in the ledger, and the input drained.
    let db = sql(&run.db_url).await?;
    let deadline = Instant::now() + Duration::from_secs(o.settle_timeout);
    let settled = loop {
        let done: i64 =
            db.query_one("SELECT count(*) FROM units WHERE published", &[]).await.map(|r| r.get(0)).unwrap_or(0);
        if done as usize >= o.tickets && depth(conn, &run.queue("in")).await == 0 {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wall = started.elapsed();
    let mut peak_rss_mb = 0u64;
    for w in &mut workers {
        if let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", w.id())) {
            let rss = status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
            peak_rss_mb = peak_rss_mb.max(rss.unwrap_or(0) / 1024);
        }
        terminate(w);
    }
    for w in &mut workers {
        let _ = w.wait();
    }
    // RabbitMQ keeps a conversation in order within one worker only (README,
    // "Choosing Kafka or RabbitMQ"): across replicas an inversion is counted, not failed.
    let mut verdict = check(run, conn, o.tickets, poison.len(), o.workers == 1).await?;
    // No scenario here makes a provider fail: a valid ticket has no reason to die.
    if !verdict.valid_dead.is_empty() {
        let kinds = format!("{:?}", verdict.valid_dead);
        verdict.fail(format!("valid tickets dead-lettered without a provider fault: {kinds}"));
    }
    if !settled {
        verdict.fail(format!("not settled within {} s", o.settle_timeout));
    }
    println!(
        "scenario {:?}, rabbitmq: {} tickets + {} poison, {} workers, {faults} faults; lost {}, duplicated {}, double-paid {}, order violations {}{}; {} replies, {} dead letters ({} identical copies; of valid tickets: {:?}); {:.1} s; worker peak RSS {} MB",
        o.scenario,
        o.tickets,
        poison.len(),
        o.workers,
        verdict.lost,
        verdict.duplicated,
        verdict.double_paid,
        verdict.order_violations,
        if o.workers > 1 { " (not promised across RabbitMQ workers)" } else { "" },
        verdict.replies,
        verdict.dead_letters,
        verdict.copies,
        verdict.valid_dead,
        wall.as_secs_f64(),
        peak_rss_mb
    );
    Ok(verdict)
}

#[tokio::main]
async fn main() {
    let options = parse();
    match chaos(&options).await {
        Ok(verdict) if verdict.violations.is_empty() => {}
        Ok(verdict) => {
            for v in &verdict.violations {
                eprintln!("violation: {v}");
            }
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2)
        }
    }
}
