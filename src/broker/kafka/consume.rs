//! The Kafka consumer: a group member with cooperative-sticky assignment whose
//! partitions are the dispatcher's lanes.
//!
//! A thread of its own polls librdkafka without pause, whatever the dispatcher does,
//! so the member never exceeds `max.poll.interval.ms` (not during a database outage
//! either): backpressure pauses partitions instead. The same thread pauses and
//! resumes them, between polls, so a pause or resume never interleaves with an
//! assignment (librdkafka can leave a partition paused for good when they race,
//! confluentinc/librdkafka#5591). After every assignment it applies the wanted state
//! to the whole assignment again (a partition paused, revoked and assigned back stays
//! paused in librdkafka), and while intake runs it resumes the assignment every
//! second, a no-op for partitions that are not paused.
//!
//! Polled messages go to the dispatcher with an acker; their offsets are tracked
//! ([`Offsets`]) and only the highest contiguous finished offset of a partition is
//! stored (`enable.auto.offset.store=false`), then committed on an interval by
//! librdkafka, at every revocation and at shutdown.
//!
//! A revocation runs in librdkafka's rebalance callback on the polling thread: it
//! reports the lanes revoked, waits until the dispatcher has drained them (handing
//! back what had not started, letting running tickets finish or abandoning them at
//! its deadline), commits their final positions, and only then lets the partitions
//! go. The next owner starts at the first unfinished message; the ledger keeps what
//! is redone from being answered or paid twice.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message as _;
use rdkafka::statistics::Statistics;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;
use tokio::sync::{mpsc, oneshot};

use super::offsets::Offsets;
use super::{client_config, KafkaSetupError};
use crate::broker::{Acker, BrokerError, Delivery, Lane, Message, Source, SourceEvent};
use crate::intake;
use crate::settings::Settings;
use crate::ticket::SourceRef;

/// The librdkafka context: rebalances become lane events, statistics the lag.
struct Ctx {
    control: mpsc::UnboundedSender<SourceEvent>,
    offsets: Arc<Offsets>,
    lag: Arc<Mutex<ConsumerLag>>,
    /// Whether a broker answers: false after librdkafka reports all brokers down,
    /// true again once the statistics show one up (without statistics, always true).
    connected: Arc<AtomicBool>,
    statistics: bool,
    /// Set by an assignment, for the polling thread to pause or resume it.
    reassigned: AtomicBool,
}

/// Messages behind the end of each assigned partition, counted from the first
/// unfinished one (its stored or committed offset, or the partition's start when
/// the group has none yet), as of librdkafka's latest statistics.
pub type ConsumerLag = std::collections::BTreeMap<(String, i32), i64>;

impl ClientContext for Ctx {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        if self.statistics && error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::AllBrokersDown) {
            self.connected.store(false, Ordering::Relaxed);
        }
        if missing_topic(&error) {
            // The polling thread says that it waits for the input, every few seconds.
            tracing::debug!("librdkafka: {error}: {reason}");
            return;
        }
        tracing::error!("librdkafka: {error}: {reason}");
    }

    fn stats(&self, statistics: Statistics) {
        if statistics.brokers.values().any(|b| b.state == "UP") {
            self.connected.store(true, Ordering::Relaxed);
        }
        let mut lag = ConsumerLag::new();
        for (topic, t) in &statistics.topics {
            for p in t.partitions.values() {
                // Partition -1 is librdkafka's internal one; `desired` marks assigned ones.
                if p.partition < 0 || !p.desired || p.hi_offset < 0 {
                    continue;
                }
                let from = p.stored_offset.max(p.committed_offset);
                let from = if from >= 0 { from } else { p.lo_offset };
                if from >= 0 {
                    lag.insert((topic.clone(), p.partition), (p.hi_offset - from).max(0));
                }
            }
        }
        tracing::debug!(?lag, "consumer lag");
        let mut last = self.lag.lock().unwrap_or_else(|e| e.into_inner());
        // A partition no longer assigned here lags nothing on this worker.
        for (topic, partition) in last.keys().filter(|k| !lag.contains_key(*k)) {
            crate::telemetry::consumer_lag(topic, *partition, 0);
        }
        for ((topic, partition), behind) in &lag {
            crate::telemetry::consumer_lag(topic, *partition, *behind);
        }
        *last = lag;
    }
}

fn lanes_of(tpl: &TopicPartitionList) -> Vec<Lane> {
    tpl.elements().iter().map(|e| Lane { topic: e.topic().to_owned(), partition: e.partition() }).collect()
}

/// Commits, synchronously, the position of each of `partitions` with messages polled.
fn commit_positions(
    consumer: &BaseConsumer<Ctx>,
    offsets: &Offsets,
    partitions: &[(&str, i32)],
) -> rdkafka::error::KafkaResult<()> {
    let mut commit = TopicPartitionList::new();
    for (topic, partition) in partitions {
        if let Some(position) = offsets.position(topic, *partition) {
            commit.add_partition_offset(topic, *partition, Offset::Offset(position))?;
        }
    }
    if commit.count() == 0 {
        return Ok(());
    }
    consumer.commit(&commit, CommitMode::Sync)
}

impl ConsumerContext for Ctx {
    /// The outcome of librdkafka's interval commits: a failure is retried at the next
    /// interval, but an operator must see it (a commit that keeps failing means
    /// redelivery after a restart).
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        use rdkafka::error::KafkaError;
        use rdkafka::types::RDKafkaErrorCode;
        match result {
            // An interval with nothing new to commit.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %super::reason(&e), "offset commit failed; the next interval tries again"),
            Ok(()) => {
                let mut committed = Vec::new();
                for e in offsets.elements() {
                    match (e.error(), e.offset()) {
                        (Err(err), _) => {
                            tracing::warn!(topic = e.topic(), partition = e.partition(), error = %super::reason(&err), "offset commit failed for a partition; the next interval tries again")
                        }
                        (Ok(()), Offset::Offset(at)) => committed.push(format!("{}@{at}", e.partition())),
                        (Ok(()), _) => {}
                    }
                }
                if !committed.is_empty() {
                    tracing::debug!(partitions = %committed.join(" "), "offsets committed");
                }
            }
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let lanes = lanes_of(tpl);
        tracing::info!(?lanes, "partitions revoked: draining them");
        let (drained, done) = oneshot::channel();
        if self.control.send(SourceEvent::Revoked { lanes: lanes.clone(), drained }).is_ok() {
            // The dispatcher answers within its drain deadline (or drops the sender
            // when it stops).
            let _ = done.blocking_recv();
        }
        let partitions: Vec<(&str, i32)> = lanes.iter().map(|l| (l.topic.as_str(), l.partition)).collect();
        if let Err(e) = commit_positions(consumer, &self.offsets, &partitions) {
            tracing::warn!(error = %super::reason(&e), "committing revoked partitions failed; their next owner may redo finished tickets (the ledger answers them from its record)");
        }
        for lane in &lanes {
            self.offsets.forget(&lane.topic, lane.partition);
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.reassigned.store(true, Ordering::Relaxed);
                let lanes = lanes_of(tpl);
                tracing::info!(?lanes, "partitions assigned");
                let _ = self.control.send(SourceEvent::Assigned(lanes));
            }
            Rebalance::Error(e) => tracing::warn!(error = %super::reason(e), "rebalance failed"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The consumer of the input topic.
pub struct KafkaSource {
    offsets: Arc<Offsets>,
    lag: Arc<Mutex<ConsumerLag>>,
    connected: Arc<AtomicBool>,
    control: mpsc::UnboundedReceiver<SourceEvent>,
    deliveries: mpsc::UnboundedReceiver<Delivery>,
    pending: VecDeque<SourceEvent>,
    paused: bool,
    /// What the dispatcher wants, applied to librdkafka by the polling thread.
    want_paused: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    poller: Option<std::thread::JoinHandle<()>>,
}

impl KafkaSource {
    /// Joins the group and starts polling the input topic.
    pub fn start(settings: &Settings) -> Result<Self, KafkaSetupError> {
        let k = &settings.broker.kafka;
        let (control_tx, control) = mpsc::unbounded_channel();
        let (deliveries_tx, deliveries) = mpsc::unbounded_channel();
        let offsets = Arc::new(Offsets::default());
        let lag = Arc::new(Mutex::new(ConsumerLag::new()));
        let connected = Arc::new(AtomicBool::new(true));
        let consumer: BaseConsumer<Ctx> = client_config(k)?
            .set("group.id", &k.group_id)
            .set("client.id", &settings.worker.id)
            .set("partition.assignment.strategy", "cooperative-sticky")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", k.commit_interval_ms.to_string())
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", k.session_timeout_ms.to_string())
            // What librdkafka fetches ahead per partition set, beyond what the
            // dispatcher holds: a bound on memory while partitions are paused.
            .set("queued.max.messages.kbytes", "16384")
            .set("statistics.interval.ms", k.statistics_interval_ms.to_string())
            // A subscribed topic that does not exist yet is looked for again at each
            // metadata refresh: every five minutes by default, so a worker started
            // before its input topic would wait that long once it is created.
            .set("topic.metadata.refresh.interval.ms", INPUT_LOOK.as_millis().to_string())
            .create_with_context(Ctx {
                control: control_tx,
                offsets: offsets.clone(),
                lag: lag.clone(),
                connected: connected.clone(),
                statistics: k.statistics_interval_ms > 0,
                reassigned: AtomicBool::new(false),
            })
            .map_err(|e| KafkaSetupError::Broker { servers: k.bootstrap_servers.clone(), reason: super::reason(&e) })?;
        let input = settings.broker.topics.input.clone();
        consumer
            .subscribe(&[input.as_str()])
            .map_err(|e| KafkaSetupError::Broker { servers: k.bootstrap_servers.clone(), reason: super::reason(&e) })?;
        let consumer = Arc::new(consumer);
        let stop = Arc::new(AtomicBool::new(false));
        let want_paused = Arc::new(AtomicBool::new(false));
        let poller = std::thread::Builder::new()
            .name("kafka-poll".into())
            .spawn({
                let (consumer, offsets, stop) = (consumer.clone(), offsets.clone(), stop.clone());
                let want_paused = want_paused.clone();
                let input = input.clone();
                move || poll_loop(consumer, &input, offsets, deliveries_tx, stop, want_paused)
            })
            .map_err(|e| KafkaSetupError::Config(format!("cannot start the polling thread: {e}")))?;
        Ok(KafkaSource {
            offsets,
            lag,
            connected,
            control,
            deliveries,
            pending: VecDeque::new(),
            paused: false,
            want_paused,
            stop,
            poller: Some(poller),
        })
    }

    /// The commit position of every partition with messages polled, for tests and
    /// the metrics issue (consumer lag).
    pub fn offsets(&self) -> Arc<Offsets> {
        self.offsets.clone()
    }

    /// Whether the consumer reaches a broker, for the worker's readiness: false from
    /// librdkafka's "all brokers down" until statistics show a broker up again.
    pub fn connected(&self) -> Arc<AtomicBool> {
        self.connected.clone()
    }

    /// The consumer lag of every assigned partition, as of the latest statistics
    /// (`broker.kafka.statistics_interval_ms`), for the metrics.
    pub fn lag(&self) -> ConsumerLag {
        self.lag.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// How often the polling thread resumes the whole assignment while intake runs.
const RESUME_AGAIN: Duration = Duration::from_secs(1);

/// Pauses or resumes every assigned partition. Called on the polling thread only.
fn pause_assignment(consumer: &BaseConsumer<Ctx>, pause: bool) -> rdkafka::error::KafkaResult<()> {
    let assignment = consumer.assignment()?;
    if pause {
        consumer.pause(&assignment)
    } else {
        consumer.resume(&assignment)
    }
}

/// How often a worker without partitions looks whether its input topic exists (and
/// librdkafka refreshes its metadata, which finds a topic created meanwhile).
const INPUT_LOOK: Duration = Duration::from_secs(5);

/// An error that says a topic does not exist (yet).
fn missing_topic(error: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::types::RDKafkaErrorCode::{UnknownTopic, UnknownTopicOrPartition};
    matches!(error.rdkafka_error_code(), Some(UnknownTopic | UnknownTopicOrPartition))
}

/// Whether `topic` exists with partitions, as the cluster says; `None` when it could
/// not be asked.
fn topic_exists(consumer: &BaseConsumer<Ctx>, topic: &str) -> Option<bool> {
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(2)).ok()?;
    let found = metadata.topics().iter().find(|t| t.name() == topic);
    Some(found.is_some_and(|t| t.error().is_none() && !t.partitions().is_empty()))
}

fn poll_loop(
    consumer: Arc<BaseConsumer<Ctx>>,
    input: &str,
    offsets: Arc<Offsets>,
    deliveries: mpsc::UnboundedSender<Delivery>,
    stop: Arc<AtomicBool>,
    want_paused: Arc<AtomicBool>,
) {
    let mut applied: Option<bool> = None;
    let mut applied_at = Instant::now();
    // The first look a second after the start, when the group has had time to assign.
    let mut looked_at = Instant::now().checked_sub(INPUT_LOOK - Duration::from_secs(1)).unwrap_or_else(Instant::now);
    while !stop.load(Ordering::Relaxed) {
        // Without partitions, say every few seconds whether the input is missing.
        if looked_at.elapsed() >= INPUT_LOOK {
            looked_at = Instant::now();
            let unassigned = consumer.assignment().is_ok_and(|a| a.count() == 0);
            if unassigned && topic_exists(&consumer, input) == Some(false) {
                tracing::warn!(
                    topic = input,
                    "waiting for the input topic `{input}`: it does not exist yet (`ticketflow topics` creates it); looking again in {} s",
                    INPUT_LOOK.as_secs()
                );
            }
        }
        let want = want_paused.load(Ordering::Relaxed);
        let reassigned = consumer.context().reassigned.swap(false, Ordering::Relaxed);
        if applied != Some(want) || reassigned || !want && applied_at.elapsed() >= RESUME_AGAIN {
            match pause_assignment(&consumer, want) {
                Ok(()) => applied = Some(want),
                Err(e) => {
                    tracing::warn!(error = %super::reason(&e), paused = want, "could not pause or resume the assigned partitions; trying again")
                }
            }
            applied_at = Instant::now();
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let payload = bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default());
                let key = m
                    .key()
                    .and_then(|k| std::str::from_utf8(k).ok())
                    .filter(|k| !k.is_empty())
                    .map(str::to_owned)
                    .or_else(|| intake::conversation_key(&payload));
                let replay_count = super::replay_count(&m);
                let (topic, partition, offset) = (m.topic().to_owned(), m.partition(), m.offset());
                offsets.polled(&topic, partition, offset);
                let message = Message {
                    payload,
                    full_len: None,
                    source: SourceRef { topic: topic.clone(), partition, offset },
                    key,
                    redelivered: false,
                    stable_offset: true,
                    replay_count,
                };
                let acker =
                    KafkaAcker { consumer: consumer.clone(), offsets: offsets.clone(), topic, partition, offset };
                if deliveries.send(Delivery { message, acker: Box::new(acker) }).is_err() {
                    break; // the source is gone
                }
            }
            Some(Err(e)) if missing_topic(&e) => tracing::debug!(error = %super::reason(&e), "a topic is missing"),
            Some(Err(e)) => tracing::warn!(error = %super::reason(&e), "Kafka consumer error"),
            None => {}
        }
    }
    // Stopping: commit what is finished, then leave the group (the final revocation
    // finds no dispatcher and commits the same positions).
    if let Ok(assignment) = consumer.assignment() {
        let elements = assignment.elements();
        let partitions: Vec<(&str, i32)> = elements.iter().map(|e| (e.topic(), e.partition())).collect();
        if let Err(e) = commit_positions(&consumer, &offsets, &partitions) {
            tracing::warn!(error = %super::reason(&e), "final offset commit failed");
        }
    }
    // Leave the group here, serving the revocation on this thread: closing a consumer
    // that still holds partitions from `Drop` can hang in librdkafka's incremental
    // unassign (seen with cooperative-sticky), and a worker must always stop.
    consumer.unsubscribe();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        let _ = consumer.poll(Duration::from_millis(100));
        if consumer.assignment().map(|a| a.count() == 0).unwrap_or(true) {
            break;
        }
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // No one answers revocations any more: a rebalance during the close must not wait.
        self.control.close();
        while self.control.try_recv().is_ok() {}
        if let Some(poller) = self.poller.take() {
            let _ = poller.join();
        }
    }
}

#[async_trait]
impl Source for KafkaSource {
    async fn next(&mut self) -> Result<Option<SourceEvent>, BrokerError> {
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(Some(event));
            }
            let deliver = !self.paused;
            tokio::select! {
                biased;
                event = self.control.recv() => match event {
                    Some(SourceEvent::Revoked { lanes, drained }) => {
                        // Everything polled before the revocation comes first.
                        while let Ok(d) = self.deliveries.try_recv() {
                            self.pending.push_back(SourceEvent::Delivery(d));
                        }
                        self.pending.push_back(SourceEvent::Revoked { lanes, drained });
                    }
                    Some(event) => return Ok(Some(event)),
                    None => return Ok(None),
                },
                delivery = self.deliveries.recv(), if deliver => match delivery {
                    Some(d) => return Ok(Some(SourceEvent::Delivery(d))),
                    None => return Err(BrokerError::Source("the Kafka polling thread stopped".into())),
                },
            }
        }
    }

    /// Pauses every assigned partition (the polling thread does it before its next
    /// poll); what was polled already waits here.
    fn pause(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        self.paused = true;
        self.want_paused.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn resume(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        self.paused = false;
        self.want_paused.store(false, Ordering::Relaxed);
        Ok(())
    }
}

/// Marks one message finished; its partition's stored offset moves up to the first
/// unfinished message.
struct KafkaAcker {
    consumer: Arc<BaseConsumer<Ctx>>,
    offsets: Arc<Offsets>,
    topic: String,
    partition: i32,
    offset: i64,
}

impl KafkaAcker {
    fn complete(&self) {
        let Some(position) = self.offsets.completed(&self.topic, self.partition, self.offset) else { return };
        let mut tpl = TopicPartitionList::new();
        let _ = tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(position));
        if let Err(e) = self.consumer.store_offsets(&tpl) {
            // The partition was revoked meanwhile: its final position is committed.
            tracing::debug!(error = %super::reason(&e), "offset not stored");
        }
    }
}

#[async_trait]
impl Acker for KafkaAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        self.complete();
        Ok(())
    }

    async fn nack(self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        if requeue {
            // Handed back (revocation, shutdown): its offset stays uncommitted, so the
            // partition's next owner (or next run) starts from it.
            return Ok(());
        }
        // Kafka has no dead-letter exchange: a message whose dead letter could not be
        // published must not block its partition for ever.
        tracing::error!(topic = %self.topic, partition = self.partition, offset = self.offset, "message rejected without a published dead letter; its offset moves on (see the ledger's dead_letters)");
        self.complete();
        Ok(())
    }
}
