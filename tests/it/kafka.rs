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
        Cluster::with_input_partitions(PARTITIONS)
    }

    fn with_input_partitions(input: i32) -> Cluster {
        let cluster = MockCluster::new(1).unwrap();
        let prefix = format!("tf-test-{}", uuid::Uuid::new_v4().simple());
        let c = Cluster { cluster, prefix };
        c.cluster.create_topic(&c.topic("in"), input, 1).unwrap();
        for t in ["replies", "costs", "dlq"] {
            c.cluster.create_topic(&c.topic(t), PARTITIONS, 1).unwrap();
        }
        c
    }

    /// The offsets the worker group committed on the input topic's first `partitions`.
    fn committed(&self, partitions: i32) -> Vec<Offset> {
        let consumer = self.consumer(&self.topic("group"));
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(&self.topic("in"), p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10)).unwrap();
        committed.elements().iter().map(|e| e.offset()).collect()
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
    fn read_partitions(&self, topic: &str) -> Vec<Vec<Raw>> {
        use rdkafka::message::Headers as _;
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
                let Some(m) = consumer.poll(Duration::from_millis(100)) else { continue };
                let m = m.unwrap();
                let replay_count = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == "replay_count"))
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned());
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                messages.push((key, m.payload().unwrap_or_default().to_vec(), replay_count));
            }
            out.push(messages);
        }
        out
    }

    /// Every message of `topic`, as JSON, partition by partition, in order.
    fn read_all(&self, topic: &str) -> Vec<Vec<serde_json::Value>> {
        let parse = |(_, payload, _): Raw| serde_json::from_slice(&payload).unwrap();
        self.read_partitions(topic).into_iter().map(|p| p.into_iter().map(parse).collect()).collect()
    }

    /// Every message of `topic`.
    fn read_raw(&self, topic: &str) -> Vec<Raw> {
        self.read_partitions(topic).into_iter().flatten().collect()
    }

    /// How many messages `topic` holds.
    fn count(&self, topic: &str) -> i64 {
        let consumer = self.consumer("tf-test-watermarks");
        (0..PARTITIONS).map(|p| consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap().1).sum()
    }
}

/// A message read back: its key, payload and `replay_count` header.
type Raw = (String, Vec<u8>, Option<String>);

impl Cluster {
    /// The first reply of every ticket, checking on the way that a copy (a reply
    /// republished from the ledger after a fault) is identical to it and that first
    /// replies come in conversation order (a conversation's replies share a
    /// partition: their key). Returns them and the number of copies.
    fn first_replies(&self) -> (HashMap<String, serde_json::Value>, usize) {
        let (mut first, mut copies) = (HashMap::new(), 0);
        for partition in self.read_all(&self.topic("replies")) {
            let mut last: HashMap<String, usize> = HashMap::new();
            for reply in partition {
                let ticket = reply["ticket_id"].as_str().unwrap().to_owned();
                if let Some(earlier) = first.get(&ticket) {
                    assert_eq!(earlier, &reply, "{ticket} answered twice with different replies");
                    copies += 1;
                    continue;
                }
                let index: usize = ticket.trim_start_matches("S-").parse().unwrap();
                let conversation = reply["conversation_id"].as_str().unwrap().to_owned();
                if let Some(before) = last.insert(conversation.clone(), index) {
                    assert!(before < index, "{conversation}: S-{index} answered after S-{before}");
                }
                first.insert(ticket, reply);
            }
        }
        (first, copies)
    }

    /// The end of every input partition.
    fn input_ends(&self) -> Vec<Offset> {
        let consumer = self.consumer("tf-test-watermarks");
        (0..PARTITIONS)
            .map(|p| {
                Offset::Offset(consumer.fetch_watermarks(&self.topic("in"), p, Duration::from_secs(10)).unwrap().1)
            })
            .collect()
    }
}

/// A test's cluster, database and worker configuration.
struct Run {
    c: Cluster,
    db: crate::ledger_pg::TestDb,
    _dir: tempfile::TempDir,
    config: std::path::PathBuf,
    env: Vec<(String, String)>,
}

impl Run {
    async fn new(c: Cluster) -> Run {
        let db = crate::ledger_pg::TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let config = crate::helpers::instant_config(dir.path());
        let mut env = c.env();
        env.push(("TICKETFLOW__DATABASE__URL".into(), db.url.clone()));
        Run { c, db, _dir: dir, config, env }
    }

    fn worker(&self) -> (std::process::Child, std::thread::JoinHandle<String>) {
        start_worker(&self.config, &self.env)
    }
}

/// SIGTERM, and what the worker said, once it exited successfully.
fn stop(mut worker: std::process::Child, said: std::thread::JoinHandle<String>) -> String {
    std::process::Command::new("kill").arg("-TERM").arg(worker.id().to_string()).status().unwrap();
    let status = worker.wait().unwrap();
    let said = said.join().unwrap();
    assert!(status.success(), "{said}");
    said
}

/// A worker process and the reader of what it says.
fn start_worker(
    config: &std::path::Path,
    env: &[(String, String)],
) -> (std::process::Child, std::thread::JoinHandle<String>) {
    let mut worker = bin()
        .arg("--config")
        .arg(config)
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
    (worker, said)
}

/// Polls `condition` every 50 ms; panics after two minutes or when the worker exits.
async fn wait_for(what: &str, worker: &mut std::process::Child, mut condition: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !condition().await {
        assert!(worker.try_wait().unwrap().is_none(), "the worker exited while waiting for {what}");
        if std::time::Instant::now() > deadline {
            let _ = worker.kill();
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tickets_on_six_partitions_are_answered_once_in_order_and_fully_committed() {
    let (total, conversations) = (10_000, 2_000);
    let mut run = Run::new(Cluster::new()).await;
    run.env.extend(crate::helpers::jittery_calls());
    produce_stdin(run.env.iter().cloned(), &synth_tickets(total, conversations));
    let (mut worker, said) = run.worker();
    wait_for("every ticket answered", &mut worker, async || published_units(&run.db).await == total as i64).await;
    stop(worker, said);
    let (first, copies) = run.c.first_replies();
    assert_eq!((first.len(), copies), (total, 0), "one reply per ticket");
    assert_eq!(run.c.committed(PARTITIONS), run.c.input_ends(), "committed to the end of every partition");
    run.db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_message_holds_back_the_committed_offset_of_its_partition_until_it_finishes() {
    let (total, slow) = (1_000usize, 10usize);
    let mut run = Run::new(Cluster::with_input_partitions(1)).await;
    // Every provider holds a request that mentions the word until the test releases it.
    let mut mock_config = ticketflow::mock_provider::MockConfig::default();
    for p in mock_config.providers.values_mut() {
        p.hold_words = vec!["zz-slow-zz".into()];
    }
    let (base, mock) = ticketflow::mock_provider::spawn(mock_config).await.unwrap();
    let env = &mut run.env;
    env.extend(crate::real_providers::mock_env(&base));
    env.push(("TICKETFLOW__BROKER__KAFKA__COMMIT_INTERVAL_MS".into(), "100".into()));
    for (p, _) in crate::real_providers::PROVIDERS {
        env.push((format!("TICKETFLOW__PROVIDERS__{}__TIMEOUT_MS", p.to_uppercase()), "600000".into()));
    }
    let mut tickets = String::new();
    for (i, line) in synth_tickets(total, total).lines().enumerate() {
        let mut t: serde_json::Value = serde_json::from_str(line).unwrap();
        if i == slow {
            t["messages"][0]["text"] = "My order is late, zz-slow-zz please check".into();
        }
        tickets.push_str(&t.to_string());
        tickets.push('\n');
    }
    produce_stdin(run.env.iter().cloned(), &tickets);
    let (mut worker, said) = run.worker();
    let (c, db) = (&run.c, &run.db);
    let others = (total - 1) as i64;
    wait_for("every other ticket answered", &mut worker, async || published_units(db).await == others).await;
    // The commit reaches the slow message and stays there while it is held, however
    // many messages behind it are finished.
    wait_for("the commit at the slow message", &mut worker, async || c.committed(1) == [Offset::Offset(slow as i64)])
        .await;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await; // a commit interval
        assert_eq!(c.committed(1), [Offset::Offset(slow as i64)], "the commit passed a message still in flight");
    }
    mock.release();
    wait_for("the slow ticket answered and committed", &mut worker, async || {
        published_units(db).await == total as i64 && c.committed(1) == [Offset::Offset(total as i64)]
    })
    .await;
    stop(worker, said);
    run.db.drop_db().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_moves_matching_dead_letters_with_their_key_and_a_second_run_moves_nothing() {
    use rdkafka::producer::{BaseRecord, Producer as _, ThreadedProducer};
    let c = Cluster::new();
    let producer: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        ClientConfig::new().set("bootstrap.servers", c.cluster.bootstrap_servers()).create().unwrap();
    let ticket = |id: &str| {
        format!(r#"{{"ticket_id":"{id}","conversation_id":"C-{id}","messages":[{{"role":"customer","text":"hi"}}]}}"#)
    };
    // In one partition, in this order: the one that does not match comes first, so
    // the group's position stays in front of the ones moved.
    for (id, kind, replays) in [
        ("A", "invalid_json", 0),
        ("B", "providers_exhausted", 0),
        ("C", "providers_exhausted", 3),
        ("D", "providers_exhausted", 1),
    ] {
        let letter = serde_json::json!({
            "schema_version": 1, "ticket_id": id, "unit_id": format!("{id}:0"),
            "error": {"kind": kind, "message": "m"}, "attempts": 1, "replay_count": replays,
            "source": {"topic": "tickets", "partition": 0, "offset": 1}, "failed_at": "2026-11-20T10:00:00Z",
            "worker_id": "w", "payload": ticket(id), "payload_encoding": "utf8"
        })
        .to_string();
        let key = format!("C-{id}");
        producer.send(BaseRecord::to(&c.topic("dlq")).partition(0).key(&key).payload(&letter)).unwrap();
    }
    producer.flush(Duration::from_secs(10)).unwrap();
    let replay = |args: &[&str]| {
        let out = bin().arg("replay").args(args).envs(c.env()).output().unwrap();
        let text =
            (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned());
        assert!(out.status.success(), "{text:?}");
        text
    };

    let (listed, said) = replay(&["--kind", "providers_exhausted", "--dry-run"]);
    let would: Vec<&str> = listed.lines().filter(|l| l.starts_with("would replay")).map(|l| &l[13..14]).collect();
    assert_eq!(would, ["B", "D"], "{listed}");
    assert!(said.contains("C (providers_exhausted") && said.contains("stays dead"), "{said}");
    assert!(c.read_raw(&c.topic("in")).is_empty(), "a dry run moves nothing");

    let (moved, _) = replay(&["--kind", "providers_exhausted"]);
    assert!(moved.contains("replayed 2 dead letter(s)"), "{moved}");
    let mut input = c.read_raw(&c.topic("in"));
    input.sort();
    assert_eq!(
        input,
        [
            ("C-B".to_owned(), ticket("B").into_bytes(), Some("1".to_owned())),
            ("C-D".to_owned(), ticket("D").into_bytes(), Some("2".to_owned())),
        ]
    );
    let (again, _) = replay(&["--kind", "providers_exhausted"]);
    assert!(again.contains("replayed 0 dead letter(s)"), "a second run replays nothing twice: {again}");
    assert_eq!(c.read_raw(&c.topic("in")).len(), 2);
    // The one that did not match is still there for a run that wants it, and then
    // nothing is left to move.
    let (other, _) = replay(&["--kind", "invalid_json"]);
    assert!(other.contains("replayed 1 dead letter(s)"), "{other}");
    let (all, _) = replay(&[]);
    assert!(all.contains("replayed 0 dead letter(s)"), "{all}");
    let input: Vec<String> = c.read_raw(&c.topic("in")).into_iter().map(|(key, _, _)| key).collect();
    assert_eq!(input.len(), 3, "{input:?}");
    assert!(input.contains(&"C-A".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_joining_and_one_killed_lose_nothing_answer_nothing_twice_and_commit_to_the_end() {
    let (total, conversations) = (3_000, 600);
    let mut run = Run::new(Cluster::new()).await;
    let env = &mut run.env;
    // A killed worker's claims hold its units until their lease expires: short
    // leases keep the test short (the default is three minutes).
    env.push(("TICKETFLOW__LIMITS__TICKET_DEADLINE_MS".into(), "3000".into()));
    env.push(("TICKETFLOW__DATABASE__LEASE_MS".into(), "5000".into()));
    env.extend(crate::helpers::jittery_calls());
    produce_stdin(run.env.iter().cloned(), &synth_tickets(total, conversations));
    let (c, db) = (&run.c, &run.db);
    let (mut first, _) = run.worker();
    let (mut second, second_said) = run.worker();
    wait_for("a quarter answered", &mut second, async || published_units(db).await >= total as i64 / 4).await;
    let (mut third, third_said) = run.worker(); // a rebalance
    wait_for("half answered", &mut third, async || published_units(db).await >= total as i64 / 2).await;
    first.kill().unwrap(); // SIGKILL: its partitions go to the others after its session times out
    first.wait().unwrap();
    let (mut restarted, restarted_said) = run.worker();
    wait_for("every ticket answered", &mut restarted, async || published_units(db).await == total as i64).await;
    // The killed worker's partitions are redone by their next owners from its last
    // commit (answered already: acked without a second answer): done when the group
    // has committed every partition to its end.
    let ends = c.input_ends();
    wait_for("every partition committed to its end", &mut restarted, async || c.committed(PARTITIONS) == ends).await;
    let mut logs = String::new();
    for (worker, said) in [(second, second_said), (third, third_said), (restarted, restarted_said)] {
        logs.push_str(&stop(worker, said));
    }
    let (first_replies, _) = c.first_replies();
    assert_eq!(first_replies.len(), total, "every ticket answered");
    // No call paid twice: the ledger's paid calls are the distinct published ones.
    let mut calls = HashMap::new();
    for partition in c.read_all(&c.topic("costs")) {
        for cost in partition {
            calls.insert(cost["call_id"].as_str().unwrap().to_owned(), cost["cost_usd"].as_f64().unwrap());
        }
    }
    let client = db.client().await;
    let row = client.query_one("SELECT count(*), coalesce(sum(cost_usd), 0) FROM cost_records", &[]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0) as usize, calls.len(), "every paid call published, none paid twice");
    assert!((row.get::<_, f64>(1) - calls.values().sum::<f64>()).abs() < 1e-9);
    drop(client);
    // Stopping took nothing back.
    assert_eq!(c.committed(PARTITIONS), ends, "the workers said:\n{logs}");
    run.db.drop_db().await;
}
