//! `ticketflow eval` on a small labelled set whose figures are computed by hand, and
//! on the shipped labelled set.

use crate::helpers::{bin, repo_path};

/// Six tickets (`tests/data/eval_small.jsonl`) and what the heuristics and the default
/// rules make of them: E-1 cheap (labelled cheap), E-2 human (legal threat, labelled
/// human), E-3 multilingual (Thai), E-4 code (a stack trace), E-5 cheap but labelled
/// premium, E-6 human (a molten charger is a safety incident) but labelled cheap.
fn eval(args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let out = bin()
        .arg("eval")
        .arg(repo_path("tests/data/eval_small.jsonl"))
        .args(["--format", "json"])
        .args(args)
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    (out.status.code(), report, String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn eval_figures_match_a_hand_computed_case_and_missed_floors_exit_1() {
    let (code, r, stderr) = eval(&[]);
    let p = &r["policy"];
    assert_eq!((p["tickets"].as_u64(), p["route_correct"].as_u64()), (Some(6), Some(4)));
    assert_eq!(p["confusion"]["premium"]["cheap"], 1);
    assert_eq!(p["confusion"]["cheap"]["human"], 1);
    assert_eq!(p["recall"]["human"], serde_json::json!([1, 1]));
    assert_eq!(p["recall"]["premium"], serde_json::json!([0, 1]));
    assert_eq!(p["recall"]["specialist"], serde_json::json!([2, 2]), "code and multilingual are specialists");
    assert_eq!(p["over_escalated"], serde_json::json!([1, 2]));
    // Labelled triage fields only: E-1 and E-5 have a category, E-5's is wrong; E-6's
    // risk label says none, the heuristics say safety.
    assert_eq!(r["triage_accuracy"]["category"]["heuristic"], serde_json::json!([1, 2]));
    assert_eq!(r["triage_accuracy"]["risk"]["heuristic"], serde_json::json!([2, 3]));
    let (spend, baseline) = (p["estimated_spend_usd"].as_f64().unwrap(), p["estimated_baseline_usd"].as_f64().unwrap());
    assert!(spend > 0.0 && spend < baseline, "{spend} {baseline}");
    // The default floors (90% accuracy, 80% escalation recall, 10% over-escalation).
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    for missed in ["route accuracy 66.7%", "recall of premium 0.0%", "over-escalation 50.0%"] {
        assert!(stderr.contains(missed), "{stderr}");
    }
}

#[test]
fn a_compared_policy_runs_on_the_same_triage_and_all_premium_costs_its_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let all_premium = dir.path().join("all_premium.toml");
    std::fs::write(
        &all_premium,
        "[[routing.rules]]\nname = \"all:premium\"\ntarget = \"premium\"\n\n[eval]\nmin_route_accuracy = 0.0\nmin_human_recall = 0.0\nmin_escalation_recall = 0.0\nmax_over_escalation = 1.0\n",
    )
    .unwrap();
    let (_, r, _) = eval(&["--compare", all_premium.to_str().unwrap()]);
    let c = &r["compared"];
    assert_eq!(c["route_correct"], 1, "only E-5 is labelled premium");
    assert_eq!(r["routes_differ"], 6);
    assert_eq!(c["missed"], serde_json::json!([]));
    // Every ticket answered on GPT-4o, the baseline model: spend is the baseline.
    let (spend, baseline) = (c["estimated_spend_usd"].as_f64().unwrap(), c["estimated_baseline_usd"].as_f64().unwrap());
    assert!(spend > 0.0 && (spend - baseline).abs() < 1e-12, "{spend} {baseline}");
}

#[test]
fn the_shipped_policy_meets_its_floors_on_the_shipped_labelled_set() {
    let out = bin().arg("eval").arg(repo_path("tests/data/labelled_tickets.jsonl")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    for figure in ["route accuracy", "recall: human", "over-escalation", "all-premium baseline", "estimated savings"] {
        assert!(stdout.contains(figure), "{figure}: {stdout}");
    }
}

#[test]
fn a_line_without_a_label_is_reported_and_a_missing_file_is_one_line() {
    let mut child = bin()
        .args(["eval", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), b"{\"ticket_id\":\"X\",\"messages\":[]}\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("line 1: no usable `label`"), "{said}");
    let missing = bin().args(["eval", "/nonexistent.jsonl"]).output().unwrap();
    assert_eq!(missing.status.code(), Some(1));
    let said = String::from_utf8_lossy(&missing.stderr);
    assert_eq!(said.lines().count(), 1, "{said}");
    assert!(said.contains("cannot read /nonexistent.jsonl"), "{said}");
}
