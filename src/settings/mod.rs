//! Settings: layered configuration (SPEC §7), validation and secret redaction.
//!
//! Layers, later wins: the embedded `config/default.toml`, then
//! `config/<TICKETFLOW_ENV>.toml` when present, then `--config FILE`, then
//! `TICKETFLOW__SECTION__KEY` environment variables.
//!
//! Unknown keys are errors. Structs do not use `deny_unknown_fields`, because serde
//! stops at the first unknown key; instead [`serde_ignored`] collects every unknown
//! key so that `ticketflow config` can list all problems in one run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod checks;
mod redact;
mod rules;

pub use redact::redact_url;

use crate::vocab::HUMAN;
pub use rules::{BudgetSettings, Condition, Rule};

/// The shipped defaults, compiled in so the binary runs from any directory.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Every problem found while loading or validating, one line each.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration:\n  - {}", .problems.join("\n  - "))]
pub struct ConfigError {
    pub problems: Vec<String>,
}

impl ConfigError {
    pub(crate) fn one(problem: impl Into<String>) -> Self {
        ConfigError { problems: vec![problem.into()] }
    }
}

/// The whole effective configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// This worker's identity in outputs and leases.
    pub worker: WorkerSettings,
    /// The worker's HTTP endpoints: `/metrics`, `/healthz`, `/readyz`.
    pub http: HttpSettings,
    /// Input limits and concurrency.
    pub limits: Limits,
    /// Retry policy for transient and rate-limited provider outcomes.
    pub retry: RetrySettings,
    /// Per-provider circuit breakers.
    pub breaker: BreakerSettings,
    /// Message broker for `worker`, `produce` and `replay`.
    pub broker: BrokerSettings,
    /// PostgreSQL ledger.
    pub database: DatabaseSettings,
    /// Cost accounting.
    pub pricing: PricingSettings,
    /// LLM providers by stable name (`qwen`, `openai`, `anthropic`, `mistral`, `deepseek`, ...).
    pub providers: BTreeMap<String, ProviderSettings>,
    /// Triage: model chain, categories and local keyword lists.
    pub triage: TriageSettings,
    /// Reply tiers by name: `cheap`, `premium` and specialist chains.
    pub tiers: BTreeMap<String, TierSettings>,
    /// Ordered routing rules, first match wins.
    pub routing: RoutingSettings,
    /// Optional daily spend caps per tier.
    #[serde(default)]
    pub budgets: BTreeMap<String, BudgetSettings>,
    /// Our own moderation check after a provider refusal.
    pub moderation: ModerationSettings,
    /// Store policy text per category, used to ground replies.
    pub policies: BTreeMap<String, String>,
    /// Floors `ticketflow eval` holds a routing policy to.
    pub eval: EvalSettings,
}

/// Floors of `ticketflow eval` (shares from 0 to 1); a policy that misses one makes
/// the command exit 1.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalSettings {
    /// Share of tickets routed as labelled.
    pub min_route_accuracy: f64,
    /// Share of tickets labelled `human` that reach a person.
    pub min_human_recall: f64,
    /// Share of tickets labelled premium, empathy or specialist (code, multilingual)
    /// routed to that class, for each class.
    pub min_escalation_recall: f64,
    /// Share of tickets labelled `cheap` routed anywhere else.
    pub max_over_escalation: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSettings {
    /// Identity written to `worker_id`; empty means `worker-<4 random hex digits>`.
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HttpSettings {
    /// `host:port` the worker serves `/metrics`, `/healthz` and `/readyz` on; empty
    /// serves nothing.
    pub listen: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Limits {
    /// A raw message above this many bytes is a `too_large` dead letter, unparsed.
    pub max_message_bytes: usize,
    /// Tickets processed concurrently by one worker (the in-flight budget).
    pub max_in_flight: usize,
    /// Time budget for one ticket across all its provider calls and retries.
    pub ticket_deadline_ms: u64,
    /// How long beyond its deadline one attempt at a ticket may wait on our own rate
    /// limiters; also the wait rate-aware admission plans for.
    pub limiter_wait_ms: u64,
    /// How long a ticket may wait in all for room under our own rate limits (from
    /// its unit's first claim) before such waiting ends it as `providers_exhausted`.
    pub max_ticket_age_ms: u64,
    /// Share (0..0.5) of each provider's rate limits left unused, absorbing clock and
    /// network jitter so the provider never sees more than its limit.
    pub rate_limit_headroom: f64,
    /// How often worker replicas meet in the ledger's database to divide each
    /// provider's limits among them (milliseconds); 0: each process keeps the whole
    /// limits (one replica only).
    pub account_heartbeat_ms: u64,
    /// IANA time zone whose calendar day the daily budget caps count.
    pub budget_time_zone: String,
    /// Failed attempts at one message (for reasons other than a database or broker
    /// outage) after which it becomes an `internal` dead letter.
    pub max_delivery_attempts: u32,
    /// Wait before retrying a failed attempt; doubles per failure, with jitter.
    pub delivery_retry_base_ms: u64,
    /// Ceiling of that wait.
    pub delivery_retry_max_ms: u64,
    /// Times `ticketflow replay` may move one message back to the input; a dead
    /// letter replayed this often stays in the dead-letter queue.
    pub max_replays: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BreakerSettings {
    /// Consecutive transient failures that open a provider's circuit.
    pub failure_threshold: u32,
    /// How long an open circuit skips the provider before one probe call.
    pub cooldown_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RetrySettings {
    /// Calls per model for transient or rate-limited outcomes before failing over.
    pub max_attempts_per_model: u32,
    /// First backoff; doubles per attempt, with full jitter.
    pub base_delay_ms: u64,
    /// Ceiling of one backoff.
    pub max_delay_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    Kafka,
    Rabbitmq,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BrokerSettings {
    /// `kafka` or `rabbitmq`.
    pub kind: BrokerKind,
    /// Topic (Kafka) or queue (RabbitMQ) names.
    pub topics: TopicSettings,
    pub kafka: KafkaSettings,
    pub rabbitmq: RabbitSettings,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TopicSettings {
    pub input: String,
    pub replies: String,
    pub costs: String,
    pub dead_letters: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KafkaSettings {
    /// Comma-separated `host:port` list.
    pub bootstrap_servers: String,
    /// Consumer group shared by all worker replicas.
    pub group_id: String,
    /// `plaintext`, `ssl`, `sasl_plaintext` or `sasl_ssl`.
    pub security_protocol: String,
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` with a `sasl_*` protocol.
    pub sasl_mechanism: String,
    /// Environment variables holding the SASL user name and password (never the
    /// secrets themselves in a file).
    pub sasl_username_env: String,
    pub sasl_password_env: String,
    /// PEM files: the CA of the brokers' certificates, and a client certificate and key.
    pub ssl_ca_file: String,
    pub ssl_certificate_file: String,
    pub ssl_key_file: String,
    /// Partitions and replication factor of the topics `ticketflow topics` creates.
    pub partitions: i32,
    pub replication_factor: i32,
    /// How often the offsets of finished messages are committed.
    pub commit_interval_ms: u64,
    /// Consumer group session timeout (a member silent this long is evicted).
    pub session_timeout_ms: u64,
    /// How often librdkafka reports its statistics, from which the consumer lag of
    /// every assigned partition is taken (0: never).
    pub statistics_interval_ms: u64,
    /// Any other librdkafka property, passed through as is (for example
    /// `"fetch.max.bytes" = "1048576"`). Ours win where both set one.
    pub properties: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RabbitSettings {
    /// AMQP URL with the vhost as its path; the password is redacted in `ticketflow config`.
    pub url: String,
    /// The type of every declared queue.
    pub queue_type: QueueType,
    /// Quorum queues: deliveries of one message before the broker dead-letters it.
    pub delivery_limit: u32,
    /// The exchange the input queue dead-letters into.
    pub dead_letter_exchange: String,
    /// When not empty, a direct exchange the output queues are also bound to.
    pub output_exchange: String,
    /// AMQP heartbeat interval.
    pub heartbeat_secs: u16,
    /// Connection name shown by the broker; empty for "ticketflow <worker id>".
    pub connection_name: String,
    /// Longest wait between reconnection attempts after the connection is lost.
    pub reconnect_max_secs: u64,
    /// A consumer that received nothing for this long while the queue has ready
    /// messages (and the worker has room for them) is restarted.
    pub stall_timeout_secs: u64,
    /// Input shards: 0 for the single input queue (unordered across replicas);
    /// otherwise the input is a consistent-hash exchange over this many queues
    /// `<input>.0` … with single active consumer, divided among the live workers.
    pub shards: u16,
    /// How often a worker renews its membership in the shards' roster (the ledger's
    /// `shard_members`); one unseen for three of these loses its shards.
    pub member_heartbeat_ms: u64,
    /// `amqps://` only: PEM file of the CA certificates that sign the server's
    /// certificate; empty for the system's roots.
    pub tls_ca_file: String,
    /// `amqps://` only: PEM client certificate (chain) and its PKCS#8 key, for brokers
    /// that authenticate clients by certificate; both or neither.
    pub tls_client_cert_file: String,
    pub tls_client_key_file: String,
}

/// RabbitMQ queue types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    Quorum,
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatabaseSettings {
    /// PostgreSQL URL; the password is redacted in `ticketflow config`. Its `sslmode`
    /// and `sslrootcert` parameters, when present, take precedence over `tls` and
    /// `tls_ca_file`.
    pub url: String,
    /// Parts that replace the URL's when not empty (0 for the port): for deployments
    /// that keep the password in a secret of its own (`TICKETFLOW__DATABASE__PASSWORD`).
    pub host: String,
    pub port: u16,
    pub user: String,
    /// Redacted in `ticketflow config`.
    pub password: String,
    pub dbname: String,
    /// Transport security, with libpq's meanings.
    pub tls: TlsMode,
    /// PEM file of the certificate authorities to trust for `verify-ca` and
    /// `verify-full`; empty for the system's store.
    pub tls_ca_file: String,
    /// Connections in the pool.
    pub pool_size: usize,
    /// Timeout for connecting and for waiting on a pooled connection.
    pub connect_timeout_ms: u64,
    /// The server cancels a ledger statement running longer than this (0: never).
    /// Migrations and reports are not limited.
    pub statement_timeout_ms: u64,
    /// How long a claimed unit stays reserved for its worker without a renewal (the
    /// worker renews every quarter of it); when the worker dies, another takes the
    /// unit over once this expires.
    pub lease_ms: u64,
}

/// TLS to PostgreSQL, as libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", try_from = "String")]
pub enum TlsMode {
    /// Plain TCP.
    Disable,
    /// TLS when the server offers it, plain otherwise; the certificate is not checked.
    Prefer,
    /// TLS or no connection; the certificate is not checked (encryption only).
    Require,
    /// TLS with a certificate signed by a trusted authority, whatever its host name.
    VerifyCa,
    /// TLS with a trusted certificate issued for the host connected to.
    VerifyFull,
}

impl TryFrom<String> for TlsMode {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TlsMode::parse(&s)
            .ok_or_else(|| format!("`{s}` is not one of disable, prefer, require, verify-ca, verify-full"))
    }
}

impl TlsMode {
    /// libpq's `sslmode` values (`allow` is taken as `prefer`).
    pub fn parse(s: &str) -> Option<TlsMode> {
        Some(match s {
            "disable" => TlsMode::Disable,
            "prefer" | "allow" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PricingSettings {
    /// Version tag of the price table, for auditing old cost records.
    pub pricing_version: String,
    /// `provider/model` that every ticket would have used without routing; savings are
    /// measured against it with the same token counts.
    pub baseline_model: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Simulated,
    Openai,
    Dashscope,
    Anthropic,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Simulated => "simulated",
            ProviderKind::Openai => "openai",
            ProviderKind::Dashscope => "dashscope",
            ProviderKind::Anthropic => "anthropic",
        }
    }
}

/// How a simulated provider signals a content-filter refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalStyle {
    /// Like DashScope: an error without usage, so the call costs nothing.
    Dashscope,
    /// Like OpenAI/Anthropic: a completed call with usage, flagged as filtered.
    FinishReason,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProviderSettings {
    /// `simulated`, `openai`, `dashscope` or `anthropic`.
    pub kind: ProviderKind,
    /// API root (e.g. `https://api.openai.com/v1`); overridable so any provider can
    /// point at a local mock. The adapter appends `/chat/completions` or `/messages`.
    pub base_url: String,
    /// Name of the environment variable holding the API key (never the key itself).
    pub api_key_env: String,
    /// Account request limit, enforced before each call (real kinds only).
    pub requests_per_minute: u32,
    /// Account token limit, enforced before each call (real kinds only).
    pub tokens_per_minute: u64,
    /// Timeout of one HTTP call.
    pub timeout_ms: u64,
    /// Simulated only: mean latency of a call.
    pub latency_ms: u64,
    /// Simulated only: latency varies uniformly by up to this much either way.
    pub jitter_ms: u64,
    /// Simulated only: share of calls (0..1) that fail with a transient error.
    pub error_rate: f64,
    /// Words that trip the provider's content filter (case-insensitive): the
    /// simulated kind refuses them; for every kind, `ticketflow config` warns about our
    /// own prompts and policy texts that contain one.
    pub filter_words: Vec<String>,
    /// Simulated only: how a refusal looks.
    pub refusal_style: RefusalStyle,
    /// Models served by this provider, with prices.
    pub models: BTreeMap<String, ModelSettings>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelSettings {
    /// USD per million input tokens.
    pub input_usd_per_mtok: f64,
    /// USD per million cached input tokens (prompt-cache hits).
    pub cached_input_usd_per_mtok: f64,
    /// USD per million output tokens.
    pub output_usd_per_mtok: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TriageSettings {
    /// Models tried in order for triage (`provider/model`).
    pub chain: Vec<String>,
    /// Models used when a triage model refused the ticket and our own check passed.
    pub bypass_chain: Vec<String>,
    /// The category enum the triage model must answer with.
    pub categories: Vec<String>,
    /// Local keyword flags (e.g. `legal`, `safety`, `angry`), multilingual,
    /// matched case-insensitively against customer messages.
    pub keywords: BTreeMap<String, Vec<String>>,
    /// Keywords that suggest each category, for the heuristic fallback and the
    /// simulated providers' classifier.
    pub category_keywords: BTreeMap<String, Vec<String>>,
    /// Latin-script languages (ISO 639-1) that ticket text is told apart among;
    /// languages with a script of their own need no entry.
    pub latin_languages: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TierSettings {
    /// Models tried in order (`provider/model`).
    pub chain: Vec<String>,
    /// Models used after a refusal whose own moderation check passed.
    pub bypass_chain: Vec<String>,
    /// Extra instruction for this tier's reply prompt.
    pub instruction: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutingSettings {
    pub rules: Vec<Rule>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModerationMode {
    /// A local word list.
    Local,
    /// A moderation model through `moderation.chain`, the word list as its fallback.
    Model,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModerationSettings {
    pub mode: ModerationMode,
    /// Models (`provider/model`) asked in `model` mode, in order.
    pub chain: Vec<String>,
    /// Phrases that make our own check flag a ticket (case-insensitive); in `model`
    /// mode, the fallback when no moderation model answers.
    pub flag_words: Vec<String>,
}

/// Where to look for `config/<TICKETFLOW_ENV>.toml`.
fn config_dir() -> PathBuf {
    std::env::var_os("TICKETFLOW_CONFIG_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("config"))
}

impl Settings {
    /// Reads the layers (`overlay` after `config_file`, before the environment) and
    /// runs the checks that need nothing but the settings. `Ok` carries the settings
    /// and every problem found so far, so that the domain checks of `policy` can add
    /// theirs and all are reported at once; `Err` means nothing could be read.
    pub fn read_layers(
        config_file: Option<&Path>,
        overlay: Option<&Path>,
        env: &BTreeMap<String, String>,
    ) -> Result<(Settings, Vec<String>), ConfigError> {
        use config::{Config, Environment, File, FileFormat};
        let mut builder = Config::builder().add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml));
        if let Some(profile) = env.get("TICKETFLOW_ENV").filter(|p| !p.is_empty()) {
            let path = config_dir().join(format!("{profile}.toml"));
            if path.exists() {
                builder = builder.add_source(File::from(path).format(FileFormat::Toml));
            } else if profile != "default" {
                // A named environment with no file is almost always a typo or a missing mount.
                return Err(ConfigError::one(format!(
                    "TICKETFLOW_ENV={profile} but {} does not exist",
                    path.display()
                )));
            }
        }
        for path in config_file.into_iter().chain(overlay) {
            if !path.exists() {
                return Err(ConfigError::one(format!("config file {} does not exist", path.display())));
            }
            builder = builder.add_source(File::from(path).format(FileFormat::Toml));
        }
        let vars: config::Map<String, String> =
            env.iter().filter(|(k, _)| k.starts_with("TICKETFLOW__")).map(|(k, v)| (k.clone(), v.clone())).collect();
        builder = builder.add_source(
            Environment::with_prefix("TICKETFLOW")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars)),
        );
        // A value of the wrong type stops deserialization at the first one. To name
        // every one at once, each offending key is set back to its default and the
        // configuration read again, until it reads or a key has no default.
        let defaults = Config::builder()
            .add_source(File::from_str(DEFAULT_TOML, FileFormat::Toml))
            .build()
            .map_err(|e| ConfigError::one(e.to_string()))?;
        let mut type_errors = Vec::new();
        let mut unknown = Vec::new();
        let parsed = loop {
            let cfg = builder.clone().build().map_err(|e| ConfigError::one(e.to_string()))?;
            unknown.clear();
            let input: Option<serde_json::Value> = cfg.clone().try_deserialize().ok();
            match serde_ignored::deserialize::<_, _, Settings>(cfg, |path| unknown.push(path.to_string())) {
                Ok(settings) => break Ok((settings, input)),
                Err(e) => {
                    let key = match &e {
                        config::ConfigError::Type { key: Some(key), .. } => Some(key.clone()),
                        _ => None,
                    };
                    type_errors.push(e.to_string());
                    let fallback = key.as_ref().and_then(|k| defaults.get::<config::Value>(k).ok().map(|v| (k, v)));
                    match fallback {
                        Some((key, value)) if type_errors.len() < 64 => {
                            builder = builder
                                .set_override(key.as_str(), value)
                                .map_err(|e| ConfigError::one(e.to_string()))?;
                        }
                        _ => break Err(()),
                    }
                }
            }
        };
        let mut problems: Vec<String> = unknown.into_iter().map(|key| format!("unknown key `{key}`")).collect();
        problems.extend(type_errors);
        match parsed {
            Ok((settings, input)) => {
                // The configuration library rounds a fraction read into an integer
                // (2.5 becomes 3): compare what was written with what was read.
                if let (Some(input), Ok(read)) = (input, serde_json::to_value(&settings)) {
                    rounded_fractions(&input, &read, "", &mut problems);
                }
                problems.extend(settings.validate());
                Ok((settings, problems))
            }
            Err(()) => Err(ConfigError { problems }),
        }
    }

    /// The time zone of the budgets' days (validation rejects unknown names; UTC
    /// stands in for one only in settings never validated).
    pub fn budget_zone(&self) -> chrono_tz::Tz {
        self.limits.budget_time_zone.parse().unwrap_or(chrono_tz::Tz::UTC)
    }

    /// The worker identity: configured, or generated. Generated identities differ
    /// per call: a process resolves its identity once at start (see
    /// `policy::resolve_identity`), so that its outputs and claims all carry one.
    pub fn worker_id(&self) -> String {
        if self.worker.id.is_empty() {
            format!("worker-{:04x}", rand::random::<u16>())
        } else {
            self.worker.id.clone()
        }
    }
}

/// Names every key where a number with a fraction was written and an integer was
/// read: an error, not a rounding.
fn rounded_fractions(input: &serde_json::Value, read: &serde_json::Value, path: &str, problems: &mut Vec<String>) {
    use serde_json::Value;
    match (input, read) {
        (Value::Number(n), Value::Number(r))
            if (r.is_u64() || r.is_i64()) && n.as_f64().is_some_and(|f| f.fract() != 0.0) =>
        {
            problems.push(format!("invalid type: {n} is not an integer, for key `{path}`"));
        }
        (Value::Object(i), Value::Object(r)) => {
            for (key, value) in i {
                if let Some(other) = r.get(key) {
                    let path = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                    rounded_fractions(value, other, &path, problems);
                }
            }
        }
        (Value::Array(i), Value::Array(r)) => {
            for (n, (value, other)) in i.iter().zip(r).enumerate() {
                rounded_fractions(value, other, &format!("{path}[{n}]"), problems);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn shipped_defaults_are_valid() {
        let s = crate::policy::load_from(None, &env(&[])).unwrap();
        for name in ["qwen", "openai", "anthropic", "mistral", "deepseek"] {
            assert_eq!(s.providers[name].kind, ProviderKind::Simulated, "{name}");
        }
    }

    #[test]
    fn environment_overrides_fixed_keys() {
        let s = crate::policy::load_from(
            None,
            &env(&[
                ("TICKETFLOW__BROKER__KIND", "rabbitmq"),
                ("TICKETFLOW__PROVIDERS__QWEN__BASE_URL", "http://127.0.0.1:8089/v1"),
                ("TICKETFLOW__PROVIDERS__QWEN__LATENCY_MS", "7"),
                ("TICKETFLOW__LIMITS__MAX_IN_FLIGHT", "33"),
                ("TICKETFLOW__DATABASE__URL", "postgres://a:b@h/db"),
            ]),
        )
        .unwrap();
        assert_eq!(s.broker.kind, BrokerKind::Rabbitmq);
        assert_eq!(s.providers["qwen"].base_url, "http://127.0.0.1:8089/v1");
        assert_eq!(s.providers["qwen"].latency_ms, 7);
        assert_eq!(s.limits.max_in_flight, 33);
        assert_eq!(s.database.url, "postgres://a:b@h/db");
    }

    #[test]
    fn every_unknown_key_is_named() {
        let err = crate::policy::load_from(
            None,
            &env(&[("TICKETFLOW__LIMITS__MAX_INFLIGHT", "3"), ("TICKETFLOW__NOPE", "1")]),
        )
        .unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("limits.max_inflight"), "{all}");
        assert!(all.contains("nope"), "{all}");
    }

    #[test]
    fn cross_field_problems_are_all_listed() {
        let err = crate::policy::load_from(
            None,
            &env(&[
                ("TICKETFLOW__LIMITS__MAX_IN_FLIGHT", "0"),
                ("TICKETFLOW__PRICING__BASELINE_MODEL", "nobody/nothing"),
            ]),
        )
        .unwrap_err();
        assert_eq!(err.problems.len(), 2, "{:?}", err.problems);
    }
}
