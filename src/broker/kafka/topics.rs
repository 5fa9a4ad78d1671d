//! `ticketflow topics` for Kafka: creates the input, output and dead-letter topics
//! with the configured partitions and replication factor when missing; existing
//! topics are reported and left alone.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{client_config, KafkaSetupError};
use crate::broker::rabbitmq::topology::Declared;
use crate::settings::BrokerSettings;

/// Creates the four topics where missing; returns what was created and what existed.
pub async fn create(broker: &BrokerSettings) -> Result<Vec<Declared>, KafkaSetupError> {
    let k = &broker.kafka;
    let failed = |reason: String| KafkaSetupError::Broker { servers: k.bootstrap_servers.clone(), reason };
    let admin: AdminClient<DefaultClientContext> = client_config(k)?.create().map_err(|e| failed(super::reason(&e)))?;
    let t = &broker.topics;
    let names = [&t.input, &t.replies, &t.costs, &t.dead_letters];
    // What exists already needs no CreateTopics (which some brokers, such as
    // librdkafka's mock cluster, do not serve).
    let admin = std::sync::Arc::new(admin);
    let existing: Vec<String> = {
        let admin = admin.clone();
        tokio::task::spawn_blocking(move || {
            admin
                .inner()
                .fetch_metadata(None, Duration::from_secs(10))
                .map(|m| m.topics().iter().filter(|t| t.error().is_none()).map(|t| t.name().to_owned()).collect())
        })
        .await
        .map_err(|e| failed(e.to_string()))?
        .map_err(|e| failed(super::reason(&e)))?
    };
    let missing: Vec<&String> = names.iter().copied().filter(|n| !existing.contains(n)).collect();
    let new: Vec<NewTopic> = missing
        .iter()
        .map(|name| NewTopic::new(name, k.partitions, TopicReplication::Fixed(k.replication_factor)))
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(10)));
    let results = if new.is_empty() {
        Vec::new()
    } else {
        admin.create_topics(&new, &options).await.map_err(|e| {
            failed(format!(
                "creating {}: {}",
                missing.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", "),
                super::reason(&e)
            ))
        })?
    };
    let mut report: Vec<Declared> =
        names.iter().filter(|n| existing.contains(n)).map(|n| Declared::Existed(format!("topic `{n}`"))).collect();
    for result in results {
        let what = |name: &str| format!("topic `{name}` ({} partitions)", k.partitions);
        match result {
            Ok(name) => report.push(Declared::Created(what(&name))),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                report.push(Declared::Existed(format!("topic `{name}`")))
            }
            Err((name, code)) => return Err(failed(format!("creating topic `{name}`: {code}"))),
        }
    }
    Ok(report)
}
