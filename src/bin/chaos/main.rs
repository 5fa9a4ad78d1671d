//! `ticketflow-chaos`: runs `ticketflow worker` processes against a broker (RabbitMQ,
//! or librdkafka's mock Kafka cluster in this process), the PostgreSQL ledger and the
//! mock provider, injects faults on a seeded schedule, and checks the delivery
//! guarantees from what the outputs, the ledger and the provider hold (never from the
//! workers' own logs). Prints one line of figures; exits 1 on any violation, 2 when
//! it cannot run.
//!
//! ```text
//! ticketflow-chaos --broker kafka --scenario kill --tickets 2000 --workers 3 --seconds 60 --seed 7
//! ```
//!
//! Scenarios (faults every `--every` seconds, jittered, for `--seconds`):
//! - `calm`: no fault, the baseline;
//! - `kill`: a random worker SIGKILLed and started again;
//! - `term`: the same with SIGTERM, waiting for its drain;
//! - `storm`: workers joining (up to twice `--workers`) and SIGKILLed (down to one)
//!   at random: rebalances on Kafka;
//! - `db-cut`: every worker's PostgreSQL connections cut through a proxy for 1-4 s;
//! - `db-restart`: a PostgreSQL server of the run's own stopped (fast shutdown) and
//!   started again after 0.5-3 s;
//! - `broker-restart`: the broker down for 1-4 s (a RabbitMQ node of the run's own:
//!   `stop_app`/`start_app`; Kafka: the mock broker down/up);
//! - `outage`: every provider unavailable for 2-5 s (tickets caught in it dead-letter
//!   as `providers_exhausted`), then `ticketflow replay` until each is answered;
//! - `flaky`: every provider answers 5% of calls 503 and 5% 429 at random, and has a
//!   requests-per-minute limit the workers share (the account limits);
//! - `soak`: one worker, no fault, the worker's memory sampled every second: it must
//!   not grow after warm-up.
//!
//! `--latency-ms MS` makes every provider answer after 0 to 2×MS ms (none by
//! default), so that more tickets are in flight at any moment.
//!
//! `--rpm N` gives every provider a limit of N requests per minute (the mock enforces
//! it, the workers divide it), low enough to bind under the run's load: the
//! 60-second-window invariant then has something to catch.
//!
//! The input: tickets from the examples in conversations, 1% of them sent twice in a
//! row (a helpdesk retrying its webhook), and 2% poison messages.
//!
//! Invariants: every valid ticket ends as exactly one reply (copies of a reply must be
//! identical: a confirm lost to a fault) or one dead letter, every poison message as
//! one dead letter, and a replayed ticket as a reply; conversations answered in order
//! (Kafka, and RabbitMQ's input shards, the default, whatever the workers; with a
//! single RabbitMQ input queue (`shards = 0`) inversions across workers are counted,
//! not promised); every paid call published once and recorded once, and the
//! provider's own count of paid calls per ticket and stage equal to the cost records
//! (a SIGKILL may cost a call in flight, counted as paid-unrecorded and bounded);
//! Kafka's committed offsets never past a message without an output; no 60-second
//! window over a provider's limit; the costs of the replies, the cost records and the
//! ledger equal; the planted API key in no output and no worker log.

mod check;
mod kafka;
mod rabbit;
mod services;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde_json::Value;
use ticketflow::mock_provider::MockConfig;

use check::{Promises, Verdict};
use kafka::Kafka;
use rabbit::Rabbit;
use services::{sql, OwnPostgres, Proxy};

const POSTGRES_HOST: &str = "127.0.0.1:5432";
const KEY_ENV: &str = "TF_CHAOS_KEY";
pub const PLANTED_KEY: &str = "sk-chaos-planted-4b1d9e";
const PROVIDERS: [(&str, &str); 5] = [
    ("qwen", "dashscope"),
    ("openai", "openai"),
    ("anthropic", "anthropic"),
    ("mistral", "openai"),
    ("deepseek", "openai"),
];
/// The requests-per-minute limit of every provider in `flaky` (the mock enforces it
/// too); far above the load elsewhere.
const FLAKY_RPM: u32 = 60_000;
const OPEN_RPM: u32 = 600_000;
/// `breaker.cooldown_ms` of the workers (30 s shipped).
const COOLDOWN_MS: u64 = 2000;

const SCENARIOS: [(&str, Scenario); 10] = [
    ("calm", Scenario::Calm),
    ("kill", Scenario::Kill),
    ("term", Scenario::Term),
    ("storm", Scenario::Storm),
    ("db-cut", Scenario::DbCut),
    ("db-restart", Scenario::DbRestart),
    ("broker-restart", Scenario::BrokerRestart),
    ("outage", Scenario::Outage),
    ("flaky", Scenario::Flaky),
    ("soak", Scenario::Soak),
];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Scenario {
    Calm,
    Kill,
    Term,
    Storm,
    DbCut,
    DbRestart,
    BrokerRestart,
    Outage,
    Flaky,
    Soak,
}

impl Scenario {
    fn name(self) -> &'static str {
        SCENARIOS.iter().find(|(_, s)| *s == self).map_or("?", |(n, _)| n)
    }

    /// The scenario's requests-per-minute limit of every provider (`--rpm` overrides it).
    fn requests_per_minute(self) -> u32 {
        if self == Scenario::Flaky {
            FLAKY_RPM
        } else {
            OPEN_RPM
        }
    }

    /// Whether workers die without their drain, so a call in flight may be paid and
    /// never recorded.
    fn kills(self) -> bool {
        matches!(self, Scenario::Kill | Scenario::Storm)
    }
}

#[derive(Debug, Clone)]
struct Options {
    scenario: Scenario,
    kafka: bool,
    tickets: usize,
    workers: usize,
    seconds: u64,
    every: f64,
    seed: u64,
    settle_timeout: u64,
    lease_ms: u64,
    /// Every provider's requests-per-minute limit instead of the scenario's.
    rpm: Option<u32>,
    /// Every provider's mean latency (ms), uniform between none and twice it.
    latency_ms: u64,
    keep: bool,
    examples: PathBuf,
}

impl Options {
    /// Every provider's requests-per-minute limit, the mock's and the workers'.
    fn requests_per_minute(&self) -> u32 {
        self.rpm.unwrap_or_else(|| self.scenario.requests_per_minute())
    }

    /// Whether the limit may bind, so that the workers must divide it (the account
    /// limits); elsewhere each worker keeps the whole of a limit far above the load.
    fn shares_limits(&self) -> bool {
        self.rpm.is_some() || self.scenario == Scenario::Flaky
    }
}

fn usage(problem: &str) -> ! {
    eprintln!("error: {problem}");
    let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
    eprintln!(
        "usage: ticketflow-chaos --scenario {} [--broker rabbitmq|kafka] [--tickets N] [--workers N] [--seconds S] [--every S] [--seed N] [--settle-timeout S] [--lease-ms MS] [--rpm N] [--latency-ms MS] [--examples FILE] [--keep]",
        names.join("|")
    );
    std::process::exit(2)
}

fn parse() -> Options {
    let mut o = Options {
        scenario: Scenario::Kill,
        kafka: false,
        tickets: 2000,
        workers: 3,
        seconds: 60,
        every: 3.0,
        seed: 1,
        settle_timeout: 300,
        lease_ms: 10_000,
        rpm: None,
        latency_ms: 0,
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
                let v = value("--scenario");
                o.scenario = SCENARIOS.iter().find(|(n, _)| *n == v).map(|(_, s)| *s).unwrap_or_else(|| {
                    let names: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
                    usage(&format!("--scenario: `{v}` is none of {}", names.join(", ")))
                })
            }
            "--broker" => {
                o.kafka = match value("--broker").as_str() {
                    "kafka" => true,
                    "rabbitmq" => false,
                    other => usage(&format!("--broker: `{other}` is neither rabbitmq nor kafka")),
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
            "--rpm" => {
                let v = value("--rpm");
                o.rpm = Some(v.parse().ok().filter(|n: &u32| *n > 0).unwrap_or_else(|| {
                    usage(&format!("--rpm: `{v}` is not a whole number of requests per minute above 0"))
                }))
            }
            "--latency-ms" => o.latency_ms = number("--latency-ms", value("--latency-ms")),
            "--examples" => o.examples = PathBuf::from(value("--examples")),
            "--keep" => o.keep = true,
            "-h" | "--help" => usage("help asked for"),
            other => usage(&format!("unknown argument `{other}`")),
        }
    }
    if o.tickets < 10 || o.workers == 0 {
        usage("--tickets must be at least 10 and --workers at least 1");
    }
    if o.scenario == Scenario::Soak {
        o.workers = 1;
    }
    o
}

/// What the output topics or queues hold: replies partition by partition (one for
/// RabbitMQ), dead letters and cost records.
pub struct Outputs {
    pub replies: Vec<Vec<Vec<u8>>>,
    pub dead: Vec<Vec<u8>>,
    pub costs: Vec<Vec<u8>>,
}

enum Broker {
    Rabbit(Rabbit),
    Kafka(Box<Kafka>),
}

impl Broker {
    fn name(&self) -> &'static str {
        match self {
            Broker::Rabbit(_) => "rabbitmq",
            Broker::Kafka(_) => "kafka",
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        match self {
            Broker::Rabbit(r) => r.env(),
            Broker::Kafka(k) => k.env(),
        }
    }

    async fn publish(&self, payloads: &[Vec<u8>]) -> Result<(), String> {
        match self {
            Broker::Rabbit(r) => r.publish(payloads).await,
            Broker::Kafka(k) => k.publish(payloads),
        }
    }

    /// Whether the input is consumed to its end (Kafka: committed there), checking
    /// Kafka's commits on the way.
    async fn drained(&mut self) -> Result<bool, String> {
        match self {
            Broker::Rabbit(r) => Ok(r.drained().await),
            Broker::Kafka(k) => k.check_commits(),
        }
    }

    async fn restart(&self, down: Duration) -> Result<(), String> {
        match self {
            Broker::Rabbit(r) => r.restart(down).await,
            Broker::Kafka(k) => k.restart(down).await,
        }
    }

    async fn outputs(&mut self) -> Result<Outputs, String> {
        match self {
            Broker::Rabbit(r) => r.outputs().await,
            Broker::Kafka(k) => k.outputs(),
        }
    }
}

/// The database, environment and logs of one run.
struct Run {
    tag: String,
    /// The database as the runner reaches it.
    db_url: String,
    /// The database URL the workers use (through the proxy in `db-cut`).
    worker_db_url: String,
    env: Vec<(String, String)>,
    ticketflow: PathBuf,
    logs: PathBuf,
}

impl Run {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.ticketflow);
        cmd.args(args).env_clear();
        for key in ["PATH", "HOME"] {
            if let Ok(v) = std::env::var(key) {
                cmd.env(key, v);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        // The operator's own settings last, so they win: `TICKETFLOW_LOG=debug`, or a
        // librdkafka property (`TICKETFLOW__BROKER__KAFKA__PROPERTIES__DEBUG=fetch`).
        cmd.envs(std::env::vars().filter(|(k, _)| k.starts_with("TICKETFLOW_")));
        cmd
    }

    /// Runs a ticketflow command to its end; its standard error when it fails.
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
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
        let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if out.status.success() {
            Ok(said)
        } else {
            Err(format!("ticketflow {}: {said}", args.join(" ")))
        }
    }

    /// Starts worker number `n`; its standard error goes to a log file of its own.
    fn worker(&self, n: usize) -> Result<Child, String> {
        let log = std::fs::File::create(self.logs.join(format!("worker-{n}.log")))
            .map_err(|e| format!("cannot create a worker log in {}: {e}", self.logs.display()))?;
        let child = self
            .command(&["worker"])
            .env("TICKETFLOW__DATABASE__URL", &self.worker_db_url)
            .env("TICKETFLOW_LOG", std::env::var("TICKETFLOW_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start a worker: {e}"))?;
        if let Ok(mut started) = STARTED.lock() {
            started.push(child.id());
        }
        Ok(child)
    }
}

/// Every worker started, so that an interrupted run (Ctrl-C, `timeout`) stops them.
static STARTED: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Commands that stop what a run started besides its workers (a RabbitMQ node, a
/// PostgreSQL server of its own), run if the run is interrupted.
static ON_INTERRUPT: std::sync::Mutex<Vec<Vec<String>>> = std::sync::Mutex::new(Vec::new());

pub fn on_interrupt(argv: Vec<String>) {
    if let Ok(mut commands) = ON_INTERRUPT.lock() {
        commands.push(argv);
    }
}

/// SIGKILLs every worker still running (the ones that exited are skipped: their
/// zombie entries are gone once waited for, and a live pid is checked by name).
fn kill_started() {
    let Ok(started) = STARTED.lock() else { return };
    for pid in started.iter() {
        let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.contains("worker"));
        if alive {
            let _ = Command::new("kill").arg("-KILL").arg(pid.to_string()).status();
        }
    }
    if let Ok(commands) = ON_INTERRUPT.lock() {
        for argv in commands.iter() {
            if let Some((program, args)) = argv.split_first() {
                let _ = Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
            }
        }
    }
}

/// The input of a run.
struct Input {
    /// Tickets, a JSON object a line.
    valid: String,
    /// How many tickets are sent twice.
    resent: usize,
    poison: Vec<Vec<u8>>,
}

/// Tickets from the examples, `C-{i}` in conversations of up to four consecutive
/// tickets, every message tagged `ref:C-{i}` (the mock provider counts paid calls per
/// tag), 1% of them sent twice in a row as a helpdesk retrying its webhook would (the
/// ledger answers the second from its record); and poison messages: not JSON, JSON
/// without messages, bytes that are not UTF-8 (2% of the input), each unique.
fn tickets(examples: &Path, n: usize, rng: &mut impl Rng) -> Result<Input, String> {
    let text = std::fs::read_to_string(examples)
        .map_err(|e| format!("{}: {e} (run from the repository)", examples.display()))?;
    let base: Vec<Value> =
        text.lines().filter(|l| !l.trim().is_empty()).filter_map(|l| serde_json::from_str(l).ok()).collect();
    if base.is_empty() {
        return Err(format!("{}: no tickets", examples.display()));
    }
    let mut valid = String::new();
    let mut resent = 0;
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
        if let Some(messages) = t["messages"].as_array_mut() {
            for m in messages {
                let said = m["text"].as_str().unwrap_or_default();
                m["text"] = format!("ref:C-{i} {said}").into();
            }
        }
        let line = format!("{t}\n");
        valid.push_str(&line);
        if rng.gen_ratio(1, 100) {
            valid.push_str(&line);
            resent += 1;
        }
    }
    let poison = (0..n.div_ceil(50))
        .map(|i| match i % 3 {
            0 => format!("{{\"ticket_id\": \"P-{i}\", not json").into_bytes(),
            1 => format!("{{\"ticket_id\": \"P-{i}\"}}").into_bytes(),
            _ => [&[0xff, 0xfe][..], format!("P-{i}").as_bytes(), &[0x80]].concat(),
        })
        .collect();
    Ok(Input { valid, resent, poison })
}

/// A progress line on standard error with `TF_CHAOS_VERBOSE=1`.
fn note(what: &str) {
    static START: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);
    if std::env::var_os("TF_CHAOS_VERBOSE").is_some() {
        eprintln!("[{:7.1} s] {what}", START.elapsed().as_secs_f64());
    }
}

fn terminate(child: &Child) {
    let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
}

/// A process's resident memory now and at its peak, in KiB.
fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

async fn chaos(o: &Options) -> Result<Verdict, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed);
    let tag = format!("tf-chaos-{}-{}", o.seed, std::process::id());
    let ticketflow = std::env::current_exe().map_err(|e| e.to_string())?.with_file_name("ticketflow");
    if !ticketflow.is_file() {
        return Err(format!("{} not found: build it first (cargo build --release)", ticketflow.display()));
    }
    let dir = std::env::temp_dir().join(&tag);
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let result = async {
        let pg = match o.scenario {
            Scenario::DbRestart => Some(OwnPostgres::start(&dir)?),
            _ => None,
        };
        let postgres_host = pg.as_ref().map_or(POSTGRES_HOST.to_owned(), |pg| format!("127.0.0.1:{}", pg.port));
        let rpm = o.requests_per_minute();
        let mut mock_config = MockConfig { tag_prefix: Some("ref:".into()), ..MockConfig::default() };
        for p in mock_config.providers.values_mut() {
            p.requests_per_minute = rpm;
            (p.latency_ms, p.jitter_ms) = (o.latency_ms, o.latency_ms);
            if o.scenario == Scenario::Flaky {
                p.error_rate = 0.05;
                p.throttle_rate = 0.05;
            }
        }
        let (base, mock, proxy) = services::start(mock_config, postgres_host.clone())?;
        let mut broker = if o.kafka {
            Broker::Kafka(Box::new(Kafka::start(&tag, o.tickets)?))
        } else {
            Broker::Rabbit(Rabbit::start(&tag, o.scenario == Scenario::BrokerRestart, &dir).await?)
        };
        let db_name = tag.replace('-', "_");
        let db_url = format!("postgres://postgres@{postgres_host}/{db_name}");
        let worker_db_url = match o.scenario {
            Scenario::DbCut => format!("postgres://postgres@127.0.0.1:{}/{db_name}", proxy.port),
            _ => db_url.clone(),
        };
        let mut env = broker.env();
        env.extend(worker_env(o, &db_url, &base, rpm));
        let run = Run { tag, db_url, worker_db_url, env, ticketflow, logs };
        let result = drive(o, &run, &mut broker, &mock, &proxy, pg.as_ref(), &mut rng).await;
        if !o.keep {
            if let Broker::Rabbit(r) = &broker {
                r.cleanup().await;
            }
            if pg.is_none() {
                if let Ok(admin) = sql(&format!("postgres://postgres@{POSTGRES_HOST}/postgres")).await {
                    let _ = admin.execute(&format!("DROP DATABASE IF EXISTS \"{db_name}\" WITH (FORCE)"), &[]).await;
                }
            }
        } else {
            eprintln!("kept: queues or topics {}-*, database {db_name}, logs in {}", run.tag, dir.display());
        }
        result
    }
    .await;
    if !o.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// The workers' settings besides the broker's.
fn worker_env(o: &Options, db_url: &str, base: &str, rpm: u32) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = vec![
        ("TICKETFLOW__DATABASE__URL".into(), db_url.into()),
        ("TICKETFLOW__HTTP__LISTEN".into(), String::new()),
        // A killed worker's claims are taken over once their lease runs out (the
        // shipped 10 s unless --lease-ms says otherwise; live workers renew theirs).
        // A 2 s deadline keeps outages short; a ticket may still wait on our own
        // limiters for limits.limiter_wait_ms beyond it (15 s shipped).
        ("TICKETFLOW__DATABASE__LEASE_MS".into(), o.lease_ms.to_string()),
        ("TICKETFLOW__LIMITS__TICKET_DEADLINE_MS".into(), "2000".into()),
        // An open circuit lets a probe through after 2 s (30 s shipped), so that a
        // replay after an outage does not meet circuits still open.
        ("TICKETFLOW__BREAKER__COOLDOWN_MS".into(), COOLDOWN_MS.to_string()),
        (KEY_ENV.into(), PLANTED_KEY.into()),
    ];
    if !o.shares_limits() {
        // The limits are far above the load here, so each worker keeps them whole
        // (no account heartbeats to wait for after a restart). `flaky` and `--rpm`
        // share binding limits.
        env.push(("TICKETFLOW__LIMITS__ACCOUNT_HEARTBEAT_MS".into(), "0".into()));
    }
    for (name, kind) in PROVIDERS {
        let upper = name.to_uppercase();
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__KIND"), kind.into()));
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__BASE_URL"), format!("{base}/{name}/v1")));
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__API_KEY_ENV"), KEY_ENV.into()));
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__REQUESTS_PER_MINUTE"), rpm.to_string()));
        env.push((format!("TICKETFLOW__PROVIDERS__{upper}__TOKENS_PER_MINUTE"), "1000000000".into()));
    }
    env
}

/// The input, published slice by slice on a schedule, without holding up the
/// faults: a slice's `ticketflow produce` runs while the runner goes on.
struct Feed {
    slices: Vec<(String, Vec<Vec<u8>>)>,
    next: usize,
    /// The slice being produced, and when its retries stop.
    producing: Option<(Child, Instant)>,
}

impl Feed {
    fn new(valid: &str, poison: &[Vec<u8>], slices: usize) -> Feed {
        let lines: Vec<&str> = valid.lines().collect();
        let per = lines.len().div_ceil(slices).max(1);
        let poison_per = poison.len().div_ceil(slices).max(1);
        let slices = (0..slices)
            .map(|i| {
                let text: String = lines.iter().skip(i * per).take(per).map(|l| format!("{l}\n")).collect();
                (text, poison.iter().skip(i * poison_per).take(poison_per).cloned().collect())
            })
            .collect();
        Feed { slices, next: 0, producing: None }
    }

    fn done(&self) -> bool {
        self.next >= self.slices.len()
    }

    /// Moves the feed on: the slice being produced finished (its poison then
    /// published) or, failed (the broker restarting), started again, for a minute at
    /// most (part of it may then be published twice, which the ledger must absorb);
    /// the next slice started once due (slice i at i/2 s). With `wait`, returns only
    /// once every slice is out.
    async fn step(&mut self, run: &Run, broker: &Broker, elapsed: Duration, wait: bool) -> Result<(), String> {
        loop {
            if let Some((child, give_up)) = &mut self.producing {
                match child.try_wait().map_err(|e| format!("produce: {e}"))? {
                    None if wait => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                    None => return Ok(()),
                    Some(status) => {
                        let give_up = *give_up;
                        let poison = &self.slices[self.next].1;
                        let sent =
                            if status.success() { broker.publish(poison).await } else { Err(status.to_string()) };
                        self.producing = None;
                        match sent {
                            Ok(()) => self.next += 1,
                            Err(e) if Instant::now() > give_up => return Err(format!("feeding the input: {e}")),
                            Err(_) => {
                                tokio::time::sleep(Duration::from_millis(300)).await;
                                self.producing = Some((self.produce(run)?, give_up));
                                continue;
                            }
                        }
                    }
                }
            }
            if self.done() || !wait && elapsed < Duration::from_millis(500 * self.next as u64) {
                return Ok(());
            }
            self.producing = Some((self.produce(run)?, Instant::now() + Duration::from_secs(60)));
        }
    }

    fn produce(&self, run: &Run) -> Result<Child, String> {
        let mut child = run
            .command(&["produce", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start ticketflow produce: {e}"))?;
        let text = self.slices[self.next].0.clone();
        if let Some(mut pipe) = child.stdin.take() {
            // A slice may exceed a pipe's buffer: written from a thread of its own.
            std::thread::spawn(move || std::io::Write::write_all(&mut pipe, text.as_bytes()));
        }
        Ok(child)
    }
}

/// Memory of the soak's worker, sampled every second with the tickets done.
#[derive(Default)]
struct Memory {
    /// (tickets done, RSS in KiB)
    samples: Vec<(i64, u64)>,
    peak_kib: u64,
}

impl Memory {
    fn sample(&mut self, workers: &[Child], done: i64) {
        let mut rss = 0;
        for w in workers {
            if let Some((now, peak)) = rss_kib(w.id()) {
                rss = rss.max(now);
                self.peak_kib = self.peak_kib.max(peak);
            }
        }
        if rss > 0 {
            self.samples.push((done, rss));
        }
    }

    /// The most RSS while the second quarter of the tickets was answered (after
    /// warm-up) and while the last quarter was, in MiB.
    fn growth(&self, total: usize) -> Option<(u64, u64)> {
        let max_in = |from: f64, to: f64| {
            self.samples
                .iter()
                .filter(|(done, _)| (*done as f64) >= from * total as f64 && (*done as f64) < to * total as f64)
                .map(|(_, rss)| rss / 1024)
                .max()
        };
        Some((max_in(0.25, 0.5)?, max_in(0.75, 1.01)?))
    }
}

async fn drive(
    o: &Options,
    run: &Run,
    broker: &mut Broker,
    mock: &ticketflow::mock_provider::MockServer,
    proxy: &Proxy,
    pg: Option<&OwnPostgres>,
    rng: &mut rand::rngs::StdRng,
) -> Result<Verdict, String> {
    run.run(&["migrate"], None)?;
    note("migrating");
    if !o.kafka {
        run.run(&["topics"], None)?;
    }
    let Input { valid, resent, poison } = tickets(&o.examples, o.tickets, rng)?;
    // The input arrives while the faults happen: in slices every half second over
    // the first 80% of the fault window (all before the workers start for `calm` and
    // `soak`, still in slices of a thousand, so that the poison is spread through it
    // rather than in one burst at the end).
    let paced = !matches!(o.scenario, Scenario::Calm | Scenario::Soak);
    let slices = if paced { ((o.seconds as f64 * 0.8 / 0.5) as usize).max(1) } else { o.tickets.div_ceil(1000).max(1) };
    let mut feed = Feed::new(&valid, &poison, slices);
    if !paced {
        feed.step(run, broker, Duration::ZERO, true).await?;
    }
    note("starting workers");
    let started = Instant::now();
    let mut spawned = 0;
    let mut workers: Vec<Child> = Vec::new();
    for _ in 0..o.workers {
        workers.push(run.worker(spawned)?);
        spawned += 1;
    }
    let mut db = Ledger { url: run.db_url.clone(), client: None };
    let mut memory = Memory::default();
    // Faults on the seeded schedule, while there is work.
    let mut faults = 0;
    let mut kills = 0;
    let mut outage_over = Instant::now();
    let scheduled = !matches!(o.scenario, Scenario::Calm | Scenario::Flaky | Scenario::Soak);
    let until = started + Duration::from_secs(o.seconds);
    let mut next_fault = started + Duration::from_secs_f64(o.every * rng.gen_range(0.5..1.5));
    let mut next_check = Instant::now();
    while !feed.done() || scheduled && Instant::now() < until {
        feed.step(run, broker, started.elapsed(), false).await?;
        if o.kafka && Instant::now() >= next_check {
            broker.drained().await?; // checks the commits
            next_check = Instant::now() + Duration::from_millis(500);
        }
        if !scheduled || Instant::now() < next_fault || Instant::now() >= until {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        next_fault = Instant::now() + Duration::from_secs_f64(o.every * rng.gen_range(0.5..1.5));
        let n = rng.gen_range(0..workers.len());
        match o.scenario {
            Scenario::Kill => {
                let _ = workers[n].kill();
                let _ = workers[n].wait();
                kills += 1;
                workers[n] = run.worker(spawned)?;
                spawned += 1;
            }
            Scenario::Term => {
                terminate(&workers[n]);
                let _ = workers[n].wait();
                workers[n] = run.worker(spawned)?;
                spawned += 1;
            }
            Scenario::Storm => {
                if workers.len() < 2 * o.workers && (workers.len() == 1 || rng.gen_bool(0.5)) {
                    workers.push(run.worker(spawned)?);
                    spawned += 1;
                } else {
                    let mut dead = workers.swap_remove(n);
                    let _ = dead.kill();
                    let _ = dead.wait();
                    kills += 1;
                }
            }
            Scenario::DbCut => {
                proxy.set_cut(true);
                tokio::time::sleep(Duration::from_secs_f64(rng.gen_range(1.0..4.0))).await;
                proxy.set_cut(false);
            }
            Scenario::DbRestart => {
                let pg = pg.ok_or("db-restart without a server of its own")?;
                pg.stop()?;
                tokio::time::sleep(Duration::from_secs_f64(rng.gen_range(0.5..3.0))).await;
                pg.start_again()?;
            }
            Scenario::BrokerRestart => {
                broker.restart(Duration::from_secs_f64(rng.gen_range(1.0..4.0))).await?;
            }
            Scenario::Outage => {
                let seconds = rng.gen_range(1.0..3.0);
                for (name, _) in PROVIDERS {
                    mock.start_outage(name, seconds);
                }
                outage_over = Instant::now() + Duration::from_secs_f64(seconds);
            }
            Scenario::Calm | Scenario::Flaky | Scenario::Soak => {}
        }
        faults += 1;
        note(&format!("fault {faults}"));
        if o.kafka {
            broker.drained().await?; // checks the commits
        }
    }
    note("faults done; settling");
    // Settled: every valid ticket published (after replays: answered), the input
    // consumed to its end.
    let mut settled = settle(o, broker, &mut db, &workers, &mut memory, false).await?;
    let mut replays = 0;
    if matches!(o.scenario, Scenario::Outage | Scenario::Flaky) {
        // Every dead letter of a valid ticket replayed until answered (at most
        // limits.max_replays times, 3).
        while settled && replays < 3 && db.count("SELECT count(*) FROM units WHERE status = 'dead_letter'").await? > 0 {
            // As an operator would: once the provider is back and the circuits the
            // outage opened let a probe through (breaker.cooldown_ms), or the first
            // replayed tickets die again at an open circuit.
            tokio::time::sleep_until(
                (outage_over.max(Instant::now()) + Duration::from_millis(COOLDOWN_MS + 500)).into(),
            )
            .await;
            run.run(&["replay", "--kind", "providers_exhausted"], None)?;
            replays += 1;
            settled = settle(o, broker, &mut db, &workers, &mut memory, true).await?;
        }
    }
    let wall = started.elapsed();
    note("settled; stopping workers");
    memory.sample(&workers, o.tickets as i64);
    let mut hung = 0;
    for w in &workers {
        terminate(w);
    }
    for w in &mut workers {
        let deadline = Instant::now() + Duration::from_secs(60);
        while w.try_wait().ok().flatten().is_none() {
            if Instant::now() > deadline {
                hung += 1;
                let _ = w.kill();
                let _ = w.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Kafka keeps a conversation in one partition, and RabbitMQ in one input shard
    // (single active consumer); the single RabbitMQ queue (`shards = 0`) only within
    // one worker.
    let sharded = matches!(&broker, Broker::Rabbit(r) if r.sharded());
    let ordered = o.kafka || sharded || o.workers == 1 && o.scenario != Scenario::Storm;
    let outputs = broker.outputs().await?;
    note("reading outputs");
    let promises = Promises {
        valid: o.tickets,
        poison: poison.len(),
        ordered,
        replayed: matches!(o.scenario, Scenario::Outage | Scenario::Flaky),
    };
    let client = sql(&run.db_url).await?;
    note("checking");
    let mut verdict = check::check(&outputs, &client, mock, &run.logs, &promises).await?;
    let mut commits = String::new();
    if let Broker::Kafka(k) = broker {
        if !k.check_commits()? {
            let mut waiting = Vec::new();
            for (p, offset, ticket) in k.uncommitted(8) {
                let state = match &ticket {
                    Some(t) => unit_state(&client, t).await,
                    None => "not a ticket".into(),
                };
                waiting.push(format!("partition {p} offset {offset}: {} {state}", ticket.as_deref().unwrap_or("-")));
            }
            verdict.fail(format!(
                "the group's commits are not at the end of the input: {}; past them: {}",
                k.last_seen,
                waiting.join("; ")
            ));
        }
        for v in std::mem::take(&mut k.commit_violations) {
            verdict.fail(v);
        }
        commits = format!(", commits checked {} times", k.commit_checks);
    }
    if hung > 0 {
        verdict.fail(format!("{hung} workers did not stop within 60 s of SIGTERM"));
    }
    if !settled {
        verdict.fail(format!("not settled within {} s", o.settle_timeout));
    }
    // Only an outage, or a provider failing every retry at random, makes a valid
    // ticket fail (and then its replay answers it).
    if !matches!(o.scenario, Scenario::Outage | Scenario::Flaky) && !verdict.valid_dead.is_empty() {
        let kinds = format!("{:?}", verdict.valid_dead);
        verdict.fail(format!("valid tickets dead-lettered without a provider outage: {kinds}"));
    }
    // Every paid call has its record, a call cut off by a kill a `lost` one.
    if verdict.paid_unrecorded > 0 {
        verdict.fail(format!(
            "{} calls paid at the provider have no cost record, not even a lost one ({} kills)",
            verdict.paid_unrecorded, kills
        ));
    }
    // Only a SIGKILL cuts calls off in flight: at most a worker's in-flight budget each.
    let in_flight = 256;
    let lost_allowed = if o.scenario.kills() { kills as usize * in_flight } else { 0 };
    if verdict.lost_calls > lost_allowed {
        verdict.fail(format!("{} calls lost in flight, more than {kills} kills can cut off", verdict.lost_calls));
    }
    // Identical copies of an output come from a fault between a publish and its
    // record (a kill, a cut connection): at most the tickets in flight per fault.
    if verdict.copies as u64 > faults * in_flight as u64 {
        verdict.fail(format!("{} identical output copies from {faults} faults", verdict.copies));
    }
    let stats = mock.stats();
    let rpm = u64::from(o.requests_per_minute());
    for (name, s) in &stats.providers {
        if s.max_sent_in_any_60s > rpm {
            verdict.fail(format!("{name}: {} requests in one 60-second window, limit {rpm}", s.max_sent_in_any_60s));
        }
    }
    if o.scenario == Scenario::Flaky {
        faults = stats.providers.values().map(|s| s.errors + s.rate_limited).sum();
    }
    let mut soak = String::new();
    if o.scenario == Scenario::Soak {
        match memory.growth(o.tickets) {
            Some((warm, end)) => {
                soak = format!(", RSS {warm} MB after warm-up, {end} MB at the end ({} samples)", memory.samples.len());
                if end > warm + warm / 5 + 8 {
                    verdict.fail(format!("the worker's memory grew from {warm} MB after warm-up to {end} MB"));
                }
            }
            None => verdict.fail("too few memory samples to judge growth".into()),
        }
    }
    let window = stats.providers.iter().map(|(n, s)| format!("{n} {}", s.max_sent_in_any_60s)).collect::<Vec<_>>();
    println!(
        "scenario {}, {}: {} tickets ({} sent twice) + {} poison, {} workers, {faults} faults{}; lost {}, duplicated {}, double-paid {}, order violations {}{}; {} replies, {} dead letters ({} identical copies; of valid tickets: {:?}; {} answered after a replay), {} paid calls unrecorded, {} lost in flight ({kills} kills){commits}; busiest minute per provider (limit {}): {}; {:.1} s; worker peak RSS {} MB{soak}",
        o.scenario.name(),
        broker.name(),
        o.tickets,
        resent,
        poison.len(),
        o.workers,
        if replays > 0 { format!(", {replays} replays") } else { String::new() },
        verdict.lost,
        verdict.duplicated,
        verdict.double_paid,
        verdict.order_violations,
        if ordered { "" } else { " (not promised across workers on one RabbitMQ queue)" },
        verdict.replies,
        verdict.dead_letters,
        verdict.copies,
        verdict.valid_dead,
        verdict.replayed_answered,
        verdict.paid_unrecorded,
        verdict.lost_calls,
        rpm,
        window.join(", "),
        wall.as_secs_f64(),
        memory.peak_kib / 1024,
    );
    Ok(verdict)
}

/// The runner's connection to the ledger, made again after a database restart.
struct Ledger {
    url: String,
    client: Option<tokio_postgres::Client>,
}

impl Ledger {
    /// A count, or an error once the database stayed unreachable for a minute.
    async fn count(&mut self, query: &str) -> Result<i64, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if self.client.as_ref().is_none_or(|c| c.is_closed()) {
                self.client = sql(&self.url).await.ok();
            }
            if let Some(client) = &self.client {
                match client.query_one(query, &[]).await {
                    Ok(row) => return Ok(row.get(0)),
                    Err(e) if Instant::now() > deadline => return Err(format!("reading the ledger: {e}")),
                    Err(_) => self.client = None,
                }
            } else if Instant::now() > deadline {
                return Err(format!("the ledger at {} unreachable for a minute", self.url));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What the ledger says of a ticket's unit, for a report: its status, whether its
/// output is published, its owner, whether that owner's lease runs, attempts and replays.
async fn unit_state(db: &tokio_postgres::Client, ticket: &str) -> String {
    let row = db
        .query_opt(
            "SELECT status, published, coalesce(owner, '-'), coalesce(lease_until > now(), false), attempts, replay_count
             FROM units WHERE ticket_id = $1",
            &[&ticket],
        )
        .await;
    match row {
        Ok(Some(r)) => format!(
            "({}, {}, owner {}, lease {}, attempts {}, replays {})",
            r.get::<_, String>(0),
            if r.get::<_, bool>(1) { "published" } else { "unpublished" },
            r.get::<_, String>(2),
            if r.get::<_, bool>(3) { "running" } else { "expired" },
            r.get::<_, i32>(4),
            r.get::<_, i32>(5),
        ),
        Ok(None) => "(not in the ledger)".into(),
        Err(e) => format!("(ledger: {e})"),
    }
}

/// Waits until every valid ticket is published (`answered`: published and not a dead
/// letter) and the input is consumed, sampling the workers' memory every second and
/// checking Kafka's commits on the way. False after `--settle-timeout`.
async fn settle(
    o: &Options,
    broker: &mut Broker,
    db: &mut Ledger,
    workers: &[Child],
    memory: &mut Memory,
    answered: bool,
) -> Result<bool, String> {
    let query = if answered {
        "SELECT count(*) FROM units WHERE published AND status <> 'dead_letter'"
    } else {
        "SELECT count(*) FROM units WHERE published"
    };
    let deadline = Instant::now() + Duration::from_secs(o.settle_timeout);
    let mut next_sample = Instant::now();
    loop {
        let done = db.count(query).await?;
        if Instant::now() >= next_sample {
            memory.sample(workers, done);
            next_sample += Duration::from_secs(1);
            if done as usize >= o.tickets && broker.drained().await? {
                return Ok(true);
            }
        }
        if Instant::now() > deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::main]
async fn main() {
    let options = parse();
    let interrupted = async {
        use tokio::signal::unix::{signal, SignalKind};
        match (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) {
            (Ok(mut int), Ok(mut term)) => tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            },
            _ => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        outcome = chaos(&options) => outcome,
        _ = interrupted => {
            // The queues, database and logs of an interrupted run stay behind.
            kill_started();
            eprintln!("error: interrupted; the workers were stopped");
            std::process::exit(130)
        }
    };
    match outcome {
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
