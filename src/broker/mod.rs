//! Message brokers: where tickets come from and where outputs go.
//!
//! A [`Source`] yields [`SourceEvent`]s: deliveries, and the lanes (Kafka partitions,
//! a RabbitMQ queue, a file) it is assigned or loses. Each [`Delivery`] pairs the
//! message data ([`Message`], all the pipeline ever sees) with the [`Acker`] that
//! settles it (the dispatcher's business). A [`Publisher`] publishes one unit's
//! [`Output`] and returns only once it is confirmed. Kafka, RabbitMQ and the
//! in-memory queue of `ticketflow process` all plug in here.

pub mod files;
pub mod kafka;
pub mod memory;
pub mod rabbitmq;

use async_trait::async_trait;
use tokio::sync::oneshot;

use crate::ticket::{Output, SourceRef};

/// The data of one message received from the input topic or queue.
#[derive(Clone)]
pub struct Message {
    /// The raw message bytes. May be cut short for an oversized message, see `full_len`.
    pub payload: bytes::Bytes,
    /// Size of the message as received, when the source had to cut `payload` short
    /// to stay within memory bounds.
    pub full_len: Option<u64>,
    pub source: SourceRef,
    /// The ordering key: messages with the same key are processed one at a time, in
    /// arrival order. The Kafka message key, the AMQP `conversation_id` header, or the
    /// ticket's `conversation_id` for files; `None` orders the message with nothing.
    pub key: Option<String>,
    /// The broker delivered this message before (AMQP `redelivered`, a requeue).
    pub redelivered: bool,
    /// The source's partition and offset name this message for good, so a copy
    /// delivered again carries the same ones (Kafka); false where an offset names one
    /// delivery only (an AMQP delivery tag) or a line of whichever file is read.
    pub stable_offset: bool,
    /// How many times operators replayed this message from the dead-letter topic.
    pub replay_count: u32,
}

impl Message {
    /// The lane this message travels in.
    pub fn lane(&self) -> Lane {
        Lane { topic: self.source.topic.clone(), partition: self.source.partition }
    }
}

impl std::fmt::Debug for Message {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Message")
            .field("source", &self.source)
            .field("bytes", &self.payload.len())
            .field("redelivered", &self.redelivered)
            .field("replay_count", &self.replay_count)
            .finish()
    }
}

/// A message and what settles it.
pub struct Delivery {
    pub message: Message,
    pub acker: Box<dyn Acker>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.message.fmt(f)
    }
}

/// A unit of flow control and ownership: a Kafka partition, a queue, an input file.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lane {
    pub topic: String,
    pub partition: i32,
}

/// What a source reports.
#[derive(Debug)]
pub enum SourceEvent {
    Delivery(Delivery),
    /// These lanes are now ours (Kafka assignment).
    Assigned(Vec<Lane>),
    /// These lanes are taken away (Kafka rebalance). The dispatcher hands back their
    /// deliveries that have not started, lets the started ones finish (abandoning them
    /// at its drain deadline), settles every one, and then sends on `drained`; the
    /// source completes the revocation only after that.
    Revoked {
        lanes: Vec<Lane>,
        drained: oneshot::Sender<()>,
    },
}

/// A broker failure.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The broker did not confirm a publish (down, unreachable, timed out): retrying
    /// after the broker recovers helps, so it does not count as a failed attempt.
    #[error("publish not confirmed: {0}")]
    Publish(String),
    /// The broker refused this output for good (too large, malformed): retrying the
    /// same output cannot help.
    #[error("publish refused: {0}")]
    Refused(String),
    #[error("acknowledgement failed: {0}")]
    Ack(String),
    /// The source cannot go on (connection lost for good, authentication refused).
    #[error("broker failure: {0}")]
    Source(String),
}

/// Settles one delivery.
#[async_trait]
pub trait Acker: Send + Sync {
    /// The message is done: its output is published and recorded.
    async fn ack(self: Box<Self>) -> Result<(), BrokerError>;
    /// The message was not done; `requeue` hands it back for another attempt (or
    /// another worker). The dispatcher requeues only what it abandons or hands back:
    /// retries of a failing message happen in its lane, never through the broker.
    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError>;
}

/// Where deliveries come from.
#[async_trait]
pub trait Source: Send {
    /// The next event; `Ok(None)` when the input is exhausted or closed. Must be
    /// cancel-safe: the dispatcher polls it in a `select!`.
    async fn next(&mut self) -> Result<Option<SourceEvent>, BrokerError>;

    /// Stop yielding deliveries of these lanes until [`Source::resume`]. Events other
    /// than deliveries keep flowing, so a Kafka consumer keeps polling (and keeps its
    /// group membership) while intake is paused.
    fn pause(&mut self, lanes: &[Lane]) -> Result<(), BrokerError>;

    fn resume(&mut self, lanes: &[Lane]) -> Result<(), BrokerError>;
}

/// Where outputs go.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes a unit's reply or dead letter and its cost records; returns once
    /// they are durably accepted.
    async fn publish(&self, output: &Output) -> Result<(), BrokerError>;
}

/// Object-safe serialization to JSON bytes, so one closure serves every output type.
pub(crate) trait ToJson {
    fn to_json(&self) -> serde_json::Result<Vec<u8>>;
}

impl<T: serde::Serialize> ToJson for T {
    fn to_json(&self) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(self)
    }
}
