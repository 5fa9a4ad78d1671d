//! Issue 15, the short variants CI runs of `ticketflow-chaos` (the long ones, and the
//! deliberately broken builds each invariant catches, are in BENCHMARKS.md): every
//! scenario on both brokers, worker processes with faults on a seeded schedule, the
//! guarantees checked from the outputs, the ledger and the mock provider by the chaos
//! runner itself.

use std::process::{Command, Output};

use crate::helpers::repo_path;

fn chaos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ticketflow-chaos")).args(args).current_dir(repo_path("")).output().unwrap()
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The figure before `what` in the runner's line (`12 faults` → 12).
fn figure(said: &str, what: &str) -> u64 {
    let at = said.find(what).unwrap_or_else(|| panic!("no `{what}` in: {said}"));
    said[..at].trim_end().rsplit([' ', '(']).next().unwrap().parse().unwrap()
}

/// Short runs of `scenario` on RabbitMQ and on Kafka (two workers, faults every 2 s
/// for 6 s, the input fed meanwhile): what the runner said of each, after asserting
/// that it found no violation.
fn clean_runs(scenario: &str, tickets: &str, seed: &str) -> Vec<String> {
    clean_runs_on(&["rabbitmq", "kafka"], scenario, tickets, seed)
}

fn clean_runs_on(brokers: &[&str], scenario: &str, tickets: &str, seed: &str) -> Vec<String> {
    brokers
        .iter()
        .copied()
        .map(|broker| {
            let args = [
                "--broker",
                broker,
                "--scenario",
                scenario,
                "--tickets",
                tickets,
                "--workers",
                "2",
                "--seconds",
                "6",
                "--every",
                "2",
                "--seed",
                seed,
            ];
            let out = {
                let _timed = crate::helpers::TIMED.blocking_lock();
                chaos(&args)
            };
            let said = said(&out);
            eprintln!("{said}");
            assert!(out.status.success(), "{broker}: {said}");
            assert!(said.contains("lost 0, duplicated 0, double-paid 0, order violations"), "{said}");
            said
        })
        .collect()
}

fn faulted(runs: &[String]) {
    for said in runs {
        assert!(figure(said, "faults") > 0, "faults were injected: {said}");
    }
}

#[test]
fn workers_killed_on_a_seeded_schedule_lose_nothing_and_answer_nothing_twice() {
    faulted(&clean_runs("kill", "600", "11"));
}

#[test]
fn workers_stopped_with_sigterm_under_load_drain_and_lose_nothing() {
    faulted(&clean_runs("term", "600", "12"));
}

#[test]
fn workers_joining_and_dying_at_random_lose_nothing() {
    faulted(&clean_runs("storm", "600", "13"));
}

#[test]
fn the_database_cut_off_again_and_again_loses_nothing_and_pays_nothing_twice() {
    faulted(&clean_runs("db-cut", "600", "14"));
}

#[test]
fn the_database_restarted_under_load_loses_nothing() {
    faulted(&clean_runs("db-restart", "600", "15"));
}

#[test]
fn the_broker_restarted_under_load_loses_nothing() {
    faulted(&clean_runs("broker-restart", "600", "16"));
}

#[test]
fn tickets_dead_in_a_provider_outage_are_each_answered_once_after_a_replay() {
    for said in clean_runs("outage", "600", "17") {
        assert!(
            figure(&said, "answered after a replay") > 0,
            "the outage killed tickets and the replay answered them: {said}"
        );
    }
}

#[test]
fn providers_answering_429_and_503_at_random_lose_nothing_and_never_starve_on_our_limiter() {
    faulted(&clean_runs("flaky", "600", "18"));
}

#[test]
fn a_calm_run_and_a_short_soak_lose_nothing_and_the_soaked_worker_does_not_grow() {
    clean_runs("calm", "300", "19");
    for said in clean_runs("soak", "4000", "20") {
        assert!(said.contains("MB after warm-up"), "memory was judged: {said}");
    }
}

/// Two workers under a requests-per-minute limit the load exceeds (`--rpm`, the
/// mock's and the account's), one of them SIGKILLed on a seeded schedule, with the
/// shipped lease (issue 25): they divide the limit through the ledger, so the
/// provider never sees more than it in any 60 seconds; no ticket is dead-lettered for
/// our own pacing (the runner fails any valid ticket's dead letter) and every paid
/// call has its record. The run must reach the limit for this to mean anything:
/// Qwen's busiest minute (triage and the cheap tier) is asserted near it.
#[test]
fn workers_killed_under_a_binding_rate_limit_never_exceed_it_and_dead_letter_nothing() {
    for broker in ["rabbitmq", "kafka"] {
        let out = {
            let _timed = crate::helpers::TIMED.blocking_lock();
            chaos(&[
                "--broker",
                broker,
                "--scenario",
                "kill",
                "--tickets",
                "300",
                "--workers",
                "2",
                "--seconds",
                "6",
                "--every",
                "3",
                "--rpm",
                "400",
                "--seed",
                "29",
            ])
        };
        let said = said(&out);
        eprintln!("{said}");
        assert!(out.status.success(), "{broker}: {said}");
        assert!(said.contains("lost 0, duplicated 0, double-paid 0"), "{said}");
        assert!(said.contains("of valid tickets: {};"), "no valid ticket dead-lettered: {said}");
        assert!(said.contains(" 0 paid calls unrecorded"), "{said}");
        assert!(figure(&said, "faults") > 0, "faults were injected: {said}");
        let busiest = said.split("busiest minute per provider (limit 400): ").nth(1).expect(&said);
        let qwen = busiest.split([',', ';']).find_map(|p| p.trim().strip_prefix("qwen ")).expect(&said);
        let qwen: u64 = qwen.parse().unwrap();
        assert!((320..=400).contains(&qwen), "Qwen's busiest minute near the limit, not over it: {said}");
    }
}

#[test]
fn a_wrong_scenario_or_broker_is_a_usage_error() {
    let out = chaos(&["--scenario", "meteor"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(said(&out).contains("`meteor` is none of calm, kill, term, storm"), "{}", said(&out));
    let out = chaos(&["--broker", "nats"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(said(&out).contains("`nats` is neither rabbitmq nor kafka"), "{}", said(&out));
}
