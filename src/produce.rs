//! `ticketflow produce FILE|-`: publishes JSONL tickets to the input queue, as a
//! helpdesk integration would. Each line is checked with the worker's own intake
//! first: an invalid line is reported with its line number and not sent. Valid
//! tickets go out in file order, persistent, each with its `conversation_id` as the
//! `conversation_id` header (the worker's ordering key), and count as published
//! only once the broker confirms them.

use std::collections::VecDeque;
use std::path::Path;

use tokio::io::AsyncBufRead;

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::types::RDKafkaErrorCode;

use crate::broker::kafka;
use crate::broker::rabbitmq::publish::{Confirmed, Input, Unconfirmed};
use crate::broker::rabbitmq::{self, topology, RabbitError};
use crate::intake;
use crate::settings::{BrokerKind, Settings};

/// Confirmations awaited at most at once: enough to keep the broker busy, few
/// enough that a failure is reported close to its line.
const WINDOW: usize = 512;

/// What a run did.
#[derive(Debug, Default)]
pub struct ProduceReport {
    pub published: u64,
    /// `line N: kind: message`, for every line not sent.
    pub invalid: Vec<String>,
    /// Lines the broker did not confirm.
    pub refused: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    #[error("cannot open input {path}")]
    Input { path: String, source: std::io::Error },
    #[error("reading input: {0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Rabbit(#[from] RabbitError),
    #[error(transparent)]
    Kafka(#[from] kafka::KafkaSetupError),
}

/// Publishes every valid ticket of `input` (`-` for standard input).
pub async fn run(settings: &Settings, input: &Path) -> Result<ProduceReport, ProduceError> {
    let (reader, _) = intake::open_jsonl(input)
        .await
        .map_err(|source| ProduceError::Input { path: input.display().to_string(), source })?;
    let topic = settings.broker.topics.input.clone();
    match settings.broker.kind {
        BrokerKind::Rabbitmq => {
            let conn = rabbitmq::connect(&settings.broker.rabbitmq, &settings.worker.id).await?;
            let result = async {
                topology::declare(&conn, &settings.broker).await?;
                let channel = Confirmed::open(&conn).await?;
                let input = Input::of(&settings.broker);
                produce(settings, reader, Sink::Rabbit { channel, input, waiting: VecDeque::new() }).await
            }
            .await;
            rabbitmq::close(&conn, 200, "done").await;
            result
        }
        BrokerKind::Kafka => {
            let producer = kafka::publish::producer(&settings.broker.kafka)?;
            produce(settings, reader, Sink::Kafka { producer, topic, waiting: VecDeque::new() }).await
        }
    }
}

/// Where the tickets go, and the sends not yet confirmed.
enum Sink {
    Rabbit { channel: Confirmed, input: Input, waiting: VecDeque<(u64, Unconfirmed)> },
    Kafka { producer: FutureProducer, topic: String, waiting: VecDeque<(u64, DeliveryFuture)> },
}

impl Sink {
    /// Sends one ticket (in order: RabbitMQ keeps the queue's order, Kafka the order
    /// of a key's partition) without waiting for its confirmation.
    async fn send(&mut self, line_no: u64, line: &[u8], ticket: &crate::ticket::Ticket, report: &mut ProduceReport) {
        let headers = [("conversation_id", ticket.conversation_id.as_str()), ("ticket_id", &ticket.ticket_id)];
        match self {
            Sink::Rabbit { channel, input, waiting } => {
                match channel.send_ticket(input, line, &ticket.unit_id, &headers, &ticket.conversation_id).await {
                    Ok(unconfirmed) => waiting.push_back((line_no, unconfirmed)),
                    Err(e) => report.refused.push(format!("line {line_no}: {e}")),
                }
            }
            Sink::Kafka { producer, topic, waiting } => {
                let mut kafka_headers = OwnedHeaders::new();
                for (key, value) in headers {
                    kafka_headers = kafka_headers.insert(Header { key, value: Some(value) });
                }
                let mut record =
                    FutureRecord::to(topic.as_str()).payload(line).key(&ticket.conversation_id).headers(kafka_headers);
                loop {
                    match producer.send_result(record) {
                        Ok(delivery) => break waiting.push_back((line_no, delivery)),
                        // The producer's queue is full: let it drain, then try again.
                        Err((e, back)) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::QueueFull) => {
                            record = back;
                            match waiting.pop_front() {
                                Some(oldest) => Self::settle_kafka(oldest, report).await,
                                None => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                            }
                        }
                        Err((e, _)) => break report.refused.push(format!("line {line_no}: {}", kafka::reason(&e))),
                    }
                }
            }
        }
    }

    fn waiting(&self) -> usize {
        match self {
            Sink::Rabbit { waiting, .. } => waiting.len(),
            Sink::Kafka { waiting, .. } => waiting.len(),
        }
    }

    /// Waits for the oldest confirmation.
    async fn settle_oldest(&mut self, report: &mut ProduceReport) {
        match self {
            Sink::Rabbit { waiting, .. } => {
                let Some((line_no, unconfirmed)) = waiting.pop_front() else { return };
                match unconfirmed.confirmed().await {
                    Ok(()) => report.published += 1,
                    Err(e) => report.refused.push(format!("line {line_no}: {e}")),
                }
            }
            Sink::Kafka { waiting, .. } => {
                if let Some(oldest) = waiting.pop_front() {
                    Self::settle_kafka(oldest, report).await;
                }
            }
        }
    }

    async fn settle_kafka((line_no, delivery): (u64, DeliveryFuture), report: &mut ProduceReport) {
        match delivery.await {
            Ok(Ok(_)) => report.published += 1,
            Ok(Err((e, _))) => report.refused.push(format!("line {line_no}: {}", kafka::reason(&e))),
            Err(_) => report.refused.push(format!("line {line_no}: the producer went away")),
        }
    }
}

async fn produce(
    settings: &Settings,
    mut reader: Box<dyn AsyncBufRead + Unpin + Send>,
    mut sink: Sink,
) -> Result<ProduceReport, ProduceError> {
    let limit = settings.limits.max_message_bytes;
    let mut report = ProduceReport::default();
    let mut line = Vec::new();
    let mut line_no = 0u64;
    while let Some(read) = intake::read_line(&mut reader, limit, &mut line).await.map_err(ProduceError::Read)? {
        line_no += 1;
        if intake::is_blank(&line, &read) {
            continue;
        }
        let ticket = match intake::parse_cut(&line, read.full_len_if_cut(&line), limit) {
            Ok(ticket) => ticket,
            Err(rejection) => {
                report.invalid.push(format!("line {line_no}: {}: {}", rejection.kind.as_str(), rejection.message));
                continue;
            }
        };
        sink.send(line_no, &line, &ticket, &mut report).await;
        if sink.waiting() >= WINDOW {
            sink.settle_oldest(&mut report).await;
        }
    }
    while sink.waiting() > 0 {
        sink.settle_oldest(&mut report).await;
    }
    Ok(report)
}
