//! `ticketflow process` as a user runs it: every input ends as exactly one reply or
//! one dead letter of the right kind, costs add up, and bad input never stops a run.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use serde_json::value::RawValue;
use serde_json::Value;

use crate::helpers::{bin, instant_config, process, read_jsonl, repo_path, Outputs};

const REPLY_FIELDS: &[&str] = &[
    "schema_version",
    "ticket_id",
    "unit_id",
    "conversation_id",
    "status",
    "reply",
    "triage",
    "route",
    "moderation",
    "cost_usd",
    "latency_ms",
    "metadata",
    "processed_at",
    "worker_id",
];

fn assert_costs_add_up(out: &Outputs) {
    let by_unit = out.cost_by_unit();
    let mut output_units = BTreeSet::new();
    for r in &out.replies {
        let unit = r["unit_id"].as_str().unwrap();
        output_units.insert(unit.to_owned());
        let recorded = by_unit.get(unit).copied().unwrap_or(0.0);
        let replied = r["cost_usd"].as_f64().unwrap();
        assert!((recorded - replied).abs() < 1e-12, "{unit}: reply says {replied}, cost records sum to {recorded}");
    }
    for d in &out.dead_letters {
        if let Some(unit) = d["unit_id"].as_str() {
            output_units.insert(unit.to_owned());
        }
    }
    for c in &out.costs {
        assert_eq!(c["schema_version"], 1);
        let unit = c["unit_id"].as_str().unwrap();
        assert!(output_units.contains(unit), "cost record for {unit} which has no reply or dead letter");
        let cost = c["cost_usd"].as_f64().unwrap();
        assert!(cost >= 0.0 && cost.is_finite());
    }
}

#[test]
fn examples_each_end_as_exactly_one_reply_with_costs_that_add_up() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let input = repo_path("examples/tickets.jsonl");
    let run = process(&input, &out_dir, &[]);
    assert!(run.status.success(), "stderr: {}", String::from_utf8_lossy(&run.stderr));
    let out = Outputs::read(&out_dir);

    let raw_lines: Vec<String> =
        std::fs::read_to_string(&input).unwrap().lines().filter(|l| !l.trim().is_empty()).map(String::from).collect();
    assert!(raw_lines.len() >= 200, "the examples hold at least 200 tickets");
    assert!(out.dead_letters.is_empty(), "examples are valid: {:?}", out.dead_letters.first());

    // One reply per ticket, no more, no less.
    let mut replies_by_ticket: BTreeMap<String, &Value> = BTreeMap::new();
    for r in &out.replies {
        let id = r["ticket_id"].as_str().unwrap().to_owned();
        assert!(replies_by_ticket.insert(id.clone(), r).is_none(), "two replies for {id}");
    }
    assert_eq!(replies_by_ticket.len(), raw_lines.len());

    #[derive(serde::Deserialize)]
    struct Echo<'a> {
        ticket_id: String,
        #[serde(borrow, default)]
        metadata: Option<&'a RawValue>,
    }
    let reply_lines = std::fs::read_to_string(out_dir.join("replies.jsonl")).unwrap();
    let reply_meta: BTreeMap<String, Option<String>> = reply_lines
        .lines()
        .map(|l| {
            let e: Echo = serde_json::from_str(l).unwrap();
            (e.ticket_id, e.metadata.map(|m| m.get().to_owned()))
        })
        .collect();
    for line in &raw_lines {
        let e: Echo = serde_json::from_str(line).unwrap();
        let sent = e.metadata.map(|m| m.get().to_owned()).filter(|m| m != "null");
        assert_eq!(reply_meta[&e.ticket_id], sent, "metadata of {} must be echoed as the same text", e.ticket_id);
    }

    for r in &out.replies {
        let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, REPLY_FIELDS.iter().copied().collect(), "reply fields");
        assert_eq!(r["schema_version"], 1);
        match r["status"].as_str().unwrap() {
            "answered" => {
                assert!(r["reply"].as_str().is_some_and(|t| !t.is_empty()));
                assert!(r["route"]["provider"].is_string() && r["route"]["model"].is_string());
                assert_ne!(r["route"]["tier"], "human");
            }
            "needs_human" => {
                assert!(r["reply"].is_null());
                assert_eq!(r["route"]["tier"], "human");
                assert!(!r["route"]["reasons"].as_array().unwrap().is_empty());
            }
            other => panic!("unknown status {other}"),
        }
    }
    assert_costs_add_up(&out);

    // The default policy at work on the examples: every route of SPEC §5 is used,
    // and the innocent filter words are bypassed rather than handed to people.
    let tiers: BTreeSet<&str> = out.replies.iter().map(|r| r["route"]["tier"].as_str().unwrap()).collect();
    for tier in ["cheap", "premium", "empathy", "code", "multilingual", "human"] {
        assert!(tiers.contains(tier), "no ticket routed to {tier}: {tiers:?}");
    }
    let water = replies_by_ticket.values().find(|r| r["moderation"]["bypassed"] == true).expect("a bypassed refusal");
    assert_eq!(water["status"], "answered");
    assert_eq!(water["moderation"]["check"], "passed");

    let summary = String::from_utf8_lossy(&run.stdout);
    for figure in ["total cost", "cost per answered ticket", "savings", "latency p50", "latency p95"] {
        assert!(summary.contains(figure), "summary lacks {figure}: {summary}");
    }
    // The baseline is one premium reply per answered ticket, computed here from the
    // reply cost records alone; the summary prints that figure.
    let baseline = crate::helpers::expected_baseline(&out.costs);
    let printed = summary.lines().find(|l| l.contains("all-premium baseline")).expect("a baseline row");
    assert!(printed.contains(&format!("${baseline:.6}")), "{printed} (expected ${baseline:.6})");
    // The cheap tier answers most tickets; its share is printed.
    let answered = out.replies.iter().filter(|r| r["status"] == "answered").count();
    let cheap = out.replies.iter().filter(|r| r["status"] == "answered" && r["route"]["tier"] == "cheap").count();
    let share = format!("{:.1}%", cheap as f64 / answered as f64 * 100.0);
    assert!(summary.lines().any(|l| l.contains("cheap") && l.contains(&share)), "no cheap share {share}: {summary}");
}

/// A bad-input corpus: each line, what it must become (None: a reply).
fn corpus() -> Vec<(&'static str, Vec<u8>, Option<&'static str>)> {
    let ok = |text: &str| {
        format!(r#"{{"ticket_id":"OK-{text}","messages":[{{"role":"customer","text":"where is my order {text}"}}]}}"#)
    };
    let deep = |n: usize| format!(r#"{{"ticket_id":"D","messages":{}{}}}"#, "[".repeat(n), "]".repeat(n));
    let many_messages =
        format!(r#"{{"ticket_id":"M","messages":[{}]}}"#, vec![r#"{"role":"customer","text":"hi"}"#; 201].join(","));
    let long_text =
        format!(r#"{{"ticket_id":"L","messages":[{{"role":"customer","text":"{}"}}]}}"#, "a".repeat(32 * 1024 + 1));
    let oversize =
        format!(r#"{{"ticket_id":"BIG","messages":[{{"role":"customer","text":"{}"}}]}}"#, "a".repeat(300 * 1024));
    let mut bom = b"\xEF\xBB\xBF".to_vec();
    bom.extend_from_slice(ok("bom").as_bytes());
    let mut crlf = ok("crlf").into_bytes();
    crlf.push(b'\r');
    let s = |x: &str| x.as_bytes().to_vec();
    vec![
        ("unclosed object", s("{"), Some("invalid_json")),
        ("truncated", s(r#"{"ticket_id": "T""#), Some("invalid_json")),
        ("prose", s("not json at all"), Some("invalid_json")),
        ("array", s("[1,2,3]"), Some("invalid_ticket")),
        ("string", s(r#""just a string""#), Some("invalid_ticket")),
        ("number", s("42"), Some("invalid_ticket")),
        ("null", s("null"), Some("invalid_ticket")),
        ("empty object", s("{}"), Some("invalid_ticket")),
        ("missing messages", s(r#"{"ticket_id":"T"}"#), Some("invalid_ticket")),
        ("empty messages", s(r#"{"ticket_id":"T","messages":[]}"#), Some("invalid_ticket")),
        ("messages not a list", s(r#"{"ticket_id":"T","messages":"hi"}"#), Some("invalid_ticket")),
        (
            "numeric ticket_id",
            s(r#"{"ticket_id":7,"messages":[{"role":"customer","text":"a"}]}"#),
            Some("invalid_ticket"),
        ),
        (
            "empty ticket_id",
            s(r#"{"ticket_id":"","messages":[{"role":"customer","text":"a"}]}"#),
            Some("invalid_ticket"),
        ),
        (
            "129-char ticket_id",
            format!(r#"{{"ticket_id":"{}","messages":[{{"role":"customer","text":"a"}}]}}"#, "x".repeat(129))
                .into_bytes(),
            Some("invalid_ticket"),
        ),
        (
            "upper-case role",
            s(r#"{"ticket_id":"T","messages":[{"role":"Customer","text":"a"}]}"#),
            Some("invalid_ticket"),
        ),
        ("unknown role", s(r#"{"ticket_id":"T","messages":[{"role":"bot","text":"a"}]}"#), Some("invalid_ticket")),
        (
            "blank text",
            s(r#"{"ticket_id":"T","messages":[{"role":"customer","text":" \n\t "}]}"#),
            Some("invalid_ticket"),
        ),
        ("missing text", s(r#"{"ticket_id":"T","messages":[{"role":"customer"}]}"#), Some("invalid_ticket")),
        ("text over 32 KiB", long_text.into_bytes(), Some("invalid_ticket")),
        ("201 messages", many_messages.into_bytes(), Some("invalid_ticket")),
        (
            "metadata not an object",
            s(r#"{"ticket_id":"T","messages":[{"role":"customer","text":"a"}],"metadata":[1]}"#),
            Some("invalid_ticket"),
        ),
        (
            "wrong type of optional field",
            s(r#"{"ticket_id":"T","customer_tier":5,"messages":[{"role":"customer","text":"a"}]}"#),
            Some("invalid_ticket"),
        ),
        (
            "duplicate key",
            s(r#"{"ticket_id":"T","ticket_id":"U","messages":[{"role":"customer","text":"a"}]}"#),
            Some("invalid_ticket"),
        ),
        ("invalid UTF-8", b"{\"ticket_id\":\"T\xff\xfe\",\"messages\":[]}".to_vec(), Some("invalid_encoding")),
        ("overlong UTF-8", b"{\"ticket_id\":\"\xc0\xaf\"}".to_vec(), Some("invalid_encoding")),
        ("raw NUL byte", b"{\"ticket_id\":\"T\0\",\"messages\":[]}".to_vec(), Some("invalid_json")),
        ("10,000-level nesting", deep(10_000).into_bytes(), Some("invalid_json")),
        (
            "10,000-level array",
            format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)).into_bytes(),
            Some("invalid_json"),
        ),
        (
            "lone surrogate",
            s(r#"{"ticket_id":"T","messages":[{"role":"customer","text":"\ud800"}]}"#),
            Some("invalid_json"),
        ),
        ("trailing garbage", format!("{} trailing", ok("x")).into_bytes(), Some("invalid_json")),
        ("oversize", oversize.into_bytes(), Some("too_large")),
        ("valid after BOM", bom, None),
        ("valid with CRLF", crlf, None),
        (
            "valid with unknown fields",
            s(
                r#"{"ticket_id":"OK-unknown","future_field":{"a":[1,2]},"messages":[{"role":"customer","text":"hello","extra":true}]}"#,
            ),
            None,
        ),
        (
            "valid with nulls",
            s(
                r#"{"ticket_id":"OK-nulls","conversation_id":null,"metadata":null,"locale":null,"messages":[{"role":"customer","text":"hello","sent_at":null}]}"#,
            ),
            None,
        ),
        (
            "valid with escaped NUL",
            s(
                r#"{"ticket_id":"OK-nul","messages":[{"role":"customer","text":"a\u0000b"}],"metadata":{"k":"\u0000","n":123456789012345678901234567890}}"#,
            ),
            None,
        ),
    ]
}

#[test]
fn bad_input_corpus_becomes_dead_letters_of_the_right_kind_and_never_stops_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("bad.jsonl");
    let corpus = corpus();
    assert!(corpus.iter().filter(|c| c.2.is_some()).count() >= 25);
    let mut file = Vec::new();
    let mut expected: BTreeMap<i64, (&str, Option<&str>)> = BTreeMap::new();
    let mut line_no = 0;
    for (name, bytes, kind) in &corpus {
        // Blank lines between records are skipped, not tickets, but still count as lines.
        file.extend_from_slice(b"   \n");
        line_no += 1;
        file.extend_from_slice(bytes);
        file.push(b'\n');
        line_no += 1;
        expected.insert(line_no, (name, *kind));
    }
    std::fs::write(&input, &file).unwrap();
    let out_dir = dir.path().join("out");
    let run = process(&input, &out_dir, &[]);
    assert!(run.status.success(), "stderr: {}", String::from_utf8_lossy(&run.stderr));
    let out = Outputs::read(&out_dir);

    let dead: BTreeMap<i64, &Value> =
        out.dead_letters.iter().map(|d| (d["source"]["offset"].as_i64().unwrap(), d)).collect();
    assert_eq!(dead.len(), out.dead_letters.len(), "one dead letter per line");
    let reply_ids: BTreeSet<&str> = out.replies.iter().map(|r| r["ticket_id"].as_str().unwrap()).collect();
    assert_eq!(out.dead_letters.len() + out.replies.len(), corpus.len(), "exactly one output per non-blank line");
    for (line, (name, kind)) in &expected {
        match kind {
            Some(kind) => {
                let d = dead.get(line).unwrap_or_else(|| panic!("{name}: no dead letter for line {line}"));
                assert_eq!(d["error"]["kind"], *kind, "{name}: {}", d["error"]["message"]);
                assert!(!d["error"]["message"].as_str().unwrap().is_empty(), "{name}: message");
                assert_eq!(d["schema_version"], 1);
                assert_eq!(d["attempts"], 1);
                assert_eq!(d["replay_count"], 0);
            }
            None => assert!(!dead.contains_key(line), "{name}: should have been answered"),
        }
    }
    assert_eq!(reply_ids.len(), 5);

    // Schema errors name the field.
    let by_name: BTreeMap<&str, &Value> =
        expected.iter().filter_map(|(line, (name, _))| dead.get(line).map(|d| (*name, *d))).collect();
    assert!(by_name["upper-case role"]["error"]["message"].as_str().unwrap().contains("messages[0].role"));
    assert!(by_name["numeric ticket_id"]["error"]["message"].as_str().unwrap().contains("ticket_id"));
    assert!(by_name["text over 32 KiB"]["error"]["message"].as_str().unwrap().contains("messages[0].text"));

    // Payloads are kept for replay: byte for byte, base64 when not UTF-8, and an
    // oversized payload is cut to the size limit.
    let utf8 = by_name["prose"];
    assert_eq!(utf8["payload"], "not json at all");
    assert_eq!(utf8["payload_encoding"], "utf8");
    assert_eq!(by_name["invalid UTF-8"]["payload_encoding"], "base64");
    let big = by_name["oversize"];
    assert!(big["payload"].as_str().unwrap().len() <= 262_144);
    assert!(big["error"]["message"].as_str().unwrap().contains("limit is 262144"));
    assert!(by_name["prose"]["ticket_id"].is_null());
    assert_eq!(by_name["empty messages"]["ticket_id"], "T", "a readable ticket id is kept");

    let raw_replies = std::fs::read_to_string(out_dir.join("replies.jsonl")).unwrap();
    let nul = raw_replies.lines().find(|l| l.contains(r#""ticket_id":"OK-nul""#)).unwrap();
    assert!(
        nul.contains(r#""metadata":{"k":"\u0000","n":123456789012345678901234567890}"#),
        "metadata echoed as the exact text: {nul}"
    );
}

#[test]
fn a_ticket_delivered_twice_is_answered_and_paid_for_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("dupes.jsonl");
    let t = r#"{"ticket_id":"T-1","messages":[{"role":"customer","text":"Where is my order?"}]}"#;
    let next_turn = r#"{"ticket_id":"T-1","messages":[{"role":"customer","text":"Where is my order?"},{"role":"agent","text":"On its way."},{"role":"customer","text":"When exactly?"}]}"#;
    std::fs::write(&input, format!("{t}\n{t}\n{next_turn}\n{t}\n")).unwrap();
    let out_dir = dir.path().join("out");
    let run = process(&input, &out_dir, &[]);
    assert!(run.status.success());
    let out = Outputs::read(&out_dir);
    let units: BTreeSet<&str> = out.replies.iter().map(|r| r["unit_id"].as_str().unwrap()).collect();
    assert_eq!(out.replies.len(), 2, "one reply per unit of work: {:?}", units);
    assert_eq!(units.len(), 2, "a new customer turn is a new unit of work");
    assert_costs_add_up(&out);
    assert!(String::from_utf8_lossy(&run.stdout).contains("duplicate (already answered)"));
}

#[test]
fn reads_standard_input() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let cfg = instant_config(dir.path());
    let mut child = bin()
        .args(["process", "-", "--quiet", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let examples = std::fs::read_to_string(repo_path("examples/tickets.jsonl")).unwrap();
    let first: Vec<&str> = examples.lines().take(20).collect();
    stdin.write_all(first.join("\n").as_bytes()).unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success());
    assert_eq!(read_jsonl(&out_dir.join("replies.jsonl")).len(), 20);
}

#[test]
fn interrupt_stops_intake_and_leaves_only_complete_records() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    // Slow providers, so tickets are in flight when the signal arrives.
    let cfg = dir.path().join("slow.toml");
    let mut toml = String::new();
    for p in ["qwen", "openai", "anthropic", "mistral", "deepseek"] {
        toml.push_str(&format!("[providers.{p}]\nlatency_ms = 150\njitter_ms = 0\n\n"));
    }
    std::fs::write(&cfg, toml).unwrap();
    let mut child = bin()
        .args(["process", "-", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&out_dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let examples = std::fs::read_to_string(repo_path("examples/tickets.jsonl")).unwrap();
    stdin.write_all(examples.as_bytes()).unwrap();
    stdin.flush().unwrap();
    // Wait for the worker to say it is running (signal handlers are installed by then).
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    assert!(line.starts_with("processing"), "first stderr line: {line}");
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill").args(["-INT", &pid]).status().unwrap().success());
    // Standard input stays open: the run must end because intake stopped, not because
    // the input ended.
    let status = child.wait().unwrap();
    drop(stdin);
    assert_eq!(status.code(), Some(130), "interrupted runs exit 130");
    // Every line written is a complete record, and costs still add up.
    let out = Outputs::read(&out_dir);
    assert!(out.replies.len() + out.dead_letters.len() <= examples.lines().count());
    assert_costs_add_up(&out);
}

/// Decimal places of a JSON number as written (`2.72e-5` has 7).
fn decimals(number: &str) -> i32 {
    let (mantissa, exponent) = match number.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().unwrap()),
        None => (number, 0),
    };
    let places = mantissa.split_once('.').map_or(0, |(_, f)| f.len() as i32);
    (places - exponent).max(0)
}

/// Every USD amount written as JSON text in `text`: the values of keys ending in `usd`.
fn usd_amounts(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("usd\":") {
        let rest = &text[i + 5..];
        let end = rest.find([',', '}', ']']).unwrap_or(rest.len());
        let value = rest[..end].trim();
        if value.starts_with(|c: char| c.is_ascii_digit() || c == '-') {
            out.push(value.to_owned());
        }
    }
    out
}

/// Money is written with at most `USD_DECIMALS` places everywhere: replies, cost
/// records, `explain --format json` and `eval --format json` (no
/// `0.000027200000000000004`), and the rounded amounts still add up.
#[test]
fn money_is_written_with_a_fixed_number_of_decimals_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    let run = process(&repo_path("examples/tickets.jsonl"), &out_dir, &[]);
    assert!(run.status.success());
    let mut texts = Vec::new();
    for file in ["replies.jsonl", "costs.jsonl"] {
        texts.push((file.to_owned(), std::fs::read_to_string(out_dir.join(file)).unwrap()));
    }
    let explain =
        bin().args(["explain", "--format", "json"]).arg(repo_path("examples/tickets.jsonl")).output().unwrap();
    texts.push(("explain".into(), String::from_utf8(explain.stdout).unwrap()));
    let eval =
        bin().args(["eval", "--format", "json"]).arg(repo_path("tests/data/labelled_tickets.jsonl")).output().unwrap();
    texts.push(("eval".into(), String::from_utf8(eval.stdout).unwrap()));
    for (what, text) in &texts {
        let amounts = usd_amounts(text);
        assert!(!amounts.is_empty(), "{what}: no amounts found");
        for a in amounts {
            assert!(decimals(&a) <= ticketflow::ticket::USD_DECIMALS, "{what}: {a}");
        }
    }
    assert_costs_add_up(&Outputs::read(&out_dir));
}
