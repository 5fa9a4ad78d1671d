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
        "[broker.kafka.properties]\n\"sasl.password\" = \"hunter2\"\n\"fetch.max.bytes\" = \"1048576\"\n\
         \"ssl.key.pem\" = \"-----BEGIN PRIVATE KEY-----planted-pem\"\n\
         \"sasl.oauthbearer.config\" = \"principal=x planted-oauth\"\n",
    )
    .unwrap();
    // Issue 27: a database password with URL delimiters in it, not percent-encoded.
    let url = "postgres://u:pl?an@ted#pw@127.0.0.1:5432/db";
    let out = bin().arg("--config").arg(&file).arg("config").env("TICKETFLOW__DATABASE__URL", url).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    for planted in ["hunter2", "planted-pem", "planted-oauth", "pl?an", "ted#pw", "an@ted"] {
        assert!(!text.contains(planted), "{planted}: {text}");
    }
    assert!(text.contains("postgres://u:REDACTED@127.0.0.1:5432/db"), "{text}");
    assert!(text.contains("\"fetch.max.bytes\" = \"1048576\""), "{text}");
}

/// Keys of the real providers, all unset: the production profile needs every one.
const KEY_VARS: [&str; 5] =
    ["DASHSCOPE_API_KEY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MISTRAL_API_KEY", "DEEPSEEK_API_KEY"];

fn without_keys(cmd: &mut std::process::Command) -> &mut std::process::Command {
    for var in KEY_VARS {
        cmd.env_remove(var);
    }
    cmd.env("TICKETFLOW_ENV", "production")
}

#[test]
fn missing_api_keys_are_a_configuration_error_naming_every_one_at_once() {
    let examples = crate::helpers::repo_path("examples/tickets.jsonl");
    let dir = tempfile::tempdir().unwrap();
    for args in [
        vec!["process", examples.to_str().unwrap(), "--quiet", "--out", dir.path().to_str().unwrap()],
        vec!["explain", examples.to_str().unwrap()],
    ] {
        let out = without_keys(&mut bin()).args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "one line: {err}");
        for var in KEY_VARS {
            assert!(err.contains(var), "{args:?} does not name {var}: {err}");
        }
    }
    // `config` only warns, one line per missing key, and exits 0.
    let out = without_keys(bin().arg("config")).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for var in KEY_VARS {
        assert_eq!(err.lines().filter(|l| l.starts_with("warning:") && l.contains(var)).count(), 1, "{err}");
    }
    // With the default (simulated) providers no key is needed and nothing is said.
    let out = bin().arg("config").env_remove("TICKETFLOW_ENV").output().unwrap();
    assert!(!String::from_utf8_lossy(&out.stderr).contains("API key"));
}

#[test]
fn an_unparseable_database_url_on_the_command_line_is_a_usage_error() {
    let examples = crate::helpers::repo_path("examples/tickets.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let bad = "postgres://u:hunter2@host:notaport/db";
    let runs = [
        vec![
            "process".to_owned(),
            examples.display().to_string(),
            "--quiet".into(),
            "--out".into(),
            dir.path().display().to_string(),
            "--ledger".into(),
            bad.into(),
        ],
        vec!["migrate".to_owned(), "--database-url".into(), bad.into()],
        vec!["report".to_owned(), "--database-url".into(), bad.into()],
    ];
    for args in runs {
        let out = bin().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a PostgreSQL URL"), "{err}");
        assert!(!err.contains("hunter2"), "the password leaked: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
    }
}

#[test]
fn migrate_and_report_take_a_database_url_and_the_hint_names_the_database() {
    let name = format!("tf_missing_{}", uuid::Uuid::new_v4().simple());
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    let out = bin().args(["report", "--database-url", &url]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("`ticketflow migrate --database-url {url}`")), "{err}");
}

#[test]
fn config_shows_redacted_only_where_a_secret_was_set() {
    let out = bin().arg("config").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    // The shipped database URL has no password: nothing to redact.
    assert!(text.contains("url = \"postgres://postgres@127.0.0.1:5432/ticketflow\""), "{text}");
    assert!(text.contains("password = \"\""));
    let out = bin().arg("config").env("TICKETFLOW__DATABASE__URL", "postgres://u:hunter2@db/x").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("url = \"postgres://u:REDACTED@db/x\"") && !text.contains("hunter2"), "{text}");
}

#[test]
fn a_fraction_where_an_integer_belongs_is_an_error_and_every_type_error_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typed.toml");
    std::fs::write(&file, "[limits]\nmax_message_bytes = \"lots\"\n\n[retry]\nmax_attempts_per_model = \"three\"\n")
        .unwrap();
    let out = bin()
        .arg("--config")
        .arg(&file)
        .arg("config")
        .env("TICKETFLOW__LIMITS__MAX_IN_FLIGHT", "2.5")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["limits.max_message_bytes", "retry.max_attempts_per_model", "limits.max_in_flight"] {
        assert!(err.contains(&format!("`{key}`")), "{key} not named: {err}");
    }
    // A whole number written as a float is that number.
    let out = bin().arg("config").env("TICKETFLOW__LIMITS__MAX_IN_FLIGHT", "64.0").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("max_in_flight = 64"));
}

#[test]
fn with_log_format_json_every_line_of_stderr_is_json() {
    let examples = crate::helpers::repo_path("examples/tickets.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .args(["--log-format", "json", "process"])
        .arg(&examples)
        .arg("--out")
        .arg(dir.path())
        .env("TICKETFLOW_LOG", "debug")
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.lines().count() > 10, "debug logs were on: {err}");
    for line in err.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"]["message"].is_string(), "{line}");
    }
    // Lines logged while a ticket is worked on carry its ids.
    assert!(err.lines().any(|l| l.contains("\"ticket_id\":\"T-10") && l.contains("\"unit_id\":\"T-10")), "{err}");
    // And a failure is a JSON line too.
    let out = bin().args(["--log-format", "json", "process", "/nonexistent.jsonl"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<serde_json::Value> = err.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.last().unwrap()["level"], "ERROR", "{err}");
}
