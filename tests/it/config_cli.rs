//! `ticketflow config`: validation, every problem listed, exit codes, redaction.

use crate::helpers::bin;

#[test]
fn default_configuration_is_valid_and_printed() {
    let out = bin().arg("config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    for name in ["qwen", "openai", "anthropic", "mistral", "deepseek"] {
        assert!(text.contains(&format!("[providers.{name}]")), "{name} missing");
    }
    assert!(text.contains("name = \"risk:human\""));
}

#[test]
fn production_profile_makes_every_provider_real_and_changes_nothing_else() {
    let default = bin().arg("config").output().unwrap();
    let prod = bin().arg("config").env("TICKETFLOW_ENV", "production").output().unwrap();
    assert!(prod.status.success(), "{}", String::from_utf8_lossy(&prod.stderr));
    let (d, p) = (String::from_utf8(default.stdout).unwrap(), String::from_utf8(prod.stdout).unwrap());
    let differing: Vec<(&str, &str)> = d.lines().zip(p.lines()).filter(|(a, b)| a != b).collect();
    assert_eq!(d.lines().count(), p.lines().count());
    assert_eq!(differing.len(), 5, "only the five provider kinds change: {differing:?}");
    assert!(differing.iter().all(|(a, b)| a.starts_with("kind = \"simulated\"") && b.starts_with("kind = ")));
    assert!(p.contains("kind = \"dashscope\"") && p.contains("kind = \"anthropic\""));
}

#[test]
fn every_problem_is_listed_and_the_exit_code_is_2() {
    let out = bin()
        .arg("config")
        .env("TICKETFLOW__LIMITS__MAX_INFLIGHT", "5")
        .env("TICKETFLOW__PROVIDERS__QWEN__COLOUR", "blue")
        .env("TICKETFLOW__LIMITS__MAX_IN_FLIGHT", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("limits.max_inflight"), "{err}");
    assert!(err.contains("providers.qwen.colour"), "{err}");
    assert!(err.contains("max_in_flight must be at least 1"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn fixed_keys_work_from_the_environment_and_secrets_are_redacted() {
    let out = bin()
        .arg("config")
        .env("TICKETFLOW__BROKER__KIND", "rabbitmq")
        .env("TICKETFLOW__DATABASE__URL", "postgres://app:hunter2-secret@db:5432/tf")
        .env("TICKETFLOW__BROKER__RABBITMQ__URL", "amqp://svc:s3cr3t-pass@mq:5672/%2f")
        .env("TICKETFLOW__PROVIDERS__QWEN__BASE_URL", "http://127.0.0.1:8089/v1")
        .env("TICKETFLOW__PROVIDERS__QWEN__REQUESTS_PER_MINUTE", "77")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("kind = \"rabbitmq\""));
    assert!(text.contains("http://127.0.0.1:8089/v1"));
    assert!(text.contains("requests_per_minute = 77"));
    assert!(!text.contains("hunter2-secret") && !text.contains("s3cr3t-pass"), "{text}");
    assert!(text.contains("postgres://app:REDACTED@db:5432/tf"));
}

#[test]
fn missing_files_and_bad_usage_are_exit_2() {
    let out = bin().args(["config", "--config", "/nonexistent/x.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    let out = bin().args(["process"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = bin().arg("config").env("TICKETFLOW_ENV", "staging-typo").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn a_missing_input_file_is_a_readable_runtime_error() {
    let dir = tempfile::tempdir().unwrap();
    let out =
        bin().args(["process", "/nonexistent/tickets.jsonl", "--quiet", "--out"]).arg(dir.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open input /nonexistent/tickets.jsonl"), "{err}");
    assert!(!err.contains("panicked"));
}

#[test]
fn kafka_passthrough_secrets_are_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kafka.toml");
    std::fs::write(
        &file,
        "[broker.kafka.properties]\n\"sasl.password\" = \"hunter2\"\n\"fetch.max.bytes\" = \"1048576\"\n",
    )
    .unwrap();
    let out = bin().arg("--config").arg(&file).arg("config").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains("\"fetch.max.bytes\" = \"1048576\""), "{text}");
}
