//! Consuming the input queue: manual acks, `basic_qos` prefetch bounding what the
//! broker sends ahead (twice the in-flight budget, what the dispatcher may hold),
//! and each AMQP delivery turned into a [`Message`] with its ordering key (the
//! `conversation_id` header, or the ticket's own `conversation_id` when a producer
//! set no header) and its replay count (the `x-replay-count` header).
//!
//! Each consumer (one per connection of the [`Link`]) is a lane, numbered by the
//! connection's generation: a message's `source.partition` is that number and its
//! `source.offset` the delivery tag on that channel. When a consumer ends, its lane
//! is revoked and the link reconnects; the new consumer's lane is then assigned. An
//! acker settles its delivery on the channel it came on; once that channel is gone
//! the broker redelivers the message, and settling it is a logged no-op.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, Consumer};
use tokio::sync::{mpsc, oneshot};

use super::link::Link;
use super::{reason, RabbitError};
use crate::broker::{Acker, BrokerError, Delivery, Lane, Message, Source, SourceEvent};
use crate::intake;
use crate::ticket::SourceRef;

/// The header carrying how many times operators replayed a message.
pub const REPLAY_COUNT_HEADER: &str = "x-replay-count";
/// The header carrying a ticket's ordering key.
pub const CONVERSATION_HEADER: &str = "conversation_id";
/// The header quorum queues set to the number of earlier deliveries of a message.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Starts consuming `queue` on a channel of its own, with `prefetch` unacknowledged
/// deliveries at most.
pub(super) async fn subscribe(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    tag: &str,
) -> Result<Consumer, RabbitError> {
    let broker = |e: lapin::Error| RabbitError::Broker { what: format!("consuming `{queue}`"), reason: reason(&e) };
    let channel = conn.create_channel().await.map_err(broker)?;
    channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await.map_err(broker)?;
    channel
        .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(broker)
}

/// The consumer of the input queue, across reconnections.
pub struct RabbitSource {
    queue: String,
    link: Arc<Link>,
    /// The current consumer and its generation; `None` between a loss and the
    /// link's next connection.
    current: Option<(u32, Consumer)>,
    /// Consumers of new connections, from the link's supervisor.
    fresh: mpsc::Receiver<(u32, Consumer)>,
    pending: VecDeque<SourceEvent>,
    paused: bool,
    /// Delivery limit of the queue, for the warning when a message nears it.
    delivery_limit: u32,
}

impl RabbitSource {
    pub(super) fn new(queue: &str, link: Arc<Link>, first: Consumer, fresh: mpsc::Receiver<(u32, Consumer)>) -> Self {
        let delivery_limit = link.delivery_limit();
        RabbitSource {
            queue: queue.to_owned(),
            link,
            current: Some((0, first)),
            fresh,
            pending: VecDeque::new(),
            paused: false,
            delivery_limit,
        }
    }

    fn lane(&self, generation: u32) -> Lane {
        Lane { topic: self.queue.clone(), partition: generation as i32 }
    }

    fn revoked(&self, generation: u32) -> SourceEvent {
        // Nothing waits for the drain: the lost channel's deliveries are the
        // broker's again already.
        let (drained, _) = oneshot::channel();
        SourceEvent::Revoked { lanes: vec![self.lane(generation)], drained }
    }

    fn message(&self, generation: u32, d: &lapin::message::Delivery) -> Message {
        let headers = d.properties.headers().as_ref();
        let header = |name: &str| headers.and_then(|h| h.inner().get(name).cloned());
        let key = header(CONVERSATION_HEADER)
            .and_then(|v| v.as_long_string().map(|s| s.to_string()))
            .or_else(|| intake::conversation_key(&d.data));
        let replay_count = header(REPLAY_COUNT_HEADER).and_then(|v| as_u32(&v)).unwrap_or(0);
        let deliveries = header(DELIVERY_COUNT_HEADER).and_then(|v| as_u32(&v)).unwrap_or(0);
        if deliveries.saturating_add(2) >= self.delivery_limit {
            tracing::warn!(
                queue = %self.queue,
                earlier_deliveries = deliveries,
                delivery_limit = self.delivery_limit,
                "a message nears the queue's delivery limit: handed back again, the broker dead-letters it to the dead-letter queue (replayable)"
            );
        }
        Message {
            payload: bytes::Bytes::from(d.data.clone()),
            full_len: None,
            source: SourceRef {
                topic: self.queue.clone(),
                partition: generation as i32,
                offset: d.delivery_tag as i64,
            },
            key,
            redelivered: d.redelivered,
            stable_offset: false,
            replay_count,
        }
    }
}

/// The next delivery of the current consumer; pending while there is none.
async fn next_of(current: &mut Option<(u32, Consumer)>) -> Option<Result<lapin::message::Delivery, lapin::Error>> {
    match current {
        Some((_, consumer)) => consumer.next().await,
        None => std::future::pending().await,
    }
}

/// A numeric AMQP header value (any integer type, or a number as a string).
pub(crate) fn as_u32(v: &AMQPValue) -> Option<u32> {
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
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            // While paused, deliveries wait here (the prefetch bounds how many the
            // broker sends ahead), but a new connection's consumer is still taken.
            let deliver = !self.paused;
            tokio::select! {
                biased;
                fresh = self.fresh.recv() => match fresh {
                    Some((generation, consumer)) => {
                        if let Some((old, _)) = self.current.take() {
                            self.pending.push_back(self.revoked(old));
                        }
                        self.current = Some((generation, consumer));
                        self.pending.push_back(SourceEvent::Assigned(vec![self.lane(generation)]));
                    }
                    // The link is closed: the worker is stopping.
                    None => return Ok(None),
                },
                delivery = next_of(&mut self.current), if deliver => match delivery {
                    Some(Ok(d)) => {
                        let Some((generation, _)) = self.current else { continue };
                        let message = self.message(generation, &d);
                        self.link.activity.delivered();
                        let acker = Box::new(RabbitAcker { acker: d.acker, link: self.link.clone(), generation });
                        return Ok(Some(SourceEvent::Delivery(Delivery { message, acker })));
                    }
                    ended => {
                        let why = match ended {
                            Some(Err(e)) => format!("consuming `{}`: {}", self.queue, reason(&e)),
                            _ => format!("the broker cancelled the consumer of `{}`", self.queue),
                        };
                        if let Some((generation, _)) = self.current.take() {
                            self.link.lost(generation, why);
                            self.pending.push_back(self.revoked(generation));
                        }
                    }
                },
            }
        }
    }

    fn pause(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        self.paused = true;
        self.link.activity.paused.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn resume(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        self.paused = false;
        self.link.activity.paused.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// How long an ack or nack may take to be written. lapin resolves it once the frame
/// is on the socket; a connection whose I/O loop died never resolves it.
const SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Settles one AMQP delivery on the channel it came on; a no-op (logged) once that
/// channel is gone, since the broker has taken the message back.
struct RabbitAcker {
    acker: lapin::Acker,
    link: Arc<Link>,
    generation: u32,
}

impl RabbitAcker {
    fn settled(
        &self,
        what: &str,
        result: Result<Result<bool, lapin::Error>, tokio::time::error::Elapsed>,
    ) -> Result<(), BrokerError> {
        let Ok(result) = result else {
            // The connection is beyond use: the link replaces it, and the broker takes
            // the message back with it.
            tracing::warn!("{what} not written within {SETTLE_TIMEOUT:?}: the connection is stuck; reconnecting");
            self.link.lost(self.generation, format!("an {what} was not written within {SETTLE_TIMEOUT:?}"));
            return Ok(());
        };
        match result {
            Ok(true) => Ok(()),
            Ok(false) => {
                tracing::debug!("{what} skipped: the delivery's channel is gone and the broker redelivers the message");
                Ok(())
            }
            Err(_) if self.acker.poisoned() => {
                tracing::debug!("{what} skipped: the delivery's channel closed and the broker redelivers the message");
                Ok(())
            }
            Err(e) => Err(BrokerError::Ack(reason(&e))),
        }
    }
}

impl Drop for RabbitAcker {
    fn drop(&mut self) {
        self.link.activity.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl Acker for RabbitAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        let result = tokio::time::timeout(SETTLE_TIMEOUT, self.acker.ack(BasicAckOptions::default())).await;
        self.settled("ack", result)
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        let options = BasicNackOptions { requeue, ..BasicNackOptions::default() };
        let result = tokio::time::timeout(SETTLE_TIMEOUT, self.acker.nack(options)).await;
        self.settled("nack", result)
    }
}
