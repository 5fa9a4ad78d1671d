//! Kafka through rdkafka (librdkafka): the client configuration every consumer,
//! producer and admin client shares (bootstrap servers, security, the passthrough
//! properties), the consumer ([`consume`]) with its offset bookkeeping ([`offsets`]),
//! the idempotent producer ([`publish`]) and topic creation ([`topics`]).

pub mod consume;
pub mod offsets;
pub mod progress;
pub mod publish;
pub mod topics;

use rdkafka::ClientConfig;

use crate::settings::KafkaSettings;

/// The header carrying how many times operators replayed a message.
pub const REPLAY_COUNT_HEADER: &str = "replay_count";

/// How many times a message was replayed: its [`REPLAY_COUNT_HEADER`], 0 without one
/// (or with one that is not a whole number).
pub fn replay_count(message: &impl rdkafka::message::Message) -> u32 {
    use rdkafka::message::Headers as _;
    message
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == REPLAY_COUNT_HEADER))
        .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        .unwrap_or(0)
}

/// A Kafka failure, in one readable line.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    #[error("broker.kafka: {0}")]
    Config(String),
    #[error("Kafka at {servers}: {reason}")]
    Broker { servers: String, reason: String },
}

/// The properties shared by every client: the passthrough map first, then ours.
pub fn client_config(settings: &KafkaSettings) -> Result<ClientConfig, KafkaSetupError> {
    let mut config = ClientConfig::new();
    for (key, value) in &settings.properties {
        config.set(key, value);
    }
    config.set("bootstrap.servers", &settings.bootstrap_servers).set("security.protocol", &settings.security_protocol);
    if settings.security_protocol.starts_with("sasl") {
        let secret = |var: &str, what: &str| {
            std::env::var(var).map_err(|_| {
                KafkaSetupError::Config(format!(
                    "the SASL {what} is read from the environment variable {var}, which is not set"
                ))
            })
        };
        config
            .set("sasl.mechanism", &settings.sasl_mechanism)
            .set("sasl.username", secret(&settings.sasl_username_env, "user name")?)
            .set("sasl.password", secret(&settings.sasl_password_env, "password")?);
    }
    for (key, path) in [
        ("ssl.ca.location", &settings.ssl_ca_file),
        ("ssl.certificate.location", &settings.ssl_certificate_file),
        ("ssl.key.location", &settings.ssl_key_file),
    ] {
        if !path.is_empty() {
            config.set(key, path);
        }
    }
    Ok(config)
}

/// A librdkafka error as a phrase.
pub fn reason(e: &rdkafka::error::KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("{e} ({code:?})"),
        None => e.to_string(),
    }
}
