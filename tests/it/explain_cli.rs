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

/// Peak RSS in KB and the stdout of `ticketflow explain --format json FILE`, under GNU
/// time (as the benchmarks measure it).
fn explain_measured(dir: &std::path::Path, input: &std::path::Path) -> (u64, Vec<Value>) {
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "maxrss_kb %M"])
        .arg(env!("CARGO_BIN_EXE_ticketflow"))
        .args(["explain", "--format", "json", "--config"])
        .arg(instant_config(dir))
        .arg(input)
        .output()
        .expect("GNU time at /usr/bin/time");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    let rss = err.lines().find_map(|l| l.strip_prefix("maxrss_kb ")).unwrap().trim().parse().unwrap();
    (rss, String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect())
}

/// A line that is not UTF-8 and a line far over the size limit are each a rejected
/// line, named with their line number; the lines around them are explained; and the
/// oversized line is never held whole (its real size is still named).
#[test]
fn invalid_utf8_and_oversized_lines_are_rejected_lines_and_the_rest_is_explained() {
    let dir = tempfile::tempdir().unwrap();
    let examples = std::fs::read_to_string(repo_path("examples/tickets.jsonl")).unwrap();
    let first: Vec<&str> = examples.lines().take(3).collect();
    let small = dir.path().join("small.jsonl");
    std::fs::write(&small, format!("{}\n{}\n", first[0], first[2])).unwrap();
    let (small_rss, _) = explain_measured(dir.path(), &small);

    let huge_text = "x".repeat(200 << 20);
    let mut bytes = Vec::new();
    bytes.extend_from_slice(first[0].as_bytes());
    bytes.extend_from_slice(b"\n\xff\xfe{\"ticket_id\": \"T-BAD\"}\n");
    bytes.extend_from_slice(
        format!(
            "{{\"ticket_id\": \"T-HUGE\", \"messages\": [{{\"role\": \"customer\", \"text\": \"{huge_text}\"}}]}}\n"
        )
        .as_bytes(),
    );
    bytes.extend_from_slice(first[2].as_bytes());
    bytes.push(b'\n');
    drop(huge_text);
    let mixed = dir.path().join("mixed.jsonl");
    std::fs::write(&mixed, &bytes).unwrap();
    let huge_len = bytes.len() - first[0].len() - first[2].len() - 3 - b"\xff\xfe{\"ticket_id\": \"T-BAD\"}".len() - 1;
    drop(bytes);
    let (rss, lines) = explain_measured(dir.path(), &mixed);

    let explained: Vec<&str> = lines.iter().filter_map(|l| l["ticket_id"].as_str()).collect();
    assert_eq!(explained.len(), 2, "{explained:?}");
    let rejected: Vec<(u64, &str, &str)> = lines
        .iter()
        .filter(|l| l.get("error").is_some())
        .map(|l| {
            (l["line"].as_u64().unwrap(), l["error"]["kind"].as_str().unwrap(), l["error"]["message"].as_str().unwrap())
        })
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!((rejected[0].0, rejected[0].1), (2, "invalid_encoding"));
    assert_eq!((rejected[1].0, rejected[1].1), (3, "too_large"));
    assert!(rejected[1].2.contains(&format!("message is {huge_len} bytes")), "{rejected:?}");
    // A 200 MB line held whole would show in the peak RSS; streamed, it costs at most
    // the size limit.
    assert!(rss < small_rss + 50 * 1024, "peak RSS {rss} KB against {small_rss} KB for two small tickets");
}
