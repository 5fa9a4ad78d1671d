//! Message brokers: where tickets come from and where outputs go.
//!
//! A [`Source`] yields [`Delivery`]s, each carrying its own [`Acker`]; a [`Publisher`]
//! publishes one unit's [`Output`] and returns only once it is confirmed. The
//! pipeline knows nothing else about brokers: Kafka, RabbitMQ and the in-memory
//! queue of `ticketflow process` all plug in here.

pub mod files;
pub mod memory;

use async_trait::async_trait;

use crate::ticket::{Output, SourceRef};

/// One message received from the input topic or queue.
pub struct Delivery {
    /// The raw message bytes. May be cut short for an oversized message, see `full_len`.
    pub payload: bytes::Bytes,
    /// Size of the message as received, when the source had to cut `payload` short
    /// to stay within memory bounds.
    pub full_len: Option<u64>,
    pub source: SourceRef,
    /// How many times operators replayed this message from the dead-letter topic.
    pub replay_count: u32,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("source", &self.source)
            .field("bytes", &self.payload.len())
            .field("replay_count", &self.replay_count)
            .finish()
    }
}

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("publish not confirmed: {0}")]
    Publish(String),
    #[error("acknowledgement failed: {0}")]
    Ack(String),
}

/// Settles one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is done: its output is published and recorded.
    async fn ack(self: Box<Self>) -> Result<(), BrokerError>;
    /// The message was not done; `requeue` hands it back for another attempt.
    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError>;
}

/// Where deliveries come from.
#[async_trait]
pub trait Source: Send {
    /// The next delivery; `None` when the input is exhausted or closed.
    async fn recv(&mut self) -> Option<Delivery>;
}

/// Where outputs go.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes a unit's reply or dead letter and its cost records; returns once
    /// they are durably accepted.
    async fn publish(&self, output: &Output) -> Result<(), BrokerError>;
}
