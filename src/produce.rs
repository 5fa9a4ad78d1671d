//! `ticketflow produce FILE|-`: publishes JSONL tickets to the input queue, as a
//! helpdesk integration would. Each line is checked with the worker's own intake
//! first: an invalid line is reported with its line number and not sent. Valid
//! tickets go out in file order, persistent, each with its `conversation_id` as the
//! `conversation_id` header (the worker's ordering key), and count as published
//! only once the broker confirms them.

use std::collections::VecDeque;
use std::path::Path;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use crate::broker::rabbitmq::publish::{Confirmed, Unconfirmed};
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
    #[error("producing to Kafka is not supported yet; for RabbitMQ set broker.kind = \"rabbitmq\" (TICKETFLOW__BROKER__KIND=rabbitmq)")]
    Kafka,
}

/// Publishes every valid ticket of `input` (`-` for standard input).
pub async fn run(settings: &Settings, input: &Path) -> Result<ProduceReport, ProduceError> {
    if settings.broker.kind == BrokerKind::Kafka {
        return Err(ProduceError::Kafka);
    }
    let reader: Box<dyn AsyncBufRead + Unpin + Send> = if input == Path::new("-") {
        Box::new(BufReader::new(tokio::io::stdin()))
    } else {
        let file = tokio::fs::File::open(input)
            .await
            .map_err(|source| ProduceError::Input { path: input.display().to_string(), source })?;
        Box::new(BufReader::new(file))
    };
    let conn = rabbitmq::connect(&settings.broker.rabbitmq, &settings.worker.id).await?;
    let result = produce(settings, &conn, reader).await;
    rabbitmq::close(&conn, 200, "done").await;
    result
}

async fn produce(
    settings: &Settings,
    conn: &lapin::Connection,
    mut reader: Box<dyn AsyncBufRead + Unpin + Send>,
) -> Result<ProduceReport, ProduceError> {
    topology::declare(conn, &settings.broker).await?;
    let channel = Confirmed::open(conn).await?;
    let queue = &settings.broker.topics.input;
    let limit = settings.limits.max_message_bytes;
    let mut report = ProduceReport::default();
    let mut waiting: VecDeque<(u64, Unconfirmed)> = VecDeque::new();
    let mut line = Vec::new();
    let mut line_no = 0u64;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line).await.map_err(ProduceError::Read)? == 0 {
            break;
        }
        line_no += 1;
        while matches!(line.last(), Some(b'\n' | b'\r')) {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let ticket = match intake::parse(&line, limit) {
            Ok(ticket) => ticket,
            Err(rejection) => {
                report.invalid.push(format!("line {line_no}: {}: {}", rejection.kind.as_str(), rejection.message));
                continue;
            }
        };
        let headers = [("conversation_id", ticket.conversation_id.as_str()), ("ticket_id", &ticket.ticket_id)];
        match channel.send(queue, &line, &ticket.unit_id, &headers).await {
            Ok(unconfirmed) => waiting.push_back((line_no, unconfirmed)),
            Err(e) => report.refused.push(format!("line {line_no}: {e}")),
        }
        if waiting.len() >= WINDOW {
            settle(waiting.pop_front(), &mut report).await;
        }
    }
    while !waiting.is_empty() {
        settle(waiting.pop_front(), &mut report).await;
    }
    Ok(report)
}

async fn settle(next: Option<(u64, Unconfirmed)>, report: &mut ProduceReport) {
    let Some((line_no, unconfirmed)) = next else { return };
    match unconfirmed.confirmed().await {
        Ok(()) => report.published += 1,
        Err(e) => report.refused.push(format!("line {line_no}: {e}")),
    }
}
