//! `ticketflow replay`: moves dead letters back to the input (SPEC §2). Kafka: see
//! `replay_kafka` (a consumer group of its own, progress committed after each
//! acknowledged republish). RabbitMQ, below.
//!
//! The dead-letter queue is read one message at a time (`basic.get`), never more than
//! the messages it held when the replay began, so dead letters arriving meanwhile
//! cannot keep it going. A dead letter that matches the filters is republished to
//! the input (its original bytes, with `x-replay-count` one higher and its
//! `conversation_id`), and acked only once the broker has confirmed the republish:
//! a crash at any point loses nothing (at worst a ticket is both in the input and
//! still in the dead-letter queue, and the ledger stops a second answer). Everything
//! else (not matching, past `limits.max_replays`, unreadable, listed by `--dry-run`)
//! is left unacked until the end and goes back to the queue, in its order, when the
//! channel closes.
//!
//! Besides our own dead letters (SPEC §3.4) the queue may hold raw tickets the
//! broker dead-lettered itself (a quorum queue's delivery limit, marked by the
//! `x-death` header); they replay the same way, with kind `delivery_limit`.

use std::num::NonZeroU32;

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};

use crate::broker::kafka::progress::Progress;
use crate::broker::kafka::{self, KafkaSetupError};
use crate::broker::rabbitmq::consume::{as_u32, CONVERSATION_HEADER, REPLAY_COUNT_HEADER};
use crate::broker::rabbitmq::publish::{Confirmed, Input};
use crate::broker::rabbitmq::{self, reason, topology, RabbitError};
use crate::settings::{BrokerKind, Settings};
use crate::ticket::DeadLetter;

/// The kinds `--kind` accepts: SPEC §3.4's and the broker's own.
pub const KINDS: [&str; 8] = [
    "too_large",
    "invalid_encoding",
    "invalid_json",
    "invalid_ticket",
    "providers_exhausted",
    "rejected",
    "internal",
    "delivery_limit",
];

/// Which dead letters to move, and how.
#[derive(Debug, Default, Clone)]
pub struct ReplayOptions {
    /// Error kinds to replay; empty for all.
    pub kinds: Vec<String>,
    /// Only dead letters that failed at or after this time.
    pub since: Option<DateTime<Utc>>,
    /// Only dead letters that failed before this time.
    pub until: Option<DateTime<Utc>>,
    /// Only these tickets; empty for all.
    pub tickets: Vec<String>,
    /// Move (or list) at most this many.
    pub limit: Option<u64>,
    /// List what would move, move nothing.
    pub dry_run: bool,
    /// At most this many republishes per second.
    pub rate: Option<NonZeroU32>,
}

/// What a replay did, and one line per dead letter it moved, listed or kept dead.
#[derive(Debug, Default)]
pub struct ReplayReport {
    pub scanned: u64,
    pub moved: u64,
    /// `--dry-run`: the dead letters that would move.
    pub listed: Vec<String>,
    /// Past `limits.max_replays`: they stay in the dead-letter queue.
    pub stay_dead: Vec<String>,
    pub unmatched: u64,
    /// Messages that are neither a dead letter nor a ticket dead-lettered by the
    /// broker: left in the queue.
    pub unreadable: Vec<String>,
    /// Republishes the broker did not confirm: those dead letters stay.
    pub failed: Vec<String>,
}

/// What becomes of one message of the dead-letter topic or queue.
enum Verdict {
    Move(Dead),
    /// Left where it is (reported in the [`ReplayReport`]).
    Keep {
        handled: bool,
    },
}

impl ReplayReport {
    /// The filters, `max_replays` and `--dry-run` applied to one message read from
    /// `dlq`. A kept message is `handled` when no later run should look at it again
    /// (unreadable, or past `max_replays`), not when it merely did not match.
    fn decide(&mut self, read: Result<Dead, String>, o: &ReplayOptions, max_replays: u32, dlq: &str) -> Verdict {
        let dead = match read {
            Ok(dead) => dead,
            Err(e) => {
                self.unreadable.push(format!("message {} of `{dlq}`: {e}", self.scanned));
                return Verdict::Keep { handled: true };
            }
        };
        if !dead.matches(o) {
            self.unmatched += 1;
            return Verdict::Keep { handled: false };
        }
        if dead.replay_count >= max_replays {
            self.stay_dead.push(format!("{}: past limits.max_replays ({max_replays}), stays dead", dead.describe()));
            return Verdict::Keep { handled: true };
        }
        if o.dry_run {
            self.listed.push(dead.describe());
            return Verdict::Keep { handled: false };
        }
        Verdict::Move(dead)
    }

    fn limit_reached(&self, o: &ReplayOptions) -> bool {
        o.limit.is_some_and(|l| self.moved + self.listed.len() as u64 >= l)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Rabbit(#[from] RabbitError),
    #[error(transparent)]
    KafkaSetup(#[from] KafkaSetupError),
    #[error("Kafka at {servers}: {reason}")]
    Kafka { servers: String, reason: String },
}

/// One message of the dead-letter queue, as replay sees it.
#[derive(Debug, PartialEq)]
struct Dead {
    ticket_id: Option<String>,
    kind: String,
    failed_at: Option<DateTime<Utc>>,
    replay_count: u32,
    payload: Vec<u8>,
}

impl Dead {
    fn read(body: &[u8], headers: Option<&FieldTable>) -> Result<Dead, String> {
        let header = |name: &str| headers.and_then(|h| h.inner().get(name));
        if let Some(AMQPValue::FieldArray(deaths)) = header("x-death") {
            // Dead-lettered by the broker: the body is the ticket itself.
            let death = match deaths.as_slice().first() {
                Some(AMQPValue::FieldTable(t)) => Some(t),
                _ => None,
            };
            let field = |name: &str| death.and_then(|t| t.inner().get(name));
            let kind = match field("reason") {
                Some(AMQPValue::LongString(s)) => match s.to_string().as_str() {
                    "delivery_limit" => "delivery_limit".to_owned(),
                    other => format!("broker_{other}"),
                },
                _ => "delivery_limit".to_owned(),
            };
            let failed_at = match field("time") {
                Some(AMQPValue::Timestamp(secs)) => DateTime::from_timestamp(*secs as i64, 0),
                _ => None,
            };
            let replay_count = header(REPLAY_COUNT_HEADER).and_then(as_u32).unwrap_or(0);
            let ticket_id = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("ticket_id").and_then(|t| t.as_str()).map(str::to_owned));
            return Ok(Dead { ticket_id, kind, failed_at, replay_count, payload: body.to_vec() });
        }
        Dead::from_envelope(body)
    }

    /// One of our own dead letters (SPEC §3.4).
    fn from_envelope(body: &[u8]) -> Result<Dead, String> {
        let letter: DeadLetter = serde_json::from_slice(body).map_err(|e| format!("not a dead letter: {e}"))?;
        let payload = letter.payload_bytes().map_err(|e| format!("its payload is not valid base64: {e}"))?;
        Ok(Dead {
            ticket_id: letter.ticket_id,
            kind: letter.error.kind.as_str().to_owned(),
            failed_at: DateTime::parse_from_rfc3339(&letter.failed_at).ok().map(|t| t.with_timezone(&Utc)),
            replay_count: letter.replay_count,
            payload,
        })
    }

    fn matches(&self, o: &ReplayOptions) -> bool {
        let kind = o.kinds.is_empty() || o.kinds.contains(&self.kind);
        let ticket = o.tickets.is_empty() || self.ticket_id.as_ref().is_some_and(|t| o.tickets.contains(t));
        // A dead letter without a time matches no time filter.
        let since = o.since.is_none_or(|s| self.failed_at.is_some_and(|t| t >= s));
        let until = o.until.is_none_or(|u| self.failed_at.is_some_and(|t| t < u));
        kind && ticket && since && until
    }

    fn describe(&self) -> String {
        let failed = self.failed_at.map(|t| t.to_rfc3339()).unwrap_or_else(|| "unknown".into());
        format!(
            "{} ({}, failed at {failed}, replayed {} time(s) before)",
            self.ticket_id.as_deref().unwrap_or("<no ticket id>"),
            self.kind,
            self.replay_count
        )
    }
}

/// Moves the matching dead letters of the configured broker back to the input.
pub async fn run(settings: &Settings, options: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    if settings.broker.kind == BrokerKind::Kafka {
        return replay_kafka(settings, options).await;
    }
    let conn = rabbitmq::connect(&settings.broker.rabbitmq, &settings.worker.id).await?;
    let result = replay(settings, options, &conn).await;
    rabbitmq::close(&conn, 200, "done").await;
    result
}

async fn replay(settings: &Settings, o: &ReplayOptions, conn: &lapin::Connection) -> Result<ReplayReport, ReplayError> {
    topology::declare(conn, &settings.broker).await?;
    let dlq = settings.broker.topics.dead_letters.as_str();
    let input = Input::of(&settings.broker);
    let broker = |e: lapin::Error| RabbitError::Broker { what: format!("reading `{dlq}`"), reason: reason(&e) };
    let channel = conn.create_channel().await.map_err(broker)?;
    let passive = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let held = channel.queue_declare(dlq.into(), passive, FieldTable::default()).await.map_err(broker)?.message_count();
    let out = Confirmed::open(conn).await?;
    let limiter = o.rate.map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n)));
    let max_replays = settings.limits.max_replays;
    let mut report = ReplayReport::default();
    while report.scanned < u64::from(held) {
        if report.limit_reached(o) {
            break;
        }
        let Some(message) = channel.basic_get(dlq.into(), BasicGetOptions { no_ack: false }).await.map_err(broker)?
        else {
            break;
        };
        report.scanned += 1;
        let delivery = message.delivery;
        let read = Dead::read(&delivery.data, delivery.properties.headers().as_ref());
        let Verdict::Move(dead) = report.decide(read, o, max_replays, dlq) else { continue };
        if let Some(limiter) = &limiter {
            limiter.until_ready().await;
        }
        let count = (dead.replay_count + 1).to_string();
        let conversation = crate::intake::conversation_key(&dead.payload);
        let ticket = dead.ticket_id.clone().unwrap_or_default();
        let mut headers = vec![(REPLAY_COUNT_HEADER, count.as_str()), ("ticket_id", ticket.as_str())];
        if let Some(c) = &conversation {
            headers.push((CONVERSATION_HEADER, c.as_str()));
        }
        // Through the shards' exchange with the original conversation, so the replayed
        // ticket joins its conversation's shard.
        let key = conversation.as_deref().unwrap_or(ticket.as_str());
        match async { out.send_ticket(&input, &dead.payload, &ticket, &headers, key).await?.confirmed().await }.await {
            Ok(()) => {
                delivery.acker.ack(BasicAckOptions::default()).await.map_err(broker)?;
                report.moved += 1;
            }
            Err(e) => report.failed.push(format!("{}: {e}; it stays in `{dlq}`", dead.describe())),
        }
    }
    // What was not moved goes back to the queue, in its order.
    rabbitmq::close_channel(&channel, "replay done").await;
    Ok(report)
}

/// Kafka: the dead-letter topic is read in a consumer group of its own
/// (`<group_id>-replay`), from its committed position up to the end each partition
/// had when the replay began. A moved dead letter is republished to the input with
/// its original key and `replay_count` one higher; its progress is committed only
/// once the producer has the republish acknowledged, so a crash loses nothing and
/// the next run starts after what this one finished. The position never passes a
/// dead letter that did not match the filters (a later run with other filters still
/// sees it); what was handled after it is recorded in the commit's metadata
/// ([`Progress`]), so no later run moves it again.
async fn replay_kafka(settings: &Settings, o: &ReplayOptions) -> Result<ReplayReport, ReplayError> {
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::message::Message as _;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    let k = &settings.broker.kafka;
    let dlq = settings.broker.topics.dead_letters.as_str();
    let input = settings.broker.topics.input.as_str();
    let failed = |e: rdkafka::error::KafkaError| ReplayError::Kafka {
        servers: k.bootstrap_servers.clone(),
        reason: format!("reading `{dlq}`: {}", kafka::reason(&e)),
    };
    let consumer: BaseConsumer = kafka::client_config(k)?
        .set("group.id", format!("{}-replay", k.group_id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .map_err(failed)?;
    let timeout = std::time::Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(dlq), timeout).map_err(failed)?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut all = TopicPartitionList::new();
    for p in &partitions {
        all.add_partition(dlq, *p);
    }
    let committed = consumer.committed_offsets(all, timeout).map_err(failed)?;
    // Where each partition starts and ends for this run, and what earlier runs
    // handled above their committed position.
    let mut ends = std::collections::HashMap::new();
    let mut progress = std::collections::HashMap::new();
    let mut start = TopicPartitionList::new();
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(dlq, e.partition(), timeout).map_err(failed)?;
        let p = Progress::from_commit(e.offset(), e.metadata(), low);
        if p.position() < high {
            ends.insert(e.partition(), high);
            start.add_partition_offset(dlq, e.partition(), Offset::Offset(p.position())).map_err(failed)?;
            progress.insert(e.partition(), p);
        }
    }
    let producer = kafka::publish::producer(k)?;
    let limiter = o.rate.map(|n| governor::RateLimiter::direct(governor::Quota::per_second(n)));
    let max_replays = settings.limits.max_replays;
    let mut report = ReplayReport::default();
    if ends.is_empty() {
        return Ok(report);
    }
    consumer.assign(&start).map_err(failed)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !ends.is_empty() && !report.limit_reached(o) {
        let Some(polled) = consumer.poll(std::time::Duration::from_millis(100)) else {
            if std::time::Instant::now() > deadline {
                return Err(ReplayError::Kafka {
                    servers: k.bootstrap_servers.clone(),
                    reason: format!("`{dlq}` stopped delivering before its end"),
                });
            }
            continue;
        };
        let m = polled.map_err(failed)?;
        let (partition, offset) = (m.partition(), m.offset());
        let (Some(&end), Some(p)) = (ends.get(&partition), progress.get_mut(&partition)) else { continue };
        if offset >= end {
            ends.remove(&partition);
            continue;
        }
        if offset + 1 >= end {
            ends.remove(&partition);
        }
        if p.is_done(offset) {
            continue; // moved (or found dead for good) by an earlier run
        }
        report.scanned += 1;
        let read = Dead::from_envelope(m.payload().unwrap_or_default());
        let dead = match report.decide(read, o, max_replays, dlq) {
            Verdict::Move(dead) => dead,
            Verdict::Keep { handled: false } => continue,
            Verdict::Keep { handled: true } => {
                if !o.dry_run {
                    record(&consumer, dlq, partition, offset, p).map_err(failed)?;
                }
                continue;
            }
        };
        let mut after = p.clone();
        after.done(offset);
        if !after.fits() {
            report.failed.push(format!(
                "{}: too many dead letters kept for later in front of it in partition {partition} of `{dlq}` to record more progress; it stays (replay those first, or without filters)",
                dead.describe()
            ));
            ends.remove(&partition);
            continue;
        }
        if let Some(limiter) = &limiter {
            limiter.until_ready().await;
        }
        let count = (dead.replay_count + 1).to_string();
        let key = m.key().and_then(|k| std::str::from_utf8(k).ok());
        let republish = kafka::publish::Record {
            topic: input,
            key,
            payload: &dead.payload,
            headers: &[(kafka::REPLAY_COUNT_HEADER, count.as_str())],
        };
        match kafka::publish::send(&producer, republish).await {
            Ok(_) => {
                report.moved += 1;
                record(&consumer, dlq, partition, offset, p).map_err(failed)?;
            }
            Err(e) => report.failed.push(format!("{}: {e}; it stays in `{dlq}`", dead.describe())),
        }
    }
    return Ok(report);

    /// Marks `offset` handled and commits the partition's progress (synchronously:
    /// a crash right after a republish replays at most that one dead letter again).
    fn record(
        consumer: &BaseConsumer,
        topic: &str,
        partition: i32,
        offset: i64,
        progress: &mut Progress,
    ) -> rdkafka::error::KafkaResult<()> {
        progress.done(offset);
        let mut tpl = TopicPartitionList::new();
        let mut e = tpl.add_partition(topic, partition);
        e.set_offset(Offset::Offset(progress.position()))?;
        e.set_metadata(progress.metadata());
        consumer.commit(&tpl, CommitMode::Sync)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{FieldArray, LongString};

    fn letter(kind: &str, ticket: &str, failed_at: &str, replays: u32, payload: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "schema_version": 1, "ticket_id": ticket, "unit_id": format!("{ticket}:abc"),
            "error": {"kind": kind, "message": "m"}, "attempts": 1, "replay_count": replays,
            "source": {"topic": "tickets", "partition": 0, "offset": 1}, "failed_at": failed_at,
            "worker_id": "w", "payload": payload, "payload_encoding": "utf8"
        }))
        .unwrap()
    }

    #[test]
    fn a_dead_letter_gives_back_its_original_bytes_and_facts() {
        let dead =
            Dead::read(&letter("providers_exhausted", "T-1", "2026-11-20T10:00:00Z", 1, "{\"x\":1}"), None).unwrap();
        assert_eq!(dead.payload, b"{\"x\":1}");
        assert_eq!(dead.kind, "providers_exhausted");
        assert_eq!(dead.replay_count, 1);
        assert_eq!(dead.ticket_id.as_deref(), Some("T-1"));
        assert!(Dead::read(b"{\"not\": \"a dead letter\"}", None).is_err());
    }

    #[test]
    fn a_ticket_dead_lettered_by_the_broker_replays_as_itself() {
        let mut death = FieldTable::default();
        death.insert("reason".into(), AMQPValue::LongString(LongString::from("delivery_limit")));
        death.insert("time".into(), AMQPValue::Timestamp(1_790_000_000));
        let mut headers = FieldTable::default();
        headers.insert("x-death".into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
        headers.insert(REPLAY_COUNT_HEADER.into(), AMQPValue::LongString(LongString::from("2")));
        let body = br#"{"ticket_id":"T-9","messages":[{"role":"customer","text":"hi"}]}"#;
        let dead = Dead::read(body, Some(&headers)).unwrap();
        assert_eq!(dead.payload, body);
        assert_eq!((dead.kind.as_str(), dead.replay_count), ("delivery_limit", 2));
        assert_eq!(dead.ticket_id.as_deref(), Some("T-9"));
        assert!(dead.failed_at.is_some());
    }

    #[test]
    fn filters_combine_and_a_time_filter_wants_a_time() {
        let dead = Dead::read(&letter("rejected", "T-1", "2026-11-20T10:00:00Z", 0, "p"), None).unwrap();
        let at = |s: &str| Some(DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc));
        let all = ReplayOptions::default();
        assert!(dead.matches(&all));
        assert!(dead.matches(&ReplayOptions { kinds: vec!["internal".into(), "rejected".into()], ..all.clone() }));
        assert!(!dead.matches(&ReplayOptions { kinds: vec!["internal".into()], ..all.clone() }));
        assert!(!dead.matches(&ReplayOptions { tickets: vec!["T-2".into()], ..all.clone() }));
        assert!(dead.matches(&ReplayOptions { since: at("2026-11-20T10:00:00Z"), ..all.clone() }));
        assert!(!dead.matches(&ReplayOptions { until: at("2026-11-20T10:00:00Z"), ..all.clone() }));
        let timeless = Dead { failed_at: None, ..dead };
        assert!(!timeless.matches(&ReplayOptions { since: at("2000-01-01T00:00:00Z"), ..all }));
    }
}
