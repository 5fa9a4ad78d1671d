//! `ticketflow explain`: rule traces without reply calls, and policy comparison.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::helpers::{bin, instant_config, repo_path};

#[test]
fn explains_every_ticket_and_calls_no_reply_model() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let examples = std::fs::read_to_string(repo_path("examples/tickets.jsonl")).unwrap();
    std::fs::write(&input, format!("{}\nnot json\n", examples.trim_end())).unwrap();
    let out = bin()
        .args(["explain", "--format", "json", "--config"])
        .arg(instant_config(dir.path()))
        .arg(&input)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let lines: Vec<Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let explained: Vec<&Value> = lines.iter().filter(|l| l.get("ticket_id").is_some()).collect();
    assert_eq!(explained.len(), examples.lines().count());
    let rejected: Vec<&Value> = lines.iter().filter(|l| l.get("error").is_some()).collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0]["error"]["kind"], "invalid_json");
    for e in &explained {
        let rules = e["route"]["rules"].as_array().unwrap();
        assert_eq!(rules.len(), 6, "every rule of the default policy is shown");
        let first = rules.iter().find(|r| r["matched"] == true).expect("the catch-all always matches");
        assert_eq!(first["target"], e["route"]["target"]);
        assert_eq!(e["route"]["reasons"][0], first["name"]);
        if e["route"]["target"] == "human" {
            assert!(e["route"]["reply_model"].is_null());
            assert_eq!(e["route"]["estimated_reply_usd"], 0.0);
        } else {
            assert!(e["route"]["estimated_reply_usd"].as_f64().unwrap() > 0.0);
        }
    }
    // Output is in input order.
    assert_eq!(explained[0]["ticket_id"], "T-1001");
}

#[test]
fn compare_reports_the_routes_that_differ_and_both_costs() {
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("all-premium.toml");
    std::fs::write(
        &other,
        r#"
        [[routing.rules]]
        name = "risk:human"
        target = "human"
        when = { risk = ["legal", "safety"] }
        [[routing.rules]]
        name = "everything:premium"
        target = "premium"
        "#,
    )
    .unwrap();
    let run = |format: &str| {
        bin()
            .args(["explain", "--format", format, "--config"])
            .arg(instant_config(dir.path()))
            .arg("--compare")
            .arg(&other)
            .arg(repo_path("examples/tickets.jsonl"))
            .output()
            .unwrap()
    };
    let json = run("json");
    assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
    let lines: Vec<Value> =
        String::from_utf8(json.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let summary = &lines.last().unwrap()["summary"];
    let mut differ = 0;
    let mut costs = (0.0, 0.0);
    let mut by_target: BTreeMap<String, usize> = BTreeMap::new();
    for e in lines.iter().filter(|l| l.get("ticket_id").is_some()) {
        let (a, b) = (&e["route"], &e["compared"]);
        differ += usize::from(a["target"] != b["target"]);
        costs.0 += a["estimated_reply_usd"].as_f64().unwrap();
        costs.1 += b["estimated_reply_usd"].as_f64().unwrap();
        *by_target.entry(b["target"].as_str().unwrap().to_owned()).or_default() += 1;
        assert_eq!(a["target"] == "human", b["target"] == "human", "both policies hand the same risks to people");
    }
    assert_eq!(summary["routes_differ"], differ);
    assert!(differ > 100);
    assert!((summary["estimated_reply_usd"].as_f64().unwrap() - costs.0).abs() < 1e-9);
    assert!(costs.1 > costs.0 * 1.5, "all-premium costs more: {costs:?}");
    assert_eq!(by_target.keys().cloned().collect::<Vec<_>>(), vec!["human", "premium"]);

    let text = run("text");
    let report = String::from_utf8(text.stdout).unwrap();
    assert!(report.contains(&format!("routes that differ: {differ} of")), "{report}");
    assert!(report.contains("compared route: premium via openai/gpt-4o"));
}
