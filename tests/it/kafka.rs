//! The Kafka worker against librdkafka's mock cluster (in this process, on loopback
//! TCP, so worker processes connect to it): every ticket answered once, in
//! conversation order, and the group's committed offsets at the end of every
//! partition.

use std::collections::HashMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientConfig;

use crate::helpers::{bin, produce_stdin, published_units, synth_tickets};

const PARTITIONS: i32 = 6;

/// A mock cluster with one test's topics, and the settings pointing at it.
struct Cluster {
    cluster: MockCluster<'static, DefaultProducerContext>,
    prefix: String,
}

impl Cluster {
    fn new() -> Cluster {
        let cluster = MockCluster::new(1).unwrap();
        let prefix = format!("tf-test-{}", uuid::Uuid::new_v4().simple());
        let c = Cluster { cluster, prefix };
        for t in ["in", "replies", "costs", "dlq"] {
            c.cluster.create_topic(&c.topic(t), PARTITIONS, 1).unwrap();
        }
        c
    }

    fn topic(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }

    fn env(&self) -> Vec<(String, String)> {
        vec![
            ("TICKETFLOW__BROKER__KIND".into(), "kafka".into()),
            ("TICKETFLOW__BROKER__KAFKA__BOOTSTRAP_SERVERS".into(), self.cluster.bootstrap_servers()),
            ("TICKETFLOW__BROKER__KAFKA__GROUP_ID".into(), self.topic("group")),
            ("TICKETFLOW__BROKER__KAFKA__SESSION_TIMEOUT_MS".into(), "6000".into()),
            ("TICKETFLOW__BROKER__TOPICS__INPUT".into(), self.topic("in")),
            ("TICKETFLOW__BROKER__TOPICS__REPLIES".into(), self.topic("replies")),
            ("TICKETFLOW__BROKER__TOPICS__COSTS".into(), self.topic("costs")),
            ("TICKETFLOW__BROKER__TOPICS__DEAD_LETTERS".into(), self.topic("dlq")),
        ]
    }

    fn consumer(&self, group: &str) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", self.cluster.bootstrap_servers())
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()
            .unwrap()
    }

    /// Every message of `topic`, partition by partition, in order.
    fn read_all(&self, topic: &str) -> Vec<Vec<serde_json::Value>> {
        let consumer = self.consumer("tf-test-reader");
        let mut out = Vec::new();
        for p in 0..PARTITIONS {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(topic, p, Offset::Beginning).unwrap();
            consumer.assign(&tpl).unwrap();
            let mut messages = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while (messages.len() as i64) < high {
                assert!(std::time::Instant::now() < deadline, "reading {topic}/{p}");
                if let Some(m) = consumer.poll(Duration::from_millis(100)) {
                    let m = m.unwrap();
                    messages.push(serde_json::from_slice(m.payload().unwrap()).unwrap());
                }
            }
            out.push(messages);
        }
        out
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tickets_on_six_partitions_are_answered_once_in_order_and_fully_committed() {
    let (total, conversations) = (10_000, 2_000);
    let c = Cluster::new();
    let db = crate::ledger_pg::TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let config = crate::helpers::instant_config(dir.path());
    let mut env = c.env();
    env.push(("TICKETFLOW__DATABASE__URL".into(), db.url.clone()));
    // Jittery calls: later tickets of a conversation would overtake earlier ones if
    // the worker let them run side by side.
    for p in ["QWEN", "OPENAI", "ANTHROPIC", "MISTRAL", "DEEPSEEK"] {
        env.push((format!("TICKETFLOW__PROVIDERS__{p}__LATENCY_MS"), "3".into()));
        env.push((format!("TICKETFLOW__PROVIDERS__{p}__JITTER_MS"), "3".into()));
    }
    produce_stdin(env.iter().cloned(), &synth_tickets(total, conversations));
    let mut worker = bin()
        .arg("--config")
        .arg(&config)
        .arg("worker")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = worker.stderr.take().unwrap();
    let said = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while published_units(&db).await < total as i64 {
        if std::time::Instant::now() > deadline || worker.try_wait().unwrap().is_some() {
            let _ = worker.kill();
            panic!("not every ticket answered: {}", said.join().unwrap());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::process::Command::new("kill").arg("-TERM").arg(worker.id().to_string()).status().unwrap();
    let status = worker.wait().unwrap();
    let said = said.join().unwrap();
    assert!(status.success(), "{said}");

    // One reply per ticket, each conversation's in input order (a conversation's
    // replies share a partition: their key).
    let mut seen = HashMap::new();
    for partition in c.read_all(&c.topic("replies")) {
        let mut last: HashMap<String, usize> = HashMap::new();
        for reply in partition {
            let ticket = reply["ticket_id"].as_str().unwrap().to_owned();
            let index: usize = ticket.trim_start_matches("S-").parse().unwrap();
            let conversation = reply["conversation_id"].as_str().unwrap().to_owned();
            if let Some(before) = last.insert(conversation.clone(), index) {
                assert!(before < index, "{conversation}: S-{index} answered after S-{before}");
            }
            assert!(seen.insert(ticket, ()).is_none(), "a ticket answered twice");
        }
    }
    assert_eq!(seen.len(), total);
    // The group's committed offsets are the end of every input partition.
    let consumer = c.consumer(&c.topic("group"));
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(&c.topic("in"), p);
    }
    let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
    for e in committed.elements() {
        let (_, high) = consumer.fetch_watermarks(&c.topic("in"), e.partition(), Duration::from_secs(10)).unwrap();
        assert_eq!(e.offset(), Offset::Offset(high), "partition {}", e.partition());
    }
    db.drop_db().await;
}
