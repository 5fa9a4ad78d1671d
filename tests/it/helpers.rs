//! Shared helpers: running the binary and reading its outputs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use serde_json::Value;

pub fn bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ticketflow"));
    // Tests must not pick up the developer's environment overrides.
    for (k, _) in std::env::vars() {
        if k.starts_with("TICKETFLOW") {
            cmd.env_remove(k);
        }
    }
    cmd.current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A config file that makes every simulated provider instant, for fast tests, and
/// gives a worker's HTTP endpoints a free port (workers of parallel tests would
/// otherwise all want the default one).
pub fn instant_config(dir: &Path) -> PathBuf {
    let path = dir.join("instant.toml");
    let mut toml = String::from("[http]\nlisten = \"127.0.0.1:0\"\n\n");
    for p in ["qwen", "openai", "anthropic", "mistral", "deepseek"] {
        toml.push_str(&format!("[providers.{p}]\nlatency_ms = 0\njitter_ms = 0\n\n"));
    }
    std::fs::write(&path, toml).unwrap();
    path
}

/// Runs `ticketflow process` on `input` and returns the command output.
pub fn process(input: &Path, out: &Path, extra: &[&str]) -> Output {
    let cfg = instant_config(out.parent().unwrap());
    let mut cmd = bin();
    cmd.arg("process").arg(input).arg("--out").arg(out).arg("--quiet").arg("--config").arg(&cfg);
    cmd.args(extra);
    cmd.output().expect("run ticketflow")
}

/// Every line of a JSONL file, parsed.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: bad line {l}: {e}", path.display())))
        .collect()
}

/// The three output files of a run.
pub struct Outputs {
    pub replies: Vec<Value>,
    pub costs: Vec<Value>,
    pub dead_letters: Vec<Value>,
}

impl Outputs {
    pub fn read(dir: &Path) -> Self {
        Outputs {
            replies: read_jsonl(&dir.join("replies.jsonl")),
            costs: read_jsonl(&dir.join("costs.jsonl")),
            dead_letters: read_jsonl(&dir.join("dead_letters.jsonl")),
        }
    }

    /// Sum of cost records per unit id.
    pub fn cost_by_unit(&self) -> BTreeMap<String, f64> {
        let mut m = BTreeMap::new();
        for c in &self.costs {
            *m.entry(c["unit_id"].as_str().unwrap().to_owned()).or_insert(0.0) += c["cost_usd"].as_f64().unwrap();
        }
        m
    }
}

/// A TCP proxy in front of a server (the database, the broker) that can be cut
/// (every connection dropped, new ones refused) and restored: an outage that hits
/// one test alone.
pub struct Proxy {
    pub port: u16,
    state: Arc<std::sync::Mutex<ProxyState>>,
    accept: tokio::task::JoinHandle<()>,
}

struct ProxyState {
    open: bool,
    connections: Vec<tokio::task::AbortHandle>,
    /// Connections refused while cut.
    refused: usize,
}

impl Proxy {
    pub async fn start(upstream: &'static str) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(std::sync::Mutex::new(ProxyState { open: true, connections: Vec::new(), refused: 0 }));
        let accept = tokio::spawn({
            let state = state.clone();
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let mut guard = state.lock().unwrap();
                    if !guard.open {
                        guard.refused += 1;
                        continue; // dropped: the client sees the connection close
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                    guard.connections.push(task.abort_handle());
                }
            }
        });
        Proxy { port, state, accept }
    }

    pub fn cut(&self) {
        let mut guard = self.state.lock().unwrap();
        guard.open = false;
        for connection in guard.connections.drain(..) {
            connection.abort();
        }
    }

    pub fn restore(&self) {
        self.state.lock().unwrap().open = true;
    }

    /// Connections refused since the proxy was cut: a client trying to reconnect.
    pub fn refused(&self) -> usize {
        self.state.lock().unwrap().refused
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

/// `n` one-message "where is my order" tickets `{prefix}-0`.. as JSONL: ordinary
/// tickets that every shipped rule sends to the cheap tier.
pub fn order_tickets(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            let text = format!("Where is my order {i}? It has not arrived.");
            serde_json::json!({"ticket_id": format!("{prefix}-{i}"), "messages": [{"role": "customer", "text": text}]})
                .to_string()
                + "\n"
        })
        .collect()
}

/// `n` tickets as JSONL, cycling through the examples, in `conversations`
/// conversations of consecutive tickets, so that a worker ignoring the order of a
/// conversation would answer its tickets out of order.
pub fn synth_tickets(n: usize, conversations: usize) -> String {
    let examples = std::fs::read_to_string(repo_path("examples/tickets.jsonl")).unwrap();
    let base: Vec<serde_json::Value> =
        examples.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap()).collect();
    let mut out = String::new();
    for i in 0..n {
        let mut t = base[i % base.len()].clone();
        t["ticket_id"] = format!("S-{i}").into();
        t["conversation_id"] = format!("SC-{}", i / n.div_ceil(conversations)).into();
        out.push_str(&serde_json::to_string(&t).unwrap());
        out.push('\n');
    }
    out
}

/// `ticketflow produce -` with `text` on standard input and `env`; asserts success.
pub fn produce_stdin<K: AsRef<std::ffi::OsStr>, V: AsRef<std::ffi::OsStr>>(
    env: impl IntoIterator<Item = (K, V)>,
    text: &str,
) {
    use std::io::Write as _;
    let mut child = bin()
        .args(["produce", "-"])
        .envs(env)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Units whose outputs are confirmed published, from the ledger: distinct tickets.
pub async fn published_units(db: &crate::ledger_pg::TestDb) -> i64 {
    db.client().await.query_one("SELECT count(*) FROM units WHERE published", &[]).await.unwrap().get(0)
}

/// Provider calls that take a random few milliseconds (3 ± 3 ms): later tickets of a
/// conversation would overtake earlier ones if a worker let them run side by side.
pub fn jittery_calls() -> Vec<(String, String)> {
    calls_taking(3, 3)
}

/// Simulated provider calls that take `latency_ms` ± `jitter_ms`: the workers'
/// environment for it.
pub fn calls_taking(latency_ms: u64, jitter_ms: u64) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for p in ["QWEN", "OPENAI", "ANTHROPIC", "MISTRAL", "DEEPSEEK"] {
        env.push((format!("TICKETFLOW__PROVIDERS__{p}__LATENCY_MS"), latency_ms.to_string()));
        env.push((format!("TICKETFLOW__PROVIDERS__{p}__JITTER_MS"), jitter_ms.to_string()));
    }
    env
}

/// The all-premium baseline of a run, computed from its cost records alone: each
/// answering call's tokens (stage `reply`, outcome `ok`: one per answered unit) at
/// the default `pricing.baseline_model`'s prices; nothing for any other call.
pub fn expected_baseline(costs: &[Value]) -> f64 {
    let settings = ticketflow::policy::load_from(None, &Default::default()).unwrap();
    let (provider, model) = settings.pricing.baseline_model.split_once('/').unwrap();
    let price = &settings.providers[provider].models[model];
    let tokens = |c: &Value, k: &str| c[k].as_u64().unwrap() as f64;
    costs
        .iter()
        .filter(|c| c["stage"] == "reply" && c["outcome"] == "ok")
        .map(|c| {
            let (input, cached) = (tokens(c, "input_tokens"), tokens(c, "cached_input_tokens"));
            ((input - cached) * price.input_usd_per_mtok
                + cached * price.cached_input_usd_per_mtok
                + tokens(c, "output_tokens") * price.output_usd_per_mtok)
                / 1e6
        })
        .sum()
}

/// Held by the tests that measure rates over wall-clock time with several worker
/// processes (the account tests) and by the ones that load the machine with several
/// (the chaos runs): on two cores, one of them at a time, so that a measurement is
/// not of another test's load.
pub static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The tickets of `jsonl` with ` ref:<ticket_id>` added to their last message, so
/// that a mock provider with `tag_prefix = "ref:"` counts each ticket's paid calls.
pub fn tagged(jsonl: &str) -> String {
    let mut out = String::new();
    for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
        let mut t: Value = serde_json::from_str(line).unwrap();
        let tag = format!(" ref:{}", t["ticket_id"].as_str().unwrap());
        let last = t["messages"].as_array_mut().unwrap().last_mut().unwrap();
        last["text"] = (last["text"].as_str().unwrap().to_owned() + &tag).into();
        out.push_str(&t.to_string());
        out.push('\n');
    }
    out
}

/// A mock provider that counts paid calls per ticket tag (see [`tagged`]), with calls
/// that take 3 ± 3 ms (see [`jittery_calls`]), and the workers' environment for it.
pub async fn counting_mock() -> (ticketflow::mock_provider::MockServer, Vec<(String, String)>) {
    let mut config = ticketflow::mock_provider::MockConfig { tag_prefix: Some("ref:".into()), ..Default::default() };
    for p in config.providers.values_mut() {
        p.latency_ms = 3;
        p.jitter_ms = 3;
    }
    let (base, mock) = ticketflow::mock_provider::spawn(config).await.unwrap();
    (mock, crate::real_providers::mock_env(&base))
}

/// Issue 25: the provider's own count of paid calls (answers and refusals) per
/// ticket and stage against the published cost records, each call once (by call id):
/// the calls recorded as made (`ok`, `refused`) ≤ the calls paid ≤ those plus the
/// calls cut off (`lost`, `timeout`), and no stage of a ticket answered twice. More
/// recorded than paid is a call recorded twice or never made; more paid than
/// recorded, a paid call whose record vanished. Returns the `lost` calls.
pub fn check_paid_calls(mock: &ticketflow::mock_provider::MockServer, costs: &[Value]) -> usize {
    type Key = (String, String);
    let mut calls: BTreeMap<&str, &Value> = BTreeMap::new();
    for c in costs {
        calls.insert(c["call_id"].as_str().unwrap(), c);
    }
    // Per ticket and stage: made, cut off, answered.
    let mut recorded: BTreeMap<Key, (u64, u64, u64)> = BTreeMap::new();
    let mut lost = 0;
    for c in calls.values() {
        let key = (c["ticket_id"].as_str().unwrap().to_owned(), c["stage"].as_str().unwrap().to_owned());
        let entry = recorded.entry(key).or_default();
        match c["outcome"].as_str().unwrap() {
            "ok" => {
                entry.0 += 1;
                entry.2 += 1;
            }
            "refused" => entry.0 += 1,
            "lost" => {
                entry.1 += 1;
                lost += 1;
            }
            "timeout" => entry.1 += 1,
            _ => {}
        }
    }
    let mut paid: BTreeMap<Key, u64> = BTreeMap::new();
    for c in mock.tagged_calls() {
        *paid.entry((c.tag, c.stage)).or_default() += c.paid;
    }
    assert!(!paid.is_empty(), "the mock counted no call: are the tickets tagged?");
    let keys: std::collections::BTreeSet<&Key> = recorded.keys().chain(paid.keys()).collect();
    for key in keys {
        let (made, cut_off, answered) = recorded.get(key).copied().unwrap_or_default();
        let p = paid.get(key).copied().unwrap_or_default();
        assert!(made <= p, "{key:?}: {made} calls recorded as made, {p} paid");
        assert!(p <= made + cut_off, "{key:?}: {p} calls paid, {made} recorded and {cut_off} cut off");
        assert!(answered <= 1, "{key:?}: answered {answered} times");
    }
    lost
}

/// Tickets whose `ticket_id` and `conversation_id` are 128 characters (the most the
/// intake allows) of 1, 3 and 4 bytes in UTF-8 (issue 27): 128, 384 and 512 bytes, past
/// every 255-byte protocol field.
pub fn longest_ids() -> Vec<(String, String)> {
    ["x", "会", "𝒜"]
        .iter()
        .map(|c| {
            let id = c.repeat(128);
            let ticket = serde_json::json!({
                "ticket_id": id, "conversation_id": id,
                "messages": [{"role": "customer", "text": "Where is my order? It has been a week."}],
            });
            (id, ticket.to_string())
        })
        .collect()
}

/// Checks the outputs of [`longest_ids`]' tickets: one reply each, no dead letter,
/// every cost record published once and each ticket's calls recorded in the ledger.
pub async fn check_longest_ids(db: &crate::ledger_pg::TestDb, replies: &[Value], costs: &[Value], dead: usize) {
    let ids: std::collections::BTreeSet<String> = longest_ids().into_iter().map(|(id, _)| id).collect();
    assert_eq!(dead, 0, "no dead letter");
    let answered: std::collections::BTreeSet<String> =
        replies.iter().map(|r| r["ticket_id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(answered, ids, "every ticket answered");
    assert_eq!(replies.len(), ids.len(), "one reply each");
    let mut calls = std::collections::BTreeSet::new();
    for c in costs {
        assert!(calls.insert(c["call_id"].as_str().unwrap().to_owned()), "a cost record published twice: {c}");
        assert!(ids.contains(c["ticket_id"].as_str().unwrap()), "{c}");
    }
    let recorded: i64 = db.client().await.query_one("SELECT count(*) FROM cost_records", &[]).await.unwrap().get(0);
    assert_eq!(recorded as usize, calls.len(), "the ledger's cost records are the published ones");
}
