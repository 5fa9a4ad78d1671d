//! Worker-side overhead per provider call: everything the worker does for one call
//! except waiting for the network — rate limiter, circuit breaker, request encoding,
//! HTTP client, response parsing and classification, pricing and the cost record.
//!
//! The mock provider runs as a separate process (`ticketflow mock-provider`) with zero
//! latency; this process paces calls at a fixed rate through the same `ChainRunner`
//! the pipeline uses, against a real `openai`-kind adapter, and divides its own CPU
//! time (user + system, from /proc/self/stat) by the number of calls.
//!
//! Run: `cargo bench --bench provider_overhead` (env: RATE, SECONDS, RUNS).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ticketflow::providers::chain::{ChainResult, ChainRunner, UnitCalls};
use ticketflow::providers::pricing::PriceTable;
use ticketflow::providers::{ChatRequest, Providers};
use ticketflow::settings::ProviderKind;
use ticketflow::ticket::Stage;
use ticketflow::triage::Analyzer;

// The same allocator as the `ticketflow` binary, so the figure is the worker's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// CPU time of this process so far.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let hz = 100; // USER_HZ on Linux
    Duration::from_millis(ticks * 1000 / hz)
}

fn main() {
    // `cargo bench` passes --bench; anything else (cargo test --benches) gets a smoke run.
    let measuring = std::env::args().any(|a| a == "--bench");
    let rate: u64 = if measuring { env_or("RATE", 5_000) } else { 500 };
    let seconds: u64 = if measuring { env_or("SECONDS", 10) } else { 1 };
    let runs: usize = if measuring { env_or("RUNS", 5) } else { 1 };

    let mut mock = Command::new(env!("CARGO_BIN_EXE_ticketflow"))
        .args(["mock-provider", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the mock provider");
    let mut line = String::new();
    BufReader::new(mock.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("mock announces its address").to_owned();

    std::env::set_var("TICKETFLOW_BENCH_KEY", "sk-bench");
    let mut settings = ticketflow::policy::load_from(None, &BTreeMap::new()).unwrap();
    let p = settings.providers.get_mut("openai").unwrap();
    p.kind = ProviderKind::Openai;
    p.base_url = format!("http://{addr}/openai/v1");
    p.api_key_env = "TICKETFLOW_BENCH_KEY".into();
    p.requests_per_minute = 10_000_000;
    p.tokens_per_minute = 100_000_000_000;
    let analyzer = Arc::new(Analyzer::new(&settings.triage));
    let providers = Providers::from_settings(&settings, analyzer).unwrap();
    let prices = PriceTable::from_settings(&settings);
    // Built once and shared, as the pipeline holds them: only an Arc is cloned per call.
    let shared = Arc::new((providers, prices, settings, vec!["openai/gpt-4o".to_string()]));

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let mut per_call = Vec::new();
    for run in 0..runs + 1 {
        let calls = rate * seconds;
        let (cpu, elapsed, failures) = runtime.block_on(async {
            let cpu0 = cpu_time();
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            // Release calls in 1 ms batches: the pacing timer is the harness's, not the
            // worker's, so it should not wake up 5,000 times a second.
            let per_tick = (rate / 1000).max(1);
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 * per_tick / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 0..calls {
                if i % per_tick == 0 {
                    tick.tick().await;
                }
                let shared = shared.clone();
                tasks.spawn(async move {
                    let (providers, prices, settings, chain) = &*shared;
                    let runner = ChainRunner { providers, prices, retry: &settings.retry };
                    let mut unit = UnitCalls::new("T-1", "T-1:00000000", Instant::now() + Duration::from_secs(30));
                    let request = ChatRequest {
                        model: String::new(),
                        stage: Stage::Reply,
                        system: "You are a customer-support agent. Topic: order_status. (ISO 639-1: en)".into(),
                        user: format!("<ticket>\n{{\"messages\":[{{\"role\":\"customer\",\"text\":\"Where is order {i}?\"}}]}}\n</ticket>"),
                        json_mode: false,
                        max_output_tokens: 300,
                    };
                    matches!(runner.run(Stage::Reply, chain, request, &mut unit).await, ChainResult::Answered { .. })
                });
                while let Some(done) = tasks.try_join_next() {
                    done.unwrap();
                }
            }
            let mut failures = 0;
            while let Some(done) = tasks.join_next().await {
                failures += u64::from(!done.unwrap());
            }
            (cpu_time() - cpu0, started.elapsed(), failures)
        });
        let achieved = calls as f64 / elapsed.as_secs_f64();
        let us = cpu.as_secs_f64() * 1e6 / calls as f64;
        if run == 0 {
            println!("warm-up: {achieved:.0} calls/s, {us:.1} µs CPU per call");
            continue;
        }
        println!(
            "run {run}: {calls} calls at {achieved:.0} calls/s, {failures} failed, {us:.1} µs worker CPU per call"
        );
        per_call.push(us);
    }
    let _ = mock.kill();
    let _ = mock.wait();
    per_call.sort_by(|a, b| a.total_cmp(b));
    println!("median: {:.1} µs worker CPU per call at {rate} calls/s", per_call[per_call.len() / 2]);
}
