//! The worker's connection to RabbitMQ, kept up.
//!
//! [`Link::open`] connects, declares the topology, opens the confirmed publishing
//! channel and starts the consumer; a failure there is final (a wrong URL or password
//! is a configuration problem, reported in one line). From then on a supervisor task
//! watches the connection. When it is lost (a broker restart, a dropped connection,
//! missed heartbeats), when a part of it reports itself dead (the broker cancelled
//! the consumer, the publishing channel closed) or when the consumer has stalled
//! (nothing received for `stall_timeout_secs` while the queue has ready messages and
//! the worker has room for them, or the queue shows no consumer), the supervisor:
//!
//! 1. marks the link not connected (the worker's readiness) and drops the session, so
//!    publishes fail as "not confirmed" and are retried without counting as attempts;
//! 2. closes what is left of the connection, so the broker requeues every delivery
//!    that was not acked;
//! 3. reconnects with jittered backoff (0.2 s up to `reconnect_max_secs`), redeclares
//!    the topology, reopens the channels and hands the new consumer to the source.
//!
//! The source reports the old consumer's lane revoked and the new one assigned, so
//! the dispatcher hands back unstarted deliveries of the lost channel and lets the
//! running ones finish (their acks are logged no-ops: the broker redelivers those
//! messages, and the ledger answers them from its record without paying twice).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::Connection;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::consume::RabbitSource;
use super::publish::Confirmed;
use super::{reason, topology, RabbitError};
use crate::backoff::Backoff;
use crate::settings::Settings;

/// How long one attempt to connect and set up may take before it is given up.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the worker reads the depth of its queues for the metrics.
const DEPTH_INTERVAL: Duration = Duration::from_secs(5);

/// One connection and the channels opened on it.
pub struct Session {
    /// Counts connections: 0 for the first, one more after each reconnection.
    pub generation: u32,
    conn: Connection,
    pub publish: Confirmed,
    started: Instant,
}

/// What the consumer is doing, for stall detection.
pub(super) struct Activity {
    epoch: Instant,
    /// Milliseconds since `epoch` at the last delivery.
    last_delivery_ms: AtomicU64,
    /// Deliveries handed out and not yet settled.
    pub(super) outstanding: AtomicUsize,
    pub(super) paused: AtomicBool,
    /// The queues consumed (the input queue, or this worker's shards).
    pub(super) consumed: Mutex<BTreeSet<String>>,
}

impl Activity {
    pub(super) fn delivered(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_delivery_ms.store(ms, Ordering::Relaxed);
        self.outstanding.fetch_add(1, Ordering::Relaxed);
    }

    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_delivery_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }
}

/// The connection to RabbitMQ, reconnected by a supervisor task when lost.
pub struct Link {
    settings: Arc<Settings>,
    prefetch: u16,
    session: Mutex<Option<Arc<Session>>>,
    connected: watch::Sender<bool>,
    /// A part of the session reported it dead: (generation, why).
    lost: Mutex<Option<(u32, String)>>,
    lost_notify: Notify,
    pub(super) activity: Activity,
    stop: CancellationToken,
    reconnections: AtomicU64,
}

impl Link {
    /// Connects and starts consuming the input with `prefetch` unacknowledged
    /// deliveries at most; returns the link (for publishing) and the source. With
    /// input shards, `given` holds the shards this worker is given (the roster's
    /// [`super::shards::Membership`]), and the source consumes those.
    pub async fn open(
        settings: Arc<Settings>,
        prefetch: u16,
        given: Option<watch::Receiver<BTreeSet<u16>>>,
    ) -> Result<(Arc<Link>, RabbitSource), RabbitError> {
        let session = establish(&settings, 0).await?;
        if settings.broker.rabbitmq.shards > 0 {
            warn_of_unsharded_tickets(&session.conn, &settings.broker.topics.input).await;
        }
        let now = Instant::now();
        let link = Arc::new(Link {
            settings: settings.clone(),
            prefetch,
            session: Mutex::new(Some(Arc::new(session))),
            connected: watch::Sender::new(true),
            lost: Mutex::new(None),
            lost_notify: Notify::new(),
            activity: Activity {
                epoch: now,
                last_delivery_ms: AtomicU64::new(0),
                outstanding: AtomicUsize::new(0),
                paused: AtomicBool::new(false),
                consumed: Mutex::new(BTreeSet::new()),
            },
            stop: CancellationToken::new(),
            reconnections: AtomicU64::new(0),
        });
        let (sessions, fresh) = mpsc::channel(1);
        let mut source = RabbitSource::new(&settings.broker, link.clone(), fresh, given);
        // The single input queue is consumed at once, so that a refusal (access
        // rights) is reported here, in one line, before the worker says it runs.
        source.start().await?;
        tokio::spawn(link.clone().supervise(sessions));
        Ok((link, source))
    }

    /// The prefetch of each consumer: the worker's whole window for the single input
    /// queue; for a shard queue, the same for every shard and every replica that
    /// shares the configuration (twice the window divided by the shards, at least 8),
    /// whatever the number of shards this worker holds. The dispatcher's pause bounds
    /// what is taken in anyway.
    ///
    /// Equal prefetches keep a shard in order across a handover. The broker puts a
    /// departed consumer's unsettled deliveries at the tail of the queue's returns,
    /// ahead of its fresh messages, and the next consumer is sent the returns first,
    /// as many as its prefetch allows. Had it a smaller prefetch than its
    /// predecessor, part of the returns would stay behind, and when this consumer in
    /// turn let the shard go, its own returns (earlier tickets) would queue behind
    /// them: a conversation's later ticket would go out first.
    pub(super) fn prefetch_for_shards(&self) -> u16 {
        let shards = self.settings.broker.rabbitmq.shards;
        if shards == 0 {
            return self.prefetch;
        }
        let each = (2 * usize::from(self.prefetch)).div_ceil(usize::from(shards)).max(8);
        u16::try_from(each).unwrap_or(u16::MAX)
    }

    /// The current session; `None` while reconnecting.
    pub fn session(&self) -> Option<Arc<Session>> {
        self.session.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// False from the loss of the connection until the worker consumes again.
    pub fn is_connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// Returns once the link is connected (`true`) or not (`false`).
    pub async fn wait_connected(&self, connected: bool) {
        let mut rx = self.connected.subscribe();
        let _ = rx.wait_for(|c| *c == connected).await;
    }

    /// This worker's id, for consumer tags.
    pub(super) fn worker_id(&self) -> &str {
        &self.settings.worker.id
    }

    /// The input queue's delivery limit (quorum queues), or `u32::MAX`.
    pub fn delivery_limit(&self) -> u32 {
        let rabbit = &self.settings.broker.rabbitmq;
        match rabbit.queue_type {
            crate::settings::QueueType::Quorum => rabbit.delivery_limit,
            crate::settings::QueueType::Classic => u32::MAX,
        }
    }

    /// How many times the link reconnected.
    pub fn reconnections(&self) -> u64 {
        self.reconnections.load(Ordering::Relaxed)
    }

    /// A part of session `generation` is dead (its consumer ended, its publishing
    /// channel closed): the supervisor replaces the session.
    pub fn lost(&self, generation: u32, why: String) {
        let mut lost = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        if lost.is_none() {
            *lost = Some((generation, why));
            self.lost_notify.notify_one();
        }
    }

    /// Stops supervising and closes the connection cleanly; the broker requeues what
    /// was not acked.
    pub async fn close(&self) {
        self.stop.cancel();
        let session = self.session.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(session) = session {
            super::close(&session.conn, 200, "worker stopping").await;
        }
        self.connected.send_replace(false);
    }

    async fn supervise(self: Arc<Self>, sessions: mpsc::Sender<u32>) {
        let rabbit = &self.settings.broker.rabbitmq;
        let backoff =
            Backoff { initial: Duration::from_millis(200), max: Duration::from_secs(rabbit.reconnect_max_secs) };
        let mut generation = 0;
        loop {
            let Some(session) = self.session() else { return };
            let Some(why) = self.watch(&session).await else { return };
            self.session.lock().unwrap_or_else(|e| e.into_inner()).take();
            self.connected.send_replace(false);
            let outstanding = self.activity.outstanding.load(Ordering::Relaxed);
            tracing::warn!(reason = %why, unacked = outstanding, "RabbitMQ connection lost: not ready; reconnecting (unacked tickets are redelivered by the broker)");
            // Whatever is left of it goes, so the broker requeues its deliveries.
            super::close(&session.conn, 320, "reconnecting").await;
            drop(session);
            let down = Instant::now();
            generation += 1;
            let mut waits = backoff.waits();
            let session = loop {
                let attempt = tokio::time::timeout(SETUP_TIMEOUT, establish(&self.settings, generation));
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    result = attempt => match result {
                        Ok(Ok(up)) => break up,
                        Ok(Err(e)) => tracing::info!(error = %e, "RabbitMQ still unreachable"),
                        Err(_) => tracing::info!("connecting to RabbitMQ timed out"),
                    },
                }
                let wait = waits.next().unwrap_or(backoff.max);
                tokio::select! {
                    _ = self.stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            };
            *self.lost.lock().unwrap_or_else(|e| e.into_inner()) = None;
            // Publishing works before the first new delivery arrives.
            let session = Arc::new(session);
            *self.session.lock().unwrap_or_else(|e| e.into_inner()) = Some(session.clone());
            self.reconnections.fetch_add(1, Ordering::Relaxed);
            if self.stop.is_cancelled() || sessions.send(generation).await.is_err() {
                self.session.lock().unwrap_or_else(|e| e.into_inner()).take();
                super::close(&session.conn, 200, "worker stopping").await;
                return;
            }
            drop(session);
            self.connected.send_replace(true);
            tracing::warn!(down_for = ?down.elapsed(), generation, "reconnected to RabbitMQ: topology declared, consuming again");
        }
    }

    /// Waits until `session` is lost; returns why, or `None` when the link is closed.
    async fn watch(&self, session: &Session) -> Option<String> {
        let mut events = session.conn.events_listener();
        let timeout = Duration::from_secs(self.settings.broker.rabbitmq.stall_timeout_secs);
        let mut tick = tokio::time::interval(Duration::from_secs(1).min(timeout));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_stall_check = Instant::now() + timeout;
        let mut next_depth = Instant::now();
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return None,
                _ = self.lost_notify.notified() => {
                    let lost = self.lost.lock().unwrap_or_else(|e| e.into_inner()).take();
                    match lost {
                        Some((generation, why)) if generation == session.generation => return Some(why),
                        _ => {}
                    }
                }
                event = events.next() => match event {
                    Some(lapin::Event::Error(e)) => return Some(reason(&e)),
                    Some(lapin::Event::ConnectionBlocked(why)) => tracing::warn!(%why, "RabbitMQ blocked the connection (resource alarm): publishing waits"),
                    Some(lapin::Event::ConnectionUnblocked) => tracing::info!("RabbitMQ unblocked the connection"),
                    Some(_) => {}
                    None => return Some("the connection closed".into()),
                },
                _ = tick.tick() => {
                    if !session.conn.status().connected() {
                        return Some("the connection closed".into());
                    }
                    if Instant::now() >= next_depth {
                        next_depth = Instant::now() + DEPTH_INTERVAL;
                        self.report_depths(session).await;
                    }
                    if Instant::now() >= next_stall_check {
                        next_stall_check = Instant::now() + timeout / 4;
                        if let Some(why) = self.stalled(session, timeout).await {
                            return Some(why);
                        }
                    }
                }
            }
        }
    }

    /// Ready messages of the queues this worker consumes and of the dead-letter
    /// queue, for the metrics.
    async fn report_depths(&self, session: &Session) {
        let topics = &self.settings.broker.topics;
        let mut queues: Vec<String> =
            self.activity.consumed.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        queues.push(topics.dead_letters.clone());
        for queue in &queues {
            match queue_counts(&session.conn, queue).await {
                Ok((ready, _)) => crate::telemetry::queue_depth(queue, ready),
                Err(e) => tracing::debug!(%queue, error = %reason(&e), "could not read the queue depth"),
            }
        }
    }

    /// Whether a consumer of `session` has silently stopped receiving: a queue it
    /// consumes shows no consumer (the broker dropped ours), or, for the single input
    /// queue, nothing came for `timeout` while the queue has ready messages and the
    /// worker has room. (A shard's consumer may be standby behind the shard's previous
    /// owner, so a quiet shard is not a stall.)
    async fn stalled(&self, session: &Session, timeout: Duration) -> Option<String> {
        let a = &self.activity;
        let consumed: Vec<String> = a.consumed.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
        if self.settings.broker.rabbitmq.shards > 0 {
            for queue in &consumed {
                match queue_counts(&session.conn, queue).await {
                    Ok((_, 0)) => return Some(format!("`{queue}` shows no consumer: the broker dropped ours")),
                    Ok(_) => {}
                    Err(e) => return Some(format!("checking `{queue}` failed: {}", reason(&e))),
                }
            }
            return None;
        }
        let has_room = a.outstanding.load(Ordering::Relaxed) < usize::from(self.prefetch);
        let quiet = a.idle_for() >= timeout && session.started.elapsed() >= timeout;
        if a.paused.load(Ordering::Relaxed) || !has_room || !quiet {
            return None;
        }
        let queue = &self.settings.broker.topics.input;
        let (ready, consumers) = match queue_counts(&session.conn, queue).await {
            Ok(counts) => counts,
            Err(e) => return Some(format!("checking `{queue}` failed: {}", reason(&e))),
        };
        if consumers == 0 {
            Some(format!("`{queue}` shows no consumer: the broker dropped ours"))
        } else if ready > 0 {
            Some(format!(
                "the consumer stalled: nothing received for {timeout:?} while `{queue}` has {ready} ready messages"
            ))
        } else {
            None
        }
    }
}

/// Connects, declares the topology and opens the publishing channel; the source
/// then subscribes on the new connection.
async fn establish(settings: &Settings, generation: u32) -> Result<Session, RabbitError> {
    let conn = super::connect(&settings.broker.rabbitmq, &settings.worker.id).await?;
    topology::declare(&conn, &settings.broker).await?;
    let publish = Confirmed::open(&conn).await?;
    Ok(Session { generation, conn, publish, started: Instant::now() })
}

impl Session {
    pub(super) fn conn(&self) -> &Connection {
        &self.conn
    }
}

/// With input shards, tickets left in a queue named like the input (the single queue
/// of `shards = 0`, from before an upgrade) are consumed by nobody: said once, at
/// start, with what to do.
async fn warn_of_unsharded_tickets(conn: &Connection, input: &str) {
    if let Ok((ready, _)) = queue_counts(conn, input).await {
        if ready > 0 {
            tracing::warn!(
                queue = input,
                ready,
                "the queue `{input}` (the single input queue of broker.rabbitmq.shards = 0) holds tickets that workers with input shards do not consume: drain it with one worker started with TICKETFLOW__BROKER__RABBITMQ__SHARDS=0 (README: Moving from the single queue to shards)"
            );
        }
    }
}

/// Ready messages and consumers of `queue`, from a passive declare on a channel of
/// its own (a missing queue closes the channel it is asked on).
async fn queue_counts(conn: &Connection, queue: &str) -> Result<(u32, u32), lapin::Error> {
    let channel = conn.create_channel().await?;
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let result = channel.queue_declare(queue.into(), options, FieldTable::default()).await;
    super::close_channel(&channel, "checked").await;
    let q = result?;
    Ok((q.message_count(), q.consumer_count()))
}
