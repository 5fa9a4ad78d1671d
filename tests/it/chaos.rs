//! Issue 15, the short variants CI runs of `ticketflow-chaos` (the long ones are in
//! BENCHMARKS.md): worker processes on RabbitMQ with faults on a seeded schedule, the
//! guarantees checked from the outputs and the ledger by the chaos runner itself.

use std::process::{Command, Output};

use crate::helpers::repo_path;

fn chaos(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ticketflow-chaos")).args(args).current_dir(repo_path("")).output().unwrap()
}

fn said(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// A clean run of `scenario` with two workers, `tickets` tickets and faults every 2 s
/// for `seconds`: what the runner said, after asserting that it found no violation.
fn clean_run(scenario: &str, tickets: &str, seconds: &str, seed: &str) -> String {
    let args = ["--scenario", scenario, "--tickets", tickets, "--workers", "2", "--seconds", seconds, "--every", "2"];
    let out = {
        let _timed = crate::helpers::TIMED.blocking_lock();
        chaos(&[&args[..], &["--seed", seed]].concat())
    };
    let said = said(&out);
    eprintln!("{said}");
    assert!(out.status.success(), "{said}");
    assert!(said.contains("lost 0, duplicated 0, double-paid 0"), "{said}");
    said
}

#[test]
fn workers_killed_on_a_seeded_schedule_lose_nothing_and_answer_nothing_twice() {
    let said = clean_run("kill", "600", "12", "11");
    assert!(!said.contains(" 0 faults"), "faults were injected: {said}");
}

#[test]
fn workers_stopped_with_sigterm_under_load_drain_and_lose_nothing() {
    // Order across two RabbitMQ workers is not promised (counted, not failed).
    let said = clean_run("term", "400", "8", "12");
    assert!(!said.contains(" 0 faults"), "faults were injected: {said}");
}

#[test]
fn the_database_cut_off_again_and_again_loses_nothing_and_pays_nothing_twice() {
    clean_run("db-cut", "1500", "8", "13");
}

#[test]
fn a_wrong_scenario_is_a_usage_error() {
    let out = chaos(&["--scenario", "meteor"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(said(&out).contains("`meteor` is none of calm, kill, term, db-cut"), "{}", said(&out));
}
