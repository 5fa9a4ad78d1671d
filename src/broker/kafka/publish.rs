//! The idempotent producer (`enable.idempotence=true`, `acks=all`): a unit's cost
//! records (key `ticket_id`), then its reply (key `conversation_id`) or dead letter
//! (the ticket's key, `replay_count` header), sent together and each awaited until
//! the broker acknowledges it. A delivery failure is an error, never success.

use std::time::Duration;

use async_trait::async_trait;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use super::{client_config, KafkaSetupError, REPLAY_COUNT_HEADER};
use crate::broker::{BrokerError, Publisher, ToJson};
use crate::settings::{KafkaSettings, TopicSettings};
use crate::ticket::Output;

/// How long a message may wait in the producer's queue for room.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(10);

/// Creates the idempotent producer the worker, `produce` and `replay` share.
pub fn producer(settings: &KafkaSettings) -> Result<FutureProducer, KafkaSetupError> {
    client_config(settings)?
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        .create()
        .map_err(|e| KafkaSetupError::Broker { servers: settings.bootstrap_servers.clone(), reason: super::reason(&e) })
}

/// One message to send.
pub struct Record<'a> {
    pub topic: &'a str,
    pub key: Option<&'a str>,
    pub payload: &'a [u8],
    pub headers: &'a [(&'a str, &'a str)],
}

/// Sends `record` and waits for the broker's acknowledgement.
pub async fn send(producer: &FutureProducer, record: Record<'_>) -> Result<(i32, i64), BrokerError> {
    let mut headers = OwnedHeaders::new();
    for (key, value) in record.headers {
        headers = headers.insert(Header { key, value: Some(*value) });
    }
    let mut r = FutureRecord::to(record.topic).payload(record.payload).headers(headers);
    if let Some(key) = record.key {
        r = r.key(key);
    }
    match producer.send(r, QUEUE_TIMEOUT).await {
        Ok(delivery) => Ok((delivery.partition, delivery.offset)),
        Err((e, _)) => Err(classify(record.topic, &e)),
    }
}

/// Refusals that retrying cannot fix count as failed attempts; the rest (timeouts,
/// a broker down, a full queue) are retried without counting.
fn classify(topic: &str, e: &KafkaError) -> BrokerError {
    let text = format!("producing to `{topic}`: {}", super::reason(e));
    match e.rdkafka_error_code() {
        Some(
            RDKafkaErrorCode::MessageSizeTooLarge
            | RDKafkaErrorCode::InvalidMessage
            | RDKafkaErrorCode::InvalidMessageSize
            | RDKafkaErrorCode::TopicAuthorizationFailed
            | RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic,
        ) => BrokerError::Refused(format!("{text}; does the topic exist (`ticketflow topics`)?")),
        _ => BrokerError::Publish(text),
    }
}

/// Publishes units' outputs to the topics of `[broker.topics]`.
pub struct KafkaPublisher {
    producer: FutureProducer,
    topics: TopicSettings,
}

impl KafkaPublisher {
    pub fn new(settings: &KafkaSettings, topics: &TopicSettings) -> Result<Self, KafkaSetupError> {
        Ok(KafkaPublisher { producer: producer(settings)?, topics: topics.clone() })
    }
}

#[async_trait]
impl Publisher for KafkaPublisher {
    async fn publish(&self, output: &Output) -> Result<(), BrokerError> {
        let json = |v: &dyn ToJson| v.to_json().map_err(|e| BrokerError::Refused(format!("serializing output: {e}")));
        let mut bodies = Vec::new();
        for c in output.costs() {
            bodies.push((&self.topics.costs, Some(c.ticket_id.clone()), json(c)?, None));
        }
        match output {
            Output::Reply { reply, .. } => {
                bodies.push((&self.topics.replies, Some(reply.conversation_id.clone()), json(reply)?, None))
            }
            Output::DeadLetter { dead_letter, .. } => {
                let key = dead_letter.payload_bytes().ok().and_then(|b| crate::intake::conversation_key(&b));
                let count = dead_letter.replay_count.to_string();
                bodies.push((&self.topics.dead_letters, key, json(dead_letter)?, Some(count)));
            }
        }
        // Enqueued in order on first poll (one partition per key keeps that order),
        // then awaited together.
        let sends = bodies.iter().map(|(topic, key, payload, count)| {
            let headers: Vec<(&str, &str)> = count.iter().map(|c| (REPLAY_COUNT_HEADER, c.as_str())).collect();
            let (topic, key, payload) = (topic.as_str(), key.as_deref(), payload.as_slice());
            async move { send(&self.producer, Record { topic, key, payload, headers: &headers }).await }
        });
        let results = futures_util::future::join_all(sends).await;
        // The worst failure wins: a refusal (counted) over a transient one.
        let mut result = Ok(());
        for r in results {
            match (r, &result) {
                (Ok(_), _) | (Err(_), Err(BrokerError::Refused(_))) => {}
                (Err(e), _) => result = Err(e),
            }
        }
        result
    }
}
