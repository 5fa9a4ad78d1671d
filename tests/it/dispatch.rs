//! The dispatcher's promises as `ticketflow process` users see them: a
//! conversation's tickets answered in input order, input that the database cannot
//! store dead-lettered at once instead of looping, and a typo that costs no outputs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::helpers::{bin, process, Outputs};
use crate::ledger_pg::TestDb;

/// `conversations` conversations of `turns` tickets each, every ticket of its own id,
/// the turns of one conversation next to each other in the file.
fn multi_turn(dir: &Path, conversations: usize, turns: usize) -> std::path::PathBuf {
    let mut lines = Vec::new();
    for c in 0..conversations {
        let mut messages = Vec::new();
        for t in 0..turns {
            messages
                .push(serde_json::json!({"role": "customer", "text": format!("where is my order {c}? (turn {t})")}));
            lines.push(
                serde_json::json!({
                    "ticket_id": format!("T-{c}-{t}"),
                    "conversation_id": format!("C-{c}"),
                    "messages": messages,
                })
                .to_string(),
            );
            messages.push(serde_json::json!({"role": "agent", "text": "Let me check."}));
        }
    }
    let path = dir.join("conversations.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

#[test]
fn each_conversation_is_answered_in_input_order() {
    let dir = tempfile::tempdir().unwrap();
    let input = multi_turn(dir.path(), 200, 4);
    // Latency with jitter, so that without ordering later turns overtake earlier ones.
    let config = dir.path().join("jitter.toml");
    let mut toml = String::from("[limits]\nmax_in_flight = 256\n\n");
    for p in ["qwen", "openai", "anthropic", "mistral", "deepseek"] {
        toml.push_str(&format!("[providers.{p}]\nlatency_ms = 6\njitter_ms = 5\n\n"));
    }
    std::fs::write(&config, toml).unwrap();
    let out_dir = dir.path().join("out");
    let output = bin()
        .arg("process")
        .arg(&input)
        .arg("--out")
        .arg(&out_dir)
        .arg("--quiet")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let out = Outputs::read(&out_dir);
    assert_eq!(out.replies.len(), 800, "dead letters: {:?}", out.dead_letters);
    let mut seen: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for r in &out.replies {
        let ticket = r["ticket_id"].as_str().unwrap();
        let turn: usize = ticket.rsplit('-').next().unwrap().parse().unwrap();
        let at = r["processed_at"].as_str().unwrap().to_owned();
        seen.entry(r["conversation_id"].as_str().unwrap().to_owned()).or_default().push((turn, at));
    }
    assert_eq!(seen.len(), 200);
    for (conversation, replies) in seen {
        let turns: Vec<usize> = replies.iter().map(|r| r.0).collect();
        assert_eq!(turns, [0, 1, 2, 3], "{conversation}: replies published out of order");
        assert!(replies.windows(2).all(|w| w[0].1 <= w[1].1), "{conversation}: processed_at out of order: {replies:?}");
    }
}

#[tokio::test]
async fn a_nul_byte_the_database_cannot_store_is_one_dead_letter_at_once() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("nul.jsonl");
    std::fs::write(
        &input,
        b"abc\x00def\n{\"ticket_id\":\"T-\\u0000\",\"messages\":[{\"role\":\"customer\",\"text\":\"hi\\u0000\"}]}\n",
    )
    .unwrap();
    let out_dir = dir.path().join("out");
    let started = Instant::now();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_ticketflow"));
    child.arg("process").arg(&input).arg("--out").arg(&out_dir).arg("--quiet").arg("--ledger").arg(&db.url);
    let output = tokio::time::timeout(Duration::from_secs(60), child.output())
        .await
        .expect("the run ends: nothing is redelivered forever")
        .unwrap();
    let elapsed = started.elapsed();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let out = Outputs::read(&out_dir);
    assert_eq!(out.dead_letters.len(), 2, "{:?} {:?}", out.dead_letters, out.replies);
    assert_eq!(out.dead_letters[0]["error"]["kind"], "invalid_json");
    // The second is a ticket whose text PostgreSQL refuses: its outcome cannot be
    // recorded, so after the configured attempts it is an internal dead letter.
    assert_eq!(out.dead_letters[1]["error"]["kind"], "internal", "{:?}", out.dead_letters[1]);
    assert_eq!(out.dead_letters[1]["attempts"], 5);
    assert!(out.replies.is_empty());
    eprintln!("two undeliverable lines dead-lettered in {elapsed:?}");
    // Both are kept in the ledger's audit trail, the NUL payload byte for byte.
    let client = db.client().await;
    let rows = client.query("SELECT kind, payload, payload_encoding FROM dead_letters ORDER BY id", &[]).await.unwrap();
    let kinds: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(kinds, ["invalid_json", "internal"]);
    use base64::Engine as _;
    let (payload, encoding): (String, String) = (rows[0].get(1), rows[0].get(2));
    assert_eq!(encoding, "base64");
    assert_eq!(base64::engine::general_purpose::STANDARD.decode(payload).unwrap(), b"abc\x00def");
    drop(client);
    db.drop_db().await;
}

#[test]
fn a_missing_input_leaves_the_previous_outputs_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    std::fs::write(out_dir.join("replies.jsonl"), "{\"yesterday\":1}\n").unwrap();
    let output = process(&dir.path().join("tickets.jsonl-typo"), &out_dir, &[]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(std::fs::read_to_string(out_dir.join("replies.jsonl")).unwrap(), "{\"yesterday\":1}\n");
    assert!(!out_dir.join("replies.jsonl.partial").exists());
}
