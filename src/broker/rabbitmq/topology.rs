//! The RabbitMQ topology, declared idempotently by `ticketflow topics` (and the
//! worker at start):
//!
//! - the input: with `broker.rabbitmq.shards` = N > 0, an `x-consistent-hash`
//!   exchange (durable) bound with weight 1 to N shard queues `<input>.0` …, each with
//!   single active consumer ([`super::shards`]); with 0, one input queue. Input queues
//!   are durable, of `broker.rabbitmq.queue_type` (quorum with `x-delivery-limit` by
//!   default), dead-lettering into the dead-letter exchange with the dead-letter
//!   queue's name as routing key;
//! - the dead-letter exchange (direct, durable), and the reply, cost and dead-letter
//!   queues, durable and of the same type, so any client can read them by name;
//! - the dead-letter queue bound to the dead-letter exchange; with
//!   `broker.rabbitmq.output_exchange` set, the output queues bound to that
//!   exchange too, each by its own name.
//!
//! A queue that exists with other arguments is reported with the broker's words
//! (which name the argument), not left to crash a channel.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ExchangeKind};

use super::{code, reason, RabbitError};
use crate::settings::{BrokerSettings, QueueType};

const NOT_FOUND: u16 = 404;
const PRECONDITION_FAILED: u16 = 406;

/// What a declaration found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Declared {
    Created(String),
    Existed(String),
}

impl std::fmt::Display for Declared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Declared::Created(what) => write!(f, "created {what}"),
            Declared::Existed(what) => write!(f, "exists  {what}"),
        }
    }
}

/// The arguments of the input queue (each shard queue's, with single active consumer).
pub fn input_arguments(broker: &BrokerSettings) -> FieldTable {
    let r = &broker.rabbitmq;
    let mut args = queue_type_arguments(r.queue_type);
    if r.shards > 0 {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args.insert("x-dead-letter-exchange".into(), long_string(&r.dead_letter_exchange));
    args.insert("x-dead-letter-routing-key".into(), long_string(&broker.topics.dead_letters));
    if r.queue_type == QueueType::Quorum {
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(r.delivery_limit)));
    }
    args
}

fn queue_type_arguments(queue_type: QueueType) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string(queue_type.as_str()));
    args
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Declares the whole topology; returns what was created and what existed, in order.
pub async fn declare(conn: &Connection, broker: &BrokerSettings) -> Result<Vec<Declared>, RabbitError> {
    let r = &broker.rabbitmq;
    let t = &broker.topics;
    let mut report = Vec::new();
    let output_args = queue_type_arguments(r.queue_type);
    report.push(exchange(conn, &r.dead_letter_exchange).await?);
    if !r.output_exchange.is_empty() {
        report.push(exchange(conn, &r.output_exchange).await?);
    }
    if r.shards == 0 {
        report.push(queue(conn, &t.input, input_arguments(broker), r.queue_type).await?);
    } else {
        report.push(hash_exchange(conn, &t.input, r.shards).await?);
        for shard in 0..r.shards {
            let name = super::shards::queue(&t.input, shard);
            report.push(queue(conn, &name, input_arguments(broker), r.queue_type).await?);
            // The binding key is the shard's weight in the hash ring: equal for all.
            bind(conn, &name, &t.input, "1").await?;
        }
    }
    for name in [&t.replies, &t.costs, &t.dead_letters] {
        report.push(queue(conn, name, output_args.clone(), r.queue_type).await?);
    }
    bind(conn, &t.dead_letters, &r.dead_letter_exchange, &t.dead_letters).await?;
    if !r.output_exchange.is_empty() {
        for name in [&t.replies, &t.costs, &t.dead_letters] {
            bind(conn, name, &r.output_exchange, name).await?;
        }
    }
    Ok(report)
}

/// Declares a durable queue with our arguments, which the broker checks against an
/// existing queue's.
async fn queue(conn: &Connection, name: &str, args: FieldTable, kind: QueueType) -> Result<Declared, RabbitError> {
    let passive = QueueDeclareOptions { passive: true, durable: true, ..QueueDeclareOptions::default() };
    let options = QueueDeclareOptions { durable: true, ..QueueDeclareOptions::default() };
    checked(
        conn,
        format!("queue `{name}`"),
        format!("queue `{name}` ({})", kind.as_str()),
        |ch| async move { ch.queue_declare(name.into(), passive, FieldTable::default()).await.map(drop) },
        |ch| async move { ch.queue_declare(name.into(), options, args).await.map(drop) },
    )
    .await
}

/// The broker's words when an exchange type is not known to it (a plugin not enabled).
const UNKNOWN_TYPE: &str = "invalid exchange type";

/// Declares the input's consistent-hash exchange; a broker without the plugin is
/// told in one line how to enable it.
async fn hash_exchange(conn: &Connection, name: &str, shards: u16) -> Result<Declared, RabbitError> {
    let passive = ExchangeDeclareOptions { passive: true, durable: true, ..ExchangeDeclareOptions::default() };
    let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let declare = |options| {
        move |ch: lapin::Channel| async move {
            let kind = ExchangeKind::Custom(HASH_EXCHANGE.into());
            ch.exchange_declare(name.into(), kind, options, FieldTable::default()).await
        }
    };
    let declared = checked(
        conn,
        format!("exchange `{name}`"),
        format!("exchange `{name}` ({HASH_EXCHANGE}, {shards} shards)"),
        declare(passive),
        declare(options),
    )
    .await;
    match declared {
        Err(RabbitError::Broker { reason, .. }) if reason.contains(UNKNOWN_TYPE) => Err(RabbitError::Plugin {
            reason: format!(
                "RabbitMQ lacks the {HASH_EXCHANGE} exchange type that broker.rabbitmq.shards = {shards} needs: enable it with `rabbitmq-plugins enable rabbitmq_consistent_hash_exchange` (or set broker.rabbitmq.shards = 0 for one unordered input queue)"
            ),
        }),
        other => other,
    }
}

/// The exchange type of the sharded input.
pub const HASH_EXCHANGE: &str = "x-consistent-hash";

async fn exchange(conn: &Connection, name: &str) -> Result<Declared, RabbitError> {
    let passive = ExchangeDeclareOptions { passive: true, durable: true, ..ExchangeDeclareOptions::default() };
    let options = ExchangeDeclareOptions { durable: true, ..ExchangeDeclareOptions::default() };
    let declare = |options| {
        move |ch: lapin::Channel| async move {
            ch.exchange_declare(name.into(), ExchangeKind::Direct, options, FieldTable::default()).await
        }
    };
    checked(
        conn,
        format!("exchange `{name}`"),
        format!("exchange `{name}` (direct)"),
        declare(passive),
        declare(options),
    )
    .await
}

/// Runs a passive declaration first, to tell "created" from "existed", then the real
/// one. Each step has a channel of its own (a refused declaration closes its
/// channel), closed again after a success. A refusal of the real declaration for
/// other settings is a [`RabbitError::Mismatch`] in the broker's words.
async fn checked<P, PF, D, DF>(
    conn: &Connection,
    name: String,
    what: String,
    passive: P,
    declare: D,
) -> Result<Declared, RabbitError>
where
    P: FnOnce(lapin::Channel) -> PF,
    PF: std::future::Future<Output = lapin::Result<()>>,
    D: FnOnce(lapin::Channel) -> DF,
    DF: std::future::Future<Output = lapin::Result<()>>,
{
    let ch = channel(conn).await?;
    let existed = match passive(ch.clone()).await {
        Ok(()) => {
            close(ch).await;
            true
        }
        Err(e) if code(&e) == Some(NOT_FOUND) => false,
        Err(e) => return Err(RabbitError::Broker { what, reason: reason(&e) }),
    };
    let ch = channel(conn).await?;
    match declare(ch.clone()).await {
        Ok(()) => {
            close(ch).await;
            Ok(if existed { Declared::Existed(what) } else { Declared::Created(what) })
        }
        Err(e) if code(&e) == Some(PRECONDITION_FAILED) => {
            Err(RabbitError::Mismatch { what: name, reason: reason(&e) })
        }
        Err(e) => Err(RabbitError::Broker { what, reason: reason(&e) }),
    }
}

async fn bind(conn: &Connection, queue: &str, exchange: &str, key: &str) -> Result<(), RabbitError> {
    let ch = channel(conn).await?;
    ch.queue_bind(queue.into(), exchange.into(), key.into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .map_err(|e| RabbitError::Broker { what: format!("binding `{queue}` to `{exchange}`"), reason: reason(&e) })?;
    close(ch).await;
    Ok(())
}

/// Closes a channel that is still open (a refused declaration closed its own).
async fn close(ch: lapin::Channel) {
    super::close_channel(&ch, "done").await;
}

async fn channel(conn: &Connection) -> Result<lapin::Channel, RabbitError> {
    conn.create_channel()
        .await
        .map_err(|e| RabbitError::Broker { what: "opening a channel".into(), reason: reason(&e) })
}
