//! Publishing with publisher confirms: every message persistent and mandatory, each
//! publish awaited until the broker confirms it. A nack, a returned (unroutable)
//! message or a dead channel is a failure, never a success.
//!
//! [`RabbitPublisher`] publishes a unit's outputs: the reply to the replies queue
//! (or the dead letter to the dead-letter queue) and each cost record to the costs
//! queue, through the default exchange, so the queues of SPEC §3 receive them by name.

use async_trait::async_trait;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::sync::Arc;

use lapin::{BasicProperties, Channel, Connection};

use super::link::Link;
use super::{reason, RabbitError};
use crate::broker::{BrokerError, Publisher, ToJson};
use crate::settings::TopicSettings;
use crate::ticket::Output;

/// Delivery mode 2: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// How long sending a message, and then its confirmation, may take. A healthy broker
/// confirms in milliseconds (a blocked one, during a resource alarm, may take longer);
/// on a connection whose I/O loop died, lapin would leave the wait hanging forever.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// How a publish that timed out is reported, and recognised.
const NO_ANSWER: &str = "no answer from the broker within";

/// A channel in confirm mode.
#[derive(Clone)]
pub struct Confirmed {
    channel: Channel,
}

impl Confirmed {
    pub async fn open(conn: &Connection) -> Result<Self, RabbitError> {
        let broker =
            |e: lapin::Error| RabbitError::Broker { what: "opening a publishing channel".into(), reason: reason(&e) };
        let channel = conn.create_channel().await.map_err(broker)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(broker)?;
        Ok(Confirmed { channel })
    }

    /// Whether the channel is still open.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// Publishes `payload` to `queue` and waits for the broker's confirmation.
    /// `headers` travel as AMQP headers (string values).
    pub async fn publish(
        &self,
        queue: &str,
        payload: &[u8],
        message_id: &str,
        headers: &[(&str, &str)],
    ) -> Result<(), BrokerError> {
        self.send(queue, payload, message_id, headers).await?.confirmed().await
    }

    /// Sends a ticket to the input: to the sharded input's exchange with its
    /// conversation as routing key ([`super::shards::routing_key`]), or to the single
    /// input queue; its confirmation is awaited later ([`Unconfirmed::confirmed`]).
    pub async fn send_ticket(
        &self,
        input: &Input,
        payload: &[u8],
        message_id: &str,
        headers: &[(&str, &str)],
        conversation_id: &str,
    ) -> Result<Unconfirmed, BrokerError> {
        match input {
            Input::Queue(queue) => self.send(queue, payload, message_id, headers).await,
            Input::Sharded(exchange) => {
                let key = super::shards::routing_key(conversation_id);
                self.send_via(exchange, &key, exchange, payload, message_id, headers).await
            }
        }
    }

    /// Sends `payload` to `queue` without waiting for the confirmation: messages sent
    /// one after another keep their order in the queue, and their confirmations can
    /// be awaited later ([`Unconfirmed::confirmed`]).
    pub async fn send(
        &self,
        queue: &str,
        payload: &[u8],
        message_id: &str,
        headers: &[(&str, &str)],
    ) -> Result<Unconfirmed, BrokerError> {
        self.send_via("", queue, queue, payload, message_id, headers).await
    }

    /// Sends through `exchange` with `routing_key`; `to` names the destination in
    /// errors. A message id longer than an AMQP short string travels as its hash.
    async fn send_via(
        &self,
        exchange: &str,
        routing_key: &str,
        to: &str,
        payload: &[u8],
        message_id: &str,
        headers: &[(&str, &str)],
    ) -> Result<Unconfirmed, BrokerError> {
        let queue = to;
        let mut table = FieldTable::default();
        for (k, v) in headers {
            table.insert((*k).into(), AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())));
        }
        let properties = BasicProperties::default()
            .with_delivery_mode(PERSISTENT)
            .with_content_type("application/json".into())
            .with_message_id(super::shards::short(message_id).as_ref().into())
            .with_headers(table);
        let options = BasicPublishOptions { mandatory: true, ..BasicPublishOptions::default() };
        let publish = self.channel.basic_publish(exchange.into(), routing_key.into(), options, payload, properties);
        let confirm = match tokio::time::timeout(CONFIRM_TIMEOUT, publish).await {
            Ok(sent) => sent.map_err(|e| BrokerError::Publish(format!("publishing to `{queue}`: {}", reason(&e))))?,
            Err(_) => {
                return Err(BrokerError::Publish(format!("publishing to `{queue}`: {NO_ANSWER} {CONFIRM_TIMEOUT:?}")))
            }
        };
        Ok(Unconfirmed { queue: queue.to_owned(), confirm })
    }
}

/// Where tickets are published: the sharded input's exchange, or the single input
/// queue (`broker.rabbitmq.shards` = 0).
#[derive(Debug, Clone)]
pub enum Input {
    Queue(String),
    Sharded(String),
}

impl Input {
    pub fn of(broker: &crate::settings::BrokerSettings) -> Self {
        let input = broker.topics.input.clone();
        if broker.rabbitmq.shards == 0 {
            Input::Queue(input)
        } else {
            Input::Sharded(input)
        }
    }
}

/// A message sent and not yet confirmed.
pub struct Unconfirmed {
    queue: String,
    confirm: lapin::PublisherConfirm,
}

impl Unconfirmed {
    /// Waits for the broker: an ack is success; a nack, a returned (unroutable)
    /// message or a lost channel is a failure.
    pub async fn confirmed(self) -> Result<(), BrokerError> {
        let queue = self.queue;
        let confirm = match tokio::time::timeout(CONFIRM_TIMEOUT, self.confirm).await {
            Ok(confirm) => {
                confirm.map_err(|e| BrokerError::Publish(format!("publishing to `{queue}`: {}", reason(&e))))?
            }
            Err(_) => {
                return Err(BrokerError::Publish(format!("publishing to `{queue}`: {NO_ANSWER} {CONFIRM_TIMEOUT:?}")))
            }
        };
        if confirm.is_nack() {
            return Err(BrokerError::Publish(format!("the broker did not take the message for `{queue}`")));
        }
        let acked = confirm.is_ack();
        // Mandatory and unroutable: the queue does not exist. Waiting will not create
        // it, so the attempt counts (`ticketflow topics` creates it).
        if let Some(returned) = confirm.take_message() {
            return Err(BrokerError::Refused(format!(
                "`{queue}` does not exist (the broker returned the message: {}); run `ticketflow topics`",
                returned.reply_text
            )));
        }
        if acked {
            Ok(())
        } else {
            Err(BrokerError::Publish("the channel is not in confirm mode".into()))
        }
    }
}

/// Publishes units' outputs to the queues of `[broker.topics]`, on the publishing
/// channel of the link's current connection.
pub struct RabbitPublisher {
    link: Arc<Link>,
    topics: TopicSettings,
}

impl RabbitPublisher {
    pub fn new(link: Arc<Link>, topics: &TopicSettings) -> Self {
        RabbitPublisher { link, topics: topics.clone() }
    }

    /// Sends the cost records, then the reply or dead letter, one after another on
    /// one channel (so they reach their queues in that order), then waits for every
    /// confirmation: one round trip to the broker per unit, not one per message.
    async fn publish_on(&self, channel: &Confirmed, output: &Output) -> Result<(), BrokerError> {
        let json = |v: &dyn ToJson| v.to_json().map_err(|e| BrokerError::Refused(format!("serializing output: {e}")));
        let mut sent = Vec::with_capacity(output.costs().len() + 1);
        for c in output.costs() {
            sent.push(channel.send(&self.topics.costs, &json(c)?, &c.call_id, &[("ticket_id", &c.ticket_id)]).await?);
        }
        sent.push(match output {
            Output::Reply { reply, .. } => {
                let headers = [("conversation_id", reply.conversation_id.as_str()), ("ticket_id", &reply.ticket_id)];
                channel.send(&self.topics.replies, &json(reply)?, &reply.unit_id, &headers).await?
            }
            Output::DeadLetter { dead_letter, .. } => {
                let id = dead_letter.unit_id.as_deref().or(dead_letter.ticket_id.as_deref()).unwrap_or("");
                let kind = dead_letter.error.kind.as_str();
                channel.send(&self.topics.dead_letters, &json(dead_letter)?, id, &[("error_kind", kind)]).await?
            }
        });
        // Every confirmation is awaited, even after a failure, and the worst failure
        // wins: a refusal (counted) over a missing confirmation (retried uncounted).
        let mut result = Ok(());
        for unconfirmed in sent {
            match (unconfirmed.confirmed().await, &result) {
                (Ok(()), _) | (Err(_), Err(BrokerError::Refused(_))) => {}
                (Err(e), _) => result = Err(e),
            }
        }
        result
    }
}

#[async_trait]
impl Publisher for RabbitPublisher {
    async fn publish(&self, output: &Output) -> Result<(), BrokerError> {
        let Some(session) = self.link.session() else {
            return Err(BrokerError::Publish("not connected to RabbitMQ (reconnecting)".into()));
        };
        let result = self.publish_on(&session.publish, output).await;
        if let Err(BrokerError::Publish(e)) = &result {
            if !session.publish.is_open() {
                self.link.lost(session.generation, "the publishing channel closed".into());
            } else if e.contains(NO_ANSWER) {
                self.link.lost(session.generation, format!("the publishing channel is stuck: {e}"));
            }
        }
        result
    }
}
