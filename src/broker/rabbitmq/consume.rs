//! Consuming the input queue: manual acks, `basic_qos` prefetch bounding what the
//! broker sends ahead (twice the in-flight budget, what the dispatcher may hold),
//! and each AMQP delivery turned into a [`Message`] with its ordering key (the
//! `conversation_id` header, or the ticket's own `conversation_id` when a producer
//! set no header) and its replay count (the `x-replay-count` header).
//!
//! The queue is one lane. An acker settles its delivery on the channel it came on;
//! once that channel is gone the broker redelivers the message, and settling it is
//! a logged no-op.

use async_trait::async_trait;
use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, Consumer};

use super::{reason, RabbitError};
use crate::broker::{Acker, BrokerError, Delivery, Lane, Message, Source, SourceEvent};
use crate::intake;
use crate::ticket::SourceRef;

/// The header carrying how many times operators replayed a message.
pub const REPLAY_COUNT_HEADER: &str = "x-replay-count";
/// The header carrying a ticket's ordering key.
pub const CONVERSATION_HEADER: &str = "conversation_id";

/// The consumer of the input queue.
pub struct RabbitSource {
    consumer: Consumer,
    queue: String,
    paused: bool,
}

impl RabbitSource {
    /// Starts consuming `queue` with `prefetch` unacknowledged deliveries at most.
    pub async fn start(conn: &Connection, queue: &str, prefetch: u16, tag: &str) -> Result<Self, RabbitError> {
        let broker = |e: lapin::Error| RabbitError::Broker { what: format!("consuming `{queue}`"), reason: reason(&e) };
        let channel = conn.create_channel().await.map_err(broker)?;
        channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await.map_err(broker)?;
        let consumer = channel
            .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .map_err(broker)?;
        Ok(RabbitSource { consumer, queue: queue.to_owned(), paused: false })
    }

    fn message(&self, d: &lapin::message::Delivery) -> Message {
        let headers = d.properties.headers().as_ref();
        let header = |name: &str| headers.and_then(|h| h.inner().get(name).cloned());
        let key = header(CONVERSATION_HEADER)
            .and_then(|v| v.as_long_string().map(|s| s.to_string()))
            .or_else(|| intake::conversation_key(&d.data));
        let replay_count = header(REPLAY_COUNT_HEADER).and_then(|v| as_u32(&v)).unwrap_or(0);
        Message {
            payload: bytes::Bytes::from(d.data.clone()),
            full_len: None,
            source: SourceRef { topic: self.queue.clone(), partition: 0, offset: d.delivery_tag as i64 },
            key,
            redelivered: d.redelivered,
            replay_count,
        }
    }
}

fn as_u32(v: &AMQPValue) -> Option<u32> {
    match v {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.parse().ok(),
        AMQPValue::ShortShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::ShortShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

#[async_trait]
impl Source for RabbitSource {
    async fn next(&mut self) -> Result<Option<SourceEvent>, BrokerError> {
        if self.paused {
            // Unacknowledged deliveries are bounded by the prefetch: while paused the
            // broker sends at most that many ahead, and they wait here.
            std::future::pending::<()>().await;
        }
        match self.consumer.next().await {
            Some(Ok(d)) => {
                let message = self.message(&d);
                Ok(Some(SourceEvent::Delivery(Delivery { message, acker: Box::new(RabbitAcker(d.acker)) })))
            }
            Some(Err(e)) => Err(BrokerError::Source(format!("consuming `{}`: {}", self.queue, reason(&e)))),
            None => Err(BrokerError::Source(format!("the broker cancelled the consumer of `{}`", self.queue))),
        }
    }

    fn pause(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        self.paused = false;
        Ok(())
    }
}

/// Settles one AMQP delivery on the channel it came on.
struct RabbitAcker(lapin::Acker);

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        match self.0.ack(BasicAckOptions::default()).await {
            Ok(_) => Ok(()),
            Err(e) => Err(BrokerError::Ack(reason(&e))),
        }
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        match self.0.nack(BasicNackOptions { requeue, ..BasicNackOptions::default() }).await {
            Ok(_) => Ok(()),
            Err(e) => Err(BrokerError::Ack(reason(&e))),
        }
    }
}
