//! RabbitMQ through lapin: connecting with the configured settings (heartbeat,
//! connection name, TLS) and declaring the topology ([`topology`]). The worker's
//! [`link::Link`] keeps a connection up; the consumer ([`consume`]) and the confirmed
//! publisher ([`publish`]) build on it.

pub mod consume;
pub mod link;
pub mod publish;
pub mod shards;
pub mod topology;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};

use crate::settings::{redact_url, RabbitSettings};

/// A RabbitMQ failure, with the broker's own words where it gave any.
#[derive(Debug, thiserror::Error)]
pub enum RabbitError {
    #[error("cannot connect to RabbitMQ at {url}: {reason}")]
    Connect { url: String, reason: String },
    #[error("{what}: {reason}")]
    Broker { what: String, reason: String },
    /// A queue or exchange exists with other settings than ours.
    #[error("{what} exists with other settings: {reason}; delete it (it must be empty) or change the configuration to match")]
    Mismatch { what: String, reason: String },
    /// A plugin the configuration needs is not enabled.
    #[error("{reason}")]
    Plugin { reason: String },
    #[error("broker.rabbitmq.{key} {path}: {reason}")]
    Tls { key: &'static str, path: String, reason: String },
}

/// Connects with the configured heartbeat and connection name (`worker_id` when the
/// settings name none).
pub async fn connect(settings: &RabbitSettings, worker_id: &str) -> Result<Connection, RabbitError> {
    let name = if settings.connection_name.is_empty() {
        format!("ticketflow {worker_id}")
    } else {
        settings.connection_name.clone()
    };
    let url = with_heartbeat(&settings.url, settings.heartbeat_secs);
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    let tls = tls_config(settings)?;
    let runtime = lapin::runtime::default_runtime()
        .map_err(|e| RabbitError::Connect { url: redact_url(&settings.url), reason: reason(&e) })?;
    Connection::connect_with_config(&url, properties, tls, runtime)
        .await
        .map_err(|e| RabbitError::Connect { url: redact_url(&settings.url), reason: reason(&e) })
}

/// The TLS material named by the settings (used by `amqps://` URLs only).
fn tls_config(settings: &RabbitSettings) -> Result<OwnedTLSConfig, RabbitError> {
    let read = |key: &'static str, path: &str| -> Result<Option<Vec<u8>>, RabbitError> {
        if path.is_empty() {
            return Ok(None);
        }
        let bytes =
            std::fs::read(path).map_err(|e| RabbitError::Tls { key, path: path.to_owned(), reason: e.to_string() })?;
        if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(RabbitError::Tls { key, path: path.to_owned(), reason: "not a PEM file".into() });
        }
        Ok(Some(bytes))
    };
    let cert_chain = read("tls_ca_file", &settings.tls_ca_file)?.map(|b| String::from_utf8_lossy(&b).into_owned());
    let cert = read("tls_client_cert_file", &settings.tls_client_cert_file)?;
    let key = read("tls_client_key_file", &settings.tls_client_key_file)?;
    let identity = match (cert, key) {
        (Some(pem), Some(key)) => Some(OwnedIdentity::PKCS8 { pem, key }),
        _ => None,
    };
    Ok(OwnedTLSConfig { identity, cert_chain })
}

/// How long a clean close may wait for the broker's answer: a connection whose
/// socket is already gone never answers.
const CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Closes `conn` cleanly (code 200, or 320 when giving it up), without waiting
/// forever for a broker that cannot answer.
pub async fn close(conn: &Connection, code: u16, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, conn.close(code, why.into())).await;
}

/// Closes `channel` the same way.
pub async fn close_channel(channel: &lapin::Channel, why: &str) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, why.into())).await;
}

/// The URL with the heartbeat as a query parameter, unless it sets one itself.
fn with_heartbeat(url: &str, heartbeat_secs: u16) -> String {
    if url.contains("heartbeat=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&heartbeat={heartbeat_secs}")
    } else {
        format!("{url}?heartbeat={heartbeat_secs}")
    }
}

/// A lapin error as one readable phrase: the broker's message for protocol errors.
pub fn reason(e: &lapin::Error) -> String {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => amqp.get_message().to_string(),
        _ => e.to_string(),
    }
}

/// The AMQP reply code of a broker error (404 not found, 406 precondition failed).
fn code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_joins_the_url_unless_it_has_one() {
        assert_eq!(with_heartbeat("amqp://h/%2f", 30), "amqp://h/%2f?heartbeat=30");
        assert_eq!(with_heartbeat("amqp://h/v?channel_max=9", 5), "amqp://h/v?channel_max=9&heartbeat=5");
        assert_eq!(with_heartbeat("amqp://h/v?heartbeat=7", 30), "amqp://h/v?heartbeat=7");
    }
}
