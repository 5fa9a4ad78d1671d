//! Consuming the input: manual acks, `basic_qos` prefetch bounding what the broker
//! sends ahead (twice the in-flight budget, what the dispatcher may hold; the same
//! for every shard, see [`Link::prefetch_for_shards`]), and each AMQP delivery turned
//! into a [`Message`] with its ordering key (the `conversation_id` header, or the
//! ticket's own `conversation_id` when a producer set no header) and its replay count
//! (the `x-replay-count` header).
//!
//! Each subscription (the single input queue, or one shard queue, on a channel of its
//! own) is a lane with a number of its own: a message's `source.topic` is its queue,
//! `source.partition` that number and `source.offset` the delivery tag on that
//! channel. A shard this worker is no longer given is let go in order (see
//! [`super::shards`]): its lane revoked, its started deliveries settled, then its
//! channel closed (never its consumer cancelled first: see [`Sub::let_go`]). Nothing
//! in [`Source::next`] waits on the broker, so that the dispatcher may drop it at any
//! point. When a consumer ends, every lane is revoked and the link
//! reconnects; the new connection's subscriptions are then assigned. An acker
//! settles its delivery on the channel it came on; once that channel is gone the
//! broker redelivers the message, and settling it is a logged no-op.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, Consumer};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::link::Link;
use super::{reason, RabbitError};
use crate::broker::{Acker, BrokerError, Delivery, Lane, Message, Source, SourceEvent};
use crate::intake;
use crate::settings::BrokerSettings;
use crate::ticket::SourceRef;

/// The header carrying how many times operators replayed a message.
pub const REPLAY_COUNT_HEADER: &str = "x-replay-count";
/// The header carrying a ticket's ordering key.
pub const CONVERSATION_HEADER: &str = "conversation_id";
/// The header quorum queues set to the number of earlier deliveries of a message.
pub const DELIVERY_COUNT_HEADER: &str = "x-delivery-count";

/// Starts consuming `queue` on a channel of its own, with `prefetch` unacknowledged
/// deliveries at most; returns the channel and the consumer.
pub(super) async fn subscribe(
    conn: &Connection,
    queue: &str,
    prefetch: u16,
    tag: &str,
) -> Result<(lapin::Channel, Consumer), RabbitError> {
    let broker = |e: lapin::Error| RabbitError::Broker { what: format!("consuming `{queue}`"), reason: reason(&e) };
    let channel = conn.create_channel().await.map_err(broker)?;
    channel.basic_qos(prefetch.max(1), BasicQosOptions::default()).await.map_err(broker)?;
    let consumer = channel
        .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .map_err(broker)?;
    Ok((channel, consumer))
}

/// One subscription: a consumer on a channel of its own, for one lane.
struct Sub {
    shard: u16,
    queue: String,
    lane: Lane,
    generation: u32,
    channel: lapin::Channel,
    consumer: Consumer,
}

impl Sub {
    /// Ends the subscription by closing its channel, on a task of its own. Never by
    /// dropping the consumer while the channel is open: lapin then cancels it
    /// (`basic.cancel`), and a single-active-consumer queue activates the next
    /// consumer at once while this one's unsettled deliveries are still out; they
    /// come back after what the next consumer was sent meanwhile, out of the
    /// queue's order. A closed channel returns them first, in their order.
    fn let_go(self, why: &'static str) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            super::close_channel(&self.channel, why).await;
            if why == LET_GO {
                tracing::info!(queue = %self.queue, "shard let go");
            }
            drop(self.consumer);
        });
    }
}

/// What a subscribing task made, on the connection of that generation.
type Subscribed = (u32, Result<Vec<Sub>, RabbitError>);

/// Why a shard's channel is closed when this worker lets it go.
const LET_GO: &str = "shard let go";

/// The consumer of the input, across reconnections: the single input queue, or the
/// shards this worker is given ([`super::shards`]), each on a channel of its own.
pub struct RabbitSource {
    input: String,
    shards: u16,
    link: Arc<Link>,
    /// The connection the subscriptions are on; `None` between a loss and the link's
    /// next connection.
    generation: Option<u32>,
    /// Subscriptions by shard (0 for the single input queue).
    subs: BTreeMap<u16, Sub>,
    /// Shards being let go: revoked in the dispatcher, their channels closed once it
    /// reports their started deliveries settled.
    releasing: Vec<(u16, Sub, oneshot::Receiver<()>)>,
    /// The shards this worker is given, from the roster; `None` for the single queue.
    given: Option<watch::Receiver<BTreeSet<u16>>>,
    given_closed: bool,
    /// New connections' generations, from the link's supervisor.
    fresh: mpsc::Receiver<u32>,
    pending: VecDeque<SourceEvent>,
    paused: bool,
    /// Lanes handed out so far: each subscription's lane has a number of its own.
    lanes: u32,
    /// Where the next poll of the subscriptions starts, so that none is starved.
    rotation: usize,
    /// Something that decides the subscriptions changed since the last reconcile
    /// (the given shards, a drain, a connection): checked before each delivery, the
    /// subscriptions are only recomputed when set.
    dirty: bool,
    /// Subscriptions being made, on a task of their own: the dispatcher drops an
    /// unfinished [`Source::next`] whenever another of its branches fires, and a
    /// consumer whose making was dropped half-way would take its prefetch of
    /// deliveries that nobody polls, holding its shard until the connection closes.
    subscribing: Option<JoinHandle<Subscribed>>,
    /// Delivery limit of the queue, for the warning when a message nears it.
    delivery_limit: u32,
}

impl RabbitSource {
    pub(super) fn new(
        broker: &BrokerSettings,
        link: Arc<Link>,
        fresh: mpsc::Receiver<u32>,
        given: Option<watch::Receiver<BTreeSet<u16>>>,
    ) -> Self {
        let delivery_limit = link.delivery_limit();
        let shards = broker.rabbitmq.shards;
        RabbitSource {
            input: broker.topics.input.clone(),
            shards,
            link,
            generation: Some(0),
            subs: BTreeMap::new(),
            releasing: Vec::new(),
            given: if shards == 0 { None } else { given },
            given_closed: false,
            fresh,
            pending: VecDeque::new(),
            paused: false,
            lanes: 0,
            rotation: 0,
            dirty: true,
            subscribing: None,
            delivery_limit,
        }
    }

    /// Subscribes what is wanted now on the first connection; a refusal is returned.
    pub(super) async fn start(&mut self) -> Result<(), RabbitError> {
        self.reconcile();
        if let Some(subscribing) = self.subscribing.take() {
            let (_, made) = subscribing.await.map_err(|e| RabbitError::Broker {
                what: format!("consuming `{}`", self.input),
                reason: e.to_string(),
            })?;
            self.adopt(made?, true);
        }
        Ok(())
    }

    /// The queue of `shard`.
    fn queue_of(&self, shard: u16) -> String {
        if self.shards == 0 {
            self.input.clone()
        } else {
            super::shards::queue(&self.input, shard)
        }
    }

    /// What should be consumed now: the single input queue, or the given shards
    /// (none without a roster).
    fn wanted(&self) -> BTreeSet<u16> {
        match &self.given {
            _ if self.shards == 0 => BTreeSet::from([0]),
            None => BTreeSet::new(),
            Some(given) => given.borrow().clone(),
        }
    }

    /// Lets go of the subscriptions no longer wanted and starts subscribing the
    /// wanted ones (a shard still being let go is subscribed again once that is
    /// done). Nothing here waits: the subscribing runs on a task whose end
    /// [`Source::next`] takes ([`Self::adopt`]), and until then nothing else changes.
    fn reconcile(&mut self) {
        if self.subscribing.is_some() || !std::mem::take(&mut self.dirty) {
            return;
        }
        let Some(generation) = self.generation else { return };
        let wanted = self.wanted();
        let gone: Vec<u16> = self.subs.keys().filter(|s| !wanted.contains(s)).copied().collect();
        for shard in gone {
            if let Some(sub) = self.subs.remove(&shard) {
                self.consumed(&sub.queue, false);
                let (drained, waiting) = oneshot::channel();
                tracing::info!(queue = %sub.queue, "letting a shard go: its started tickets finish, then its channel is closed");
                self.pending.push_back(SourceEvent::Revoked { lanes: vec![sub.lane.clone()], drained });
                self.releasing.push((shard, sub, waiting));
            }
        }
        let missing: Vec<u16> = wanted
            .iter()
            .filter(|s| !self.subs.contains_key(s) && !self.releasing.iter().any(|(r, _, _)| r == *s))
            .copied()
            .collect();
        if missing.is_empty() {
            return;
        }
        let Some(session) = self.link.session().filter(|s| s.generation == generation) else {
            return;
        };
        let prefetch = self.link.prefetch_for_shards();
        let mut plan = Vec::with_capacity(missing.len());
        for shard in missing {
            let number = self.lanes;
            self.lanes += 1;
            let queue = self.queue_of(shard);
            let tag = format!("{} {number}", self.link.worker_id());
            plan.push((shard, queue, number, tag));
        }
        self.subscribing = Some(tokio::spawn(async move {
            let mut made = Vec::with_capacity(plan.len());
            for (shard, queue, number, tag) in plan {
                let (channel, consumer) = match subscribe(session.conn(), &queue, prefetch, &tag).await {
                    Ok(subscribed) => subscribed,
                    Err(e) => return (generation, Err(e)),
                };
                let lane = Lane { topic: queue.clone(), partition: number as i32 };
                made.push(Sub { shard, queue, lane, generation, channel, consumer });
            }
            (generation, Ok(made))
        }));
    }

    /// Takes the subscriptions a reconcile made: their lanes are assigned.
    fn adopt(&mut self, made: Vec<Sub>, first: bool) {
        for sub in made {
            if self.shards > 0 && !first {
                tracing::info!(queue = %sub.queue, "consuming a shard (standby until its previous owner lets it go)");
            }
            self.consumed(&sub.queue, true);
            self.pending.push_back(SourceEvent::Assigned(vec![sub.lane.clone()]));
            self.subs.insert(sub.shard, sub);
        }
        crate::telemetry::shards_consumed(self.shards, &self.subs.keys().copied().collect::<Vec<_>>(), &self.input);
    }

    /// A reconcile's subscribing ended: its subscriptions are taken if they are on
    /// the current connection (closed otherwise), a failure replaces the connection.
    fn subscribed(&mut self, done: Result<Subscribed, tokio::task::JoinError>) {
        self.dirty = true;
        let (generation, made) = match done {
            Ok(done) => done,
            Err(e) => {
                if let Some(generation) = self.generation.take() {
                    self.link.lost(generation, format!("consuming `{}`: {e}", self.input));
                }
                return;
            }
        };
        match made {
            Ok(made) if self.generation == Some(generation) => self.adopt(made, false),
            Ok(stale) => {
                for sub in stale {
                    sub.let_go("connection replaced");
                }
            }
            Err(e) => {
                if self.generation == Some(generation) {
                    self.generation = None;
                    self.link.lost(generation, e.to_string());
                }
            }
        }
    }

    fn consumed(&self, queue: &str, yes: bool) {
        let mut consumed = self.link.activity.consumed.lock().unwrap_or_else(|e| e.into_inner());
        if yes {
            consumed.insert(queue.to_owned());
        } else {
            consumed.remove(queue);
        }
    }

    /// The connection is gone: every subscription's lane is revoked (the broker has
    /// taken their deliveries back already), and nothing waits for a drain.
    fn lose_all(&mut self) {
        for sub in self.subs.values() {
            let (drained, _) = oneshot::channel();
            self.pending.push_back(SourceEvent::Revoked { lanes: vec![sub.lane.clone()], drained });
        }
        self.let_go_all("connection lost");
        self.link.activity.consumed.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Lets go of every subscription, those being let go included.
    fn let_go_all(&mut self, why: &'static str) {
        for (_, sub) in std::mem::take(&mut self.subs) {
            sub.let_go(why);
        }
        for (_, sub, _) in self.releasing.drain(..) {
            sub.let_go(why);
        }
    }

    fn message(&self, sub: &Sub, d: &lapin::message::Delivery) -> Message {
        let headers = d.properties.headers().as_ref();
        let header = |name: &str| headers.and_then(|h| h.inner().get(name).cloned());
        let key = header(CONVERSATION_HEADER)
            .and_then(|v| v.as_long_string().map(|s| s.to_string()))
            .or_else(|| intake::conversation_key(&d.data));
        let replay_count = header(REPLAY_COUNT_HEADER).and_then(|v| as_u32(&v)).unwrap_or(0);
        let deliveries = header(DELIVERY_COUNT_HEADER).and_then(|v| as_u32(&v)).unwrap_or(0);
        if deliveries.saturating_add(2) >= self.delivery_limit {
            tracing::warn!(
                queue = %sub.queue,
                earlier_deliveries = deliveries,
                delivery_limit = self.delivery_limit,
                "a message nears the queue's delivery limit: handed back again, the broker dead-letters it to the dead-letter queue (replayable)"
            );
        }
        Message {
            payload: bytes::Bytes::from(d.data.clone()),
            full_len: None,
            source: SourceRef {
                topic: sub.queue.clone(),
                partition: sub.lane.partition,
                offset: d.delivery_tag as i64,
            },
            key,
            redelivered: d.redelivered,
            stable_offset: false,
            replay_count,
        }
    }
}

impl Drop for RabbitSource {
    /// The worker stops: every channel is closed before its consumer goes (see
    /// [`Sub::let_go`]), so that what was handed back returns in order.
    fn drop(&mut self) {
        self.let_go_all("worker stopping");
    }
}

/// The next delivery of any subscription, polled in turn from `start`; pending while
/// there is none.
async fn next_of(
    subs: &mut BTreeMap<u16, Sub>,
    start: usize,
) -> (u16, Option<Result<lapin::message::Delivery, lapin::Error>>) {
    std::future::poll_fn(|cx| {
        let first = start % subs.len().max(1);
        for (shard, sub) in subs.iter_mut().skip(first) {
            if let Poll::Ready(d) = sub.consumer.poll_next_unpin(cx) {
                return Poll::Ready((*shard, d));
            }
        }
        for (shard, sub) in subs.iter_mut().take(first) {
            if let Poll::Ready(d) = sub.consumer.poll_next_unpin(cx) {
                return Poll::Ready((*shard, d));
            }
        }
        Poll::Pending
    })
    .await
}

/// The first of `releasing` whose drain the dispatcher reported (or gave up on).
async fn drained_of(releasing: &mut [(u16, Sub, oneshot::Receiver<()>)]) -> usize {
    std::future::poll_fn(|cx| {
        for (i, (_, _, waiting)) in releasing.iter_mut().enumerate() {
            if Pin::new(waiting).poll(cx).is_ready() {
                return Poll::Ready(i);
            }
        }
        Poll::Pending
    })
    .await
}

/// The end of the subscribing task (pending while there is none).
async fn joined<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// Until the given shards change (pending for ever once their sender is gone).
async fn given_changed(given: &mut Option<watch::Receiver<BTreeSet<u16>>>, closed: bool) -> bool {
    match given {
        Some(rx) if !closed => rx.changed().await.is_ok(),
        _ => std::future::pending().await,
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
            self.reconcile();
            if !self.pending.is_empty() {
                continue;
            }
            // While paused, deliveries wait here (the prefetch bounds how many the
            // broker sends ahead), but a new connection is still taken.
            let deliver = !self.paused && !self.subs.is_empty();
            let releasing = !self.releasing.is_empty();
            let subscribing = self.subscribing.is_some();
            let start = self.rotation;
            tokio::select! {
                biased;
                fresh = self.fresh.recv() => match fresh {
                    Some(generation) => {
                        self.lose_all();
                        self.generation = Some(generation);
                        self.dirty = true;
                    }
                    // The link is closed: the worker is stopping.
                    None => return Ok(None),
                },
                changed = given_changed(&mut self.given, self.given_closed) => {
                    if !changed {
                        self.given_closed = true;
                    }
                    self.dirty = true;
                }
                done = joined(&mut self.subscribing), if subscribing => {
                    self.subscribing = None;
                    self.subscribed(done);
                }
                i = drained_of(&mut self.releasing), if releasing => {
                    let (_, sub, _) = self.releasing.remove(i);
                    self.dirty = true;
                    // The broker takes back what the dispatcher did not start, in
                    // its order, and activates the standby consumer.
                    sub.let_go(LET_GO);
                }
                (shard, delivery) = next_of(&mut self.subs, start), if deliver => {
                    self.rotation = self.rotation.wrapping_add(1);
                    match delivery {
                        Some(Ok(d)) => {
                            let Some(sub) = self.subs.get(&shard) else { continue };
                            let message = self.message(sub, &d);
                            tracing::trace!(queue = %sub.queue, lane = sub.lane.partition, tag = d.delivery_tag, redelivered = d.redelivered, id = ?d.properties.message_id(), "delivery");
                            self.link.activity.delivered();
                            let acker = Box::new(RabbitAcker {
                                acker: d.acker,
                                link: self.link.clone(),
                                generation: sub.generation,
                                defer_requeue: self.shards > 0,
                            });
                            return Ok(Some(SourceEvent::Delivery(Delivery { message, acker })));
                        }
                        ended => {
                            let queue = self.queue_of(shard);
                            let why = match ended {
                                Some(Err(e)) => format!("consuming `{queue}`: {}", reason(&e)),
                                _ => format!("the broker cancelled the consumer of `{queue}`"),
                            };
                            if let Some(generation) = self.generation.take() {
                                self.link.lost(generation, why);
                            }
                            self.lose_all();
                        }
                    }
                }
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
    /// Shards: a delivery handed back (requeue) stays unacknowledged until its
    /// channel closes (the shard let go, the connection closed at a stop or a
    /// reconnection), when the broker returns all of them in their order. Nacked one
    /// by one they would return in the order of the nacks, which is not the queue's.
    defer_requeue: bool,
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
        if requeue && self.defer_requeue {
            tracing::debug!("handed back: the broker returns the delivery when its channel closes");
            return Ok(());
        }
        let options = BasicNackOptions { requeue, ..BasicNackOptions::default() };
        let result = tokio::time::timeout(SETTLE_TIMEOUT, self.acker.nack(options)).await;
        self.settled("nack", result)
    }
}
