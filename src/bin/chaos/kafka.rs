//! The Kafka side of a run: librdkafka's mock cluster in this process (loopback TCP,
//! so the worker processes connect to it), topics of the run's own, a broker taken
//! down and up again, and the committed-offsets watch: every time the runner looks,
//! no offset the worker group committed may be past a message that has neither a
//! reply nor a dead letter on the output topics.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer as _, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;
use serde_json::Value;

use crate::Outputs;

/// Partitions of each topic: at least six, and one more per 2,500 tickets, because
/// librdkafka's mock cluster keeps only the newest 5 MB of a partition (about 5,000 of
/// our tickets, replies or pairs of cost records): older messages vanish, unread.
const MIN_PARTITIONS: i32 = 6;
const TICKETS_PER_PARTITION: usize = 2500;
const BROKER: i32 = 1;
const TIMEOUT: Duration = Duration::from_secs(3);

pub struct Kafka {
    partitions: i32,
    cluster: MockCluster<'static, DefaultProducerContext>,
    prefix: String,
    /// Reads the input and the output topics as they grow.
    tail: BaseConsumer,
    /// Asks for the worker group's committed offsets (it never joins the group).
    group: BaseConsumer,
    /// Publishes the poison messages.
    producer: ThreadedProducer<DefaultProducerContext>,
    /// The messages read so far, per topic and partition, in order.
    read: HashMap<(String, i32), Vec<Vec<u8>>>,
    /// The ticket of every input message read and its replay count (None: not a
    /// ticket), per partition.
    inputs: Vec<Vec<Option<(String, u32)>>>,
    /// Tickets with a reply on the replies topic.
    answered: HashSet<String>,
    /// Input partition and offset of every dead letter.
    dead_at: HashSet<(i64, i64)>,
    /// Offsets below which every input message was found finished, per partition.
    verified: Vec<i64>,
    /// Commits found past an unfinished message.
    pub commit_violations: Vec<String>,
    /// The committed offsets and the input's ends last seen, for a report.
    pub last_seen: String,
    /// The committed offsets last seen, per partition.
    last_committed: Vec<i64>,
    /// How many times the commits were checked.
    pub commit_checks: usize,
}

impl Kafka {
    pub fn start(tag: &str, tickets: usize) -> Result<Kafka, String> {
        let partitions = MIN_PARTITIONS.max(i32::try_from(tickets.div_ceil(TICKETS_PER_PARTITION)).unwrap_or(i32::MAX));
        let cluster = MockCluster::new(1).map_err(|e| format!("cannot start the Kafka mock cluster: {e}"))?;
        let prefix = tag.to_owned();
        for t in ["in", "replies", "costs", "dlq"] {
            cluster
                .create_topic(&format!("{prefix}-{t}"), partitions, 1)
                .map_err(|e| format!("cannot create topic {prefix}-{t}: {e}"))?;
        }
        let tail: BaseConsumer = client(&cluster.bootstrap_servers(), &format!("{prefix}-chaos-reader"))
            .create()
            .map_err(|e| format!("Kafka reader: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        for t in ["in", "replies", "costs", "dlq"] {
            for p in 0..partitions {
                tpl.add_partition_offset(&format!("{prefix}-{t}"), p, Offset::Beginning)
                    .map_err(|e| format!("Kafka reader: {e}"))?;
            }
        }
        tail.assign(&tpl).map_err(|e| format!("Kafka reader: {e}"))?;
        let group = client(&cluster.bootstrap_servers(), &format!("{prefix}-group"))
            .create()
            .map_err(|e| format!("Kafka group reader: {e}"))?;
        let producer = client(&cluster.bootstrap_servers(), "unused")
            .set("enable.idempotence", "true")
            .create()
            .map_err(|e| format!("Kafka producer: {e}"))?;
        Ok(Kafka {
            partitions,
            cluster,
            prefix,
            tail,
            group,
            producer,
            read: HashMap::new(),
            inputs: vec![Vec::new(); partitions as usize],
            answered: HashSet::new(),
            dead_at: HashSet::new(),
            verified: vec![0; partitions as usize],
            commit_violations: Vec::new(),
            last_seen: String::new(),
            last_committed: Vec::new(),
            commit_checks: 0,
        })
    }

    fn topic(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("TICKETFLOW__BROKER__KIND".into(), "kafka".into()),
            ("TICKETFLOW__BROKER__KAFKA__BOOTSTRAP_SERVERS".into(), self.cluster.bootstrap_servers()),
            ("TICKETFLOW__BROKER__KAFKA__GROUP_ID".into(), self.topic("group")),
            // A killed member's partitions wait this long before the group moves them.
            ("TICKETFLOW__BROKER__KAFKA__SESSION_TIMEOUT_MS".into(), "6000".into()),
            ("TICKETFLOW__BROKER__KAFKA__COMMIT_INTERVAL_MS".into(), "200".into()),
            ("TICKETFLOW__BROKER__TOPICS__INPUT".into(), self.topic("in")),
            ("TICKETFLOW__BROKER__TOPICS__REPLIES".into(), self.topic("replies")),
            ("TICKETFLOW__BROKER__TOPICS__COSTS".into(), self.topic("costs")),
            ("TICKETFLOW__BROKER__TOPICS__DEAD_LETTERS".into(), self.topic("dlq")),
        ]
    }

    /// Publishes raw payloads to the input, each keyed by its position.
    pub fn publish(&self, payloads: &[Vec<u8>]) -> Result<(), String> {
        let topic = self.topic("in");
        for p in payloads {
            let key = String::from_utf8_lossy(p).into_owned();
            self.producer
                .send(BaseRecord::to(&topic).key(&key).payload(p))
                .map_err(|(e, _)| format!("producing to {topic}: {e}"))?;
        }
        self.producer.flush(Duration::from_secs(30)).map_err(|e| format!("producing to {topic}: {e}"))
    }

    /// The offsets the worker group committed on the input, per partition (-1: none).
    fn committed(&self) -> Option<Vec<i64>> {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic("in"), p);
        }
        let committed = self.group.committed_offsets(tpl, Duration::from_secs(3)).ok()?;
        Some(committed.elements().iter().map(|e| if let Offset::Offset(o) = e.offset() { o } else { -1 }).collect())
    }

    /// Reads every topic up to the ends it has now.
    fn catch_up(&mut self) -> Result<(), String> {
        // The ends of every partition now, in one request (a ListOffsets for the
        // latest offsets: timestamp -1).
        let mut tpl = TopicPartitionList::new();
        for t in ["in", "replies", "costs", "dlq"] {
            for p in 0..self.partitions {
                tpl.add_partition_offset(&self.topic(t), p, Offset::End).map_err(|e| format!("Kafka: {e}"))?;
            }
        }
        let latest = self.tail.offsets_for_times(tpl, TIMEOUT).map_err(|e| format!("Kafka end offsets: {e}"))?;
        let mut ends = HashMap::new();
        for e in latest.elements() {
            let Offset::Offset(high) = e.offset() else {
                return Err(format!("Kafka end offsets: {}/{} has none ({:?})", e.topic(), e.partition(), e.offset()));
            };
            ends.insert((e.topic().to_owned(), e.partition()), high);
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        let behind = |read: &HashMap<(String, i32), Vec<Vec<u8>>>| {
            ends.iter().any(|(k, &high)| read.get(k).map_or(0, |m| m.len() as i64) < high)
        };
        while behind(&self.read) {
            if Instant::now() > deadline {
                return Err("reading the Kafka topics took over two minutes".into());
            }
            match self.tail.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    let key = (m.topic().to_owned(), m.partition());
                    let seen = self.read.entry(key).or_default();
                    if m.offset() < seen.len() as i64 {
                        continue; // read already (fetched again after a reconnection)
                    }
                    if m.offset() > seen.len() as i64 {
                        // No transactions here: a gap is the mock's size cap at work.
                        return Err(format!(
                            "{}/{}: offsets {}..{} were deleted before the runner read them (the mock cluster keeps 5 MB per partition)",
                            m.topic(),
                            m.partition(),
                            seen.len(),
                            m.offset()
                        ));
                    }
                    let payload = m.payload().unwrap_or_default();
                    let json = serde_json::from_slice::<Value>(payload).ok();
                    let what = m.topic().rsplit('-').next().unwrap_or_default();
                    match (what, json) {
                        ("in", json) => {
                            let replays = ticketflow::broker::kafka::replay_count(&m);
                            let ticket = json.and_then(|t| t["ticket_id"].as_str().map(str::to_owned));
                            self.inputs[m.partition() as usize].push(ticket.map(|t| (t, replays)));
                        }
                        ("replies", Some(reply)) => {
                            self.answered.insert(reply["ticket_id"].as_str().unwrap_or_default().to_owned());
                        }
                        ("dlq", Some(letter)) => {
                            let source = &letter["source"];
                            let at =
                                (source["partition"].as_i64().unwrap_or(-1), source["offset"].as_i64().unwrap_or(-1));
                            self.dead_at.insert(at);
                        }
                        _ => {}
                    }
                    // The input is kept as tickets only.
                    seen.push(if what == "in" { Vec::new() } else { payload.to_vec() });
                }
                Some(Err(e)) => return Err(format!("reading Kafka: {e}")),
                None => {}
            }
        }
        Ok(())
    }

    /// Reads the committed offsets, then the topics up to now, and records every
    /// committed offset past an input message with neither a reply nor a dead letter.
    /// Returns whether the commits reach the end of every input partition.
    pub fn check_commits(&mut self) -> Result<bool, String> {
        let Some(committed) = self.committed() else {
            // After a broker restart a client can take minutes to find the group's
            // coordinator again: the next check asks with a new one.
            crate::note("committed offsets: no answer");
            if let Ok(fresh) = client(&self.cluster.bootstrap_servers(), &self.topic("group")).create() {
                self.group = fresh;
            }
            return Ok(false);
        };
        crate::note(&format!("committed {committed:?}"));
        if let Err(e) = self.catch_up() {
            // The broker is down: no check this time.
            crate::note(&e);
            return Ok(false);
        }
        crate::note("caught up");
        self.commit_checks += 1;
        let ends: Vec<usize> = self.inputs.iter().map(Vec::len).collect();
        self.last_seen = format!("committed {committed:?}, input ends {ends:?}");
        self.last_committed.clone_from(&committed);
        // A ticket sent twice is answered once: a copy with the same replay count as a
        // dead-lettered message of its ticket is finished by that dead letter.
        let dead: HashSet<&(String, u32)> = self
            .dead_at
            .iter()
            .filter_map(|&(p, o)| self.inputs.get(usize::try_from(p).ok()?)?.get(usize::try_from(o).ok()?)?.as_ref())
            .collect();
        let mut at_end = true;
        for (p, &commit) in committed.iter().enumerate() {
            let input = &self.inputs[p];
            at_end &= commit == input.len() as i64;
            for offset in self.verified[p]..commit.min(input.len() as i64) {
                let message = &input[offset as usize];
                let finished = self.dead_at.contains(&(p as i64, offset))
                    || message.as_ref().is_some_and(|m| self.answered.contains(&m.0) || dead.contains(m));
                if !finished && self.commit_violations.len() < 20 {
                    self.commit_violations.push(format!(
                        "partition {p} committed at {commit} past offset {offset} ({}), which has neither a reply nor a dead letter{}",
                        message.as_ref().map_or("not a ticket", |m| m.0.as_str()),
                        message.as_ref().map_or(String::new(), |m| self.whereabouts(&m.0)),
                    ));
                }
            }
            self.verified[p] = self.verified[p].max(commit);
        }
        Ok(at_end)
    }

    /// Where a ticket's messages are in the input (partition/offset and replay count)
    /// and where its dead letters came from, as read so far: for a commit violation.
    fn whereabouts(&self, ticket: &str) -> String {
        let mut sent = Vec::new();
        for (p, input) in self.inputs.iter().enumerate() {
            for (o, m) in input.iter().enumerate() {
                if let Some((t, replays)) = m {
                    if t == ticket {
                        sent.push(format!("{p}/{o} (replay {replays})"));
                    }
                }
            }
        }
        let mut dead: Vec<String> = self
            .dead_at
            .iter()
            .filter(|&&(p, o)| {
                let m = usize::try_from(p).ok().and_then(|p| self.inputs.get(p)?.get(usize::try_from(o).ok()?));
                m.is_some_and(|m| m.as_ref().is_some_and(|m| m.0 == ticket))
            })
            .map(|(p, o)| format!("{p}/{o}"))
            .collect();
        dead.sort();
        format!(" (sent at {}; dead letters from [{}])", sent.join(", "), dead.join(", "))
    }

    /// The first `most` input messages past the last commits seen (partition, offset,
    /// ticket): what a commit short of the end waits for.
    pub fn uncommitted(&self, most: usize) -> Vec<(usize, i64, Option<String>)> {
        let mut out = Vec::new();
        for (p, &commit) in self.last_committed.iter().enumerate() {
            let input = &self.inputs[p];
            for offset in commit.max(0)..input.len() as i64 {
                out.push((p, offset, input[offset as usize].as_ref().map(|m| m.0.clone())));
            }
        }
        out.truncate(most);
        out
    }

    /// Everything the output topics hold (the replies partition by partition).
    pub fn outputs(&mut self) -> Result<Outputs, String> {
        self.catch_up()?;
        let all = |s: &Kafka, what: &str| -> Vec<Vec<Vec<u8>>> {
            (0..s.partitions).map(|p| s.read.get(&(s.topic(what), p)).cloned().unwrap_or_default()).collect()
        };
        Ok(Outputs {
            replies: all(self, "replies"),
            dead: all(self, "dlq").concat(),
            costs: all(self, "costs").concat(),
        })
    }

    /// The broker down (connections closed, new ones refused) for `down`, then up.
    pub async fn restart(&self, down: Duration) -> Result<(), String> {
        self.cluster.broker_down(BROKER).map_err(|e| format!("broker down: {e}"))?;
        tokio::time::sleep(down).await;
        self.cluster.broker_up(BROKER).map_err(|e| format!("broker up: {e}"))
    }
}

fn client(bootstrap: &str, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("log_level", "0")
        // Back soon after a broker restart (librdkafka waits up to 10 s by default).
        .set("reconnect.backoff.ms", "100")
        .set("reconnect.backoff.max.ms", "1000")
        .set("topic.metadata.refresh.interval.ms", "2000");
    c
}
