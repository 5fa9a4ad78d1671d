//! The wire contract (SPEC §3) against golden files in `tests/golden/`. A diff here
//! is a breaking change for every consumer of our topics. To accept an intended
//! change, run with `UPDATE_GOLDEN=1` and review the diff of the golden files.

use serde_json::value::RawValue;
use ticketflow::ticket::*;

use crate::helpers::repo_path;

fn golden(name: &str, actual: &str) {
    let path = repo_path(&format!("tests/golden/{name}"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(actual, expected, "{name} differs from the golden file");
}

#[test]
fn ticket_example_from_the_spec_parses() {
    let raw = std::fs::read(repo_path("tests/golden/ticket.json")).unwrap();
    let t = ticketflow::intake::parse(&raw, 256 * 1024).unwrap();
    assert_eq!(t.ticket_id, "T-1001");
    assert_eq!(t.conversation_id, "C-77");
    assert_eq!(t.customer_tier.as_deref(), Some("gold"));
    assert_eq!(t.messages.len(), 3);
    assert_eq!(t.messages[1].role, Role::Agent);
    assert_eq!(t.metadata.unwrap().get(), r#"{"helpdesk": "zendesk", "priority": "normal"}"#);
    assert_eq!(t.unit_id, ticketflow::intake::unit_id("T-1001", &t.messages));
}

#[test]
fn reply_matches_golden() {
    let reply = Reply {
        schema_version: SCHEMA_VERSION,
        ticket_id: "T-1001".into(),
        unit_id: "T-1001:9f2c41d0".into(),
        conversation_id: "C-77".into(),
        status: ReplyStatus::Answered,
        reply: Some("text".into()),
        triage: TriageView {
            category: "order_status".into(),
            complexity: "simple".into(),
            sentiment: "neutral".into(),
            language: "zh".into(),
            risk: "none".into(),
            source: "llm".into(),
        },
        route: RouteView {
            tier: "cheap".into(),
            provider: Some("qwen".into()),
            model: Some("qwen-plus".into()),
            reasons: vec!["default:cheap".into()],
            attempts: 1,
        },
        moderation: Some(ModerationView {
            refused_by: vec!["qwen/qwen-plus".into()],
            check: "passed".into(),
            bypassed: true,
        }),
        cost_usd: 0.000231,
        latency_ms: 842,
        metadata: Some(RawValue::from_string(r#"{"helpdesk":"zendesk","priority":"normal"}"#.into()).unwrap()),
        processed_at: "2026-11-20T10:00:01Z".into(),
        worker_id: "worker-7f3a".into(),
    };
    golden("reply.json", &serde_json::to_string_pretty(&reply).unwrap());
    let handoff = Reply {
        status: ReplyStatus::NeedsHuman,
        reply: None,
        route: RouteView {
            tier: "human".into(),
            provider: None,
            model: None,
            reasons: vec!["risk:human".into()],
            attempts: 0,
        },
        moderation: None,
        metadata: None,
        ..reply
    };
    golden("reply_needs_human.json", &serde_json::to_string_pretty(&handoff).unwrap());
}

#[test]
fn cost_record_matches_golden() {
    let c = CostRecord {
        schema_version: SCHEMA_VERSION,
        ticket_id: "T-1001".into(),
        unit_id: "T-1001:9f2c41d0".into(),
        call_id: "5b1e0f0e-8a4e-4a59-9d3c-2f4c8b7e6a10".into(),
        stage: Stage::Triage,
        provider: "qwen".into(),
        model: "qwen-turbo".into(),
        input_tokens: 412,
        cached_input_tokens: 0,
        output_tokens: 38,
        cost_usd: 0.0000846,
        pricing_version: "2026-11".into(),
        outcome: CallOutcome::Ok,
        latency_ms: 311,
        at: "2026-11-20T10:00:00.311Z".into(),
        estimated: false,
        baseline_cost_usd: 0.0,
    };
    golden("cost_record.json", &serde_json::to_string_pretty(&c).unwrap());
}

#[test]
fn dead_letter_matches_golden_and_round_trips_its_payload() {
    let raw = b"{\"ticket_id\": \"T-1001\", \xff}";
    let (payload, payload_encoding) = encode_payload(raw);
    let d = DeadLetter {
        schema_version: SCHEMA_VERSION,
        ticket_id: None,
        unit_id: None,
        error: DeadLetterError {
            kind: ErrorKind::InvalidEncoding,
            message: "not valid UTF-8: invalid byte at offset 23".into(),
        },
        attempts: 1,
        replay_count: 0,
        source: SourceRef { topic: "tickets".into(), partition: 2, offset: 1234 },
        failed_at: "2026-11-20T10:00:00.000Z".into(),
        worker_id: "worker-7f3a".into(),
        payload,
        payload_encoding,
    };
    golden("dead_letter.json", &serde_json::to_string_pretty(&d).unwrap());
    assert_eq!(d.payload_bytes().unwrap(), raw, "replay republishes the payload byte for byte");
}
