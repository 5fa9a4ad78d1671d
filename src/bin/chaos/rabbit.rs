//! The RabbitMQ side of a run: the machine's broker (queues of the run's own), or for
//! `broker-restart` a RabbitMQ node of the run's own on free ports, whose application
//! is stopped and started again (`rabbitmqctl stop_app` / `start_app`) without
//! touching the machine's broker.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt as _;
use lapin::options::{BasicConsumeOptions, BasicPublishOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use crate::services::{free_port, give};
use crate::Outputs;

pub const SHARED: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub struct Rabbit {
    pub url: String,
    tag: String,
    own: Option<OwnNode>,
    /// The workers' input shards: the shipped `broker.rabbitmq.shards`.
    shards: u16,
}

impl Rabbit {
    /// The machine's broker, or a node of the run's own in `dir` when `own`.
    pub async fn start(tag: &str, own: bool, dir: &Path) -> Result<Rabbit, String> {
        let own = if own { Some(OwnNode::start(tag, dir)?) } else { None };
        let url = own.as_ref().map_or(SHARED.to_owned(), |n| format!("amqp://guest:guest@127.0.0.1:{}/%2f", n.port));
        let shards = ticketflow::policy::load_from(None, &Default::default())
            .map_err(|e| format!("the shipped configuration: {e}"))?
            .broker
            .rabbitmq
            .shards;
        let rabbit = Rabbit { url, tag: tag.to_owned(), own, shards };
        rabbit.connect().await?; // reachable before anything starts
        Ok(rabbit)
    }

    /// Whether the workers consume input shards (conversations in order across them).
    pub fn sharded(&self) -> bool {
        self.shards > 0
    }

    pub fn queue(&self, what: &str) -> String {
        format!("{}-{what}", self.tag)
    }

    /// The queues tickets wait in: the shard queues, or the single input queue.
    fn inputs(&self) -> Vec<String> {
        if self.shards == 0 {
            vec![self.queue("in")]
        } else {
            (0..self.shards).map(|s| ticketflow::broker::rabbitmq::shards::queue(&self.queue("in"), s)).collect()
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("TICKETFLOW__BROKER__KIND".into(), "rabbitmq".into()),
            ("TICKETFLOW__BROKER__RABBITMQ__URL".into(), self.url.clone()),
            ("TICKETFLOW__BROKER__TOPICS__INPUT".into(), self.queue("in")),
            ("TICKETFLOW__BROKER__TOPICS__REPLIES".into(), self.queue("replies")),
            ("TICKETFLOW__BROKER__TOPICS__COSTS".into(), self.queue("costs")),
            ("TICKETFLOW__BROKER__TOPICS__DEAD_LETTERS".into(), self.queue("dlq")),
            ("TICKETFLOW__BROKER__RABBITMQ__DEAD_LETTER_EXCHANGE".into(), self.queue("dlx")),
        ]
    }

    async fn connect(&self) -> Result<Connection, String> {
        Connection::connect(&self.url, ConnectionProperties::default())
            .await
            .map_err(|e| format!("RabbitMQ at {}: {e}", self.url.rsplit('@').next().unwrap_or_default()))
    }

    /// Publishes as a helpdesk integration would: through the input shards' exchange
    /// with the ticket's conversation as routing key (the payload's, or `poison` for
    /// what has none), or to the single input queue.
    pub async fn publish(&self, payloads: &[Vec<u8>]) -> Result<(), String> {
        let conn = self.connect().await?;
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        ch.confirm_select(Default::default()).await.map_err(|e| e.to_string())?;
        let input = self.queue("in");
        for p in payloads {
            let conversation = ticketflow::intake::conversation_key(p).unwrap_or_else(|| "poison".into());
            let mut headers = lapin::types::FieldTable::default();
            headers.insert(
                "conversation_id".into(),
                lapin::types::AMQPValue::LongString(conversation.as_bytes().to_vec().into()),
            );
            let props = BasicProperties::default().with_delivery_mode(2).with_headers(headers);
            let (exchange, key) = if self.shards == 0 {
                ("", input.clone())
            } else {
                (input.as_str(), ticketflow::broker::rabbitmq::shards::routing_key(&conversation).into_owned())
            };
            ch.basic_publish(exchange.into(), key.as_str().into(), BasicPublishOptions::default(), p, props)
                .await
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
        }
        let _ = conn.close(200, "done".into()).await;
        Ok(())
    }

    /// Messages ready in a queue (0 when it cannot be asked: the broker restarting).
    async fn depth(&self, conn: &Connection, queue: &str) -> Option<u32> {
        let ch = conn.create_channel().await.ok()?;
        let options = QueueDeclareOptions { passive: true, durable: true, ..Default::default() };
        let n = ch.queue_declare(queue.into(), options, Default::default()).await.ok().map(|q| q.message_count());
        let _ = ch.close(200, "done".into()).await;
        n
    }

    /// Whether the input queues have nothing ready.
    pub async fn drained(&self) -> bool {
        let Ok(conn) = self.connect().await else { return false };
        let mut drained = true;
        for queue in self.inputs() {
            drained &= self.depth(&conn, &queue).await == Some(0);
        }
        let _ = conn.close(200, "done".into()).await;
        drained
    }

    /// Every message of a queue, taken off it (the workers are stopped by then).
    async fn take_all(&self, conn: &Connection, what: &str) -> Result<Vec<Vec<u8>>, String> {
        let queue = self.queue(what);
        let Some(count) = self.depth(conn, &queue).await else { return Ok(Vec::new()) };
        let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
        let options = BasicConsumeOptions { no_ack: true, ..Default::default() };
        let mut consumer = ch
            .basic_consume(queue.as_str().into(), "chaos".into(), options, Default::default())
            .await
            .map_err(|e| format!("{queue}: {e}"))?;
        let mut out = Vec::with_capacity(count as usize);
        while out.len() < count as usize {
            match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
                Ok(Some(Ok(delivery))) => out.push(delivery.data),
                Ok(Some(Err(e))) => return Err(format!("{queue}: {e}")),
                Ok(None) | Err(_) => return Err(format!("{queue}: {} of {count} messages read", out.len())),
            }
        }
        let _ = ch.close(200, "done".into()).await;
        Ok(out)
    }

    pub async fn outputs(&self) -> Result<Outputs, String> {
        let conn = self.connect().await?;
        let outputs = Outputs {
            replies: vec![self.take_all(&conn, "replies").await?],
            dead: self.take_all(&conn, "dlq").await?,
            costs: self.take_all(&conn, "costs").await?,
        };
        let _ = conn.close(200, "done".into()).await;
        Ok(outputs)
    }

    /// The broker down for `down`, then up again.
    pub async fn restart(&self, down: Duration) -> Result<(), String> {
        let node = self.own.as_ref().ok_or("a broker restart needs a node of the run's own")?;
        node.ctl(&["stop_app"])?;
        tokio::time::sleep(down).await;
        node.ctl(&["start_app"])
    }

    pub async fn cleanup(&self) {
        if self.own.is_some() {
            return; // the node goes with its directory
        }
        if let Ok(conn) = self.connect().await {
            if let Ok(ch) = conn.create_channel().await {
                let mut queues: Vec<String> = ["replies", "costs", "dlq"].iter().map(|q| self.queue(q)).collect();
                queues.extend(self.inputs());
                for q in queues {
                    let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
                }
                let _ = ch.exchange_delete(self.queue("dlx").as_str().into(), Default::default()).await;
                if self.shards > 0 {
                    let _ = ch.exchange_delete(self.queue("in").as_str().into(), Default::default()).await;
                }
            }
            let _ = conn.close(200, "done".into()).await;
        }
    }
}

/// A RabbitMQ node of the run's own: its own name, ports, data and logs, and of the
/// plugins only the consistent-hash exchange (the input shards).
struct OwnNode {
    name: String,
    port: u16,
    server: Child,
    pid_file: PathBuf,
}

impl OwnNode {
    fn start(tag: &str, dir: &Path) -> Result<OwnNode, String> {
        let root = dir.join("rabbitmq");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        let (port, dist) = (free_port()?, free_port()?);
        let config = root.join("rabbitmq.conf");
        std::fs::write(&config, format!("listeners.tcp.local = 127.0.0.1:{port}\nloopback_users = none\n"))
            .map_err(|e| format!("{}: {e}", config.display()))?;
        std::fs::write(root.join("plugins"), "[rabbitmq_consistent_hash_exchange].\n")
            .map_err(|e| format!("{}: {e}", root.display()))?;
        give(&root, "rabbitmq")?;
        let name = format!("{tag}@localhost");
        let pid_file = root.join("pid");
        let log = std::fs::File::create(dir.join("rabbitmq-server.out")).map_err(|e| e.to_string())?;
        let server = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_PORT", port.to_string())
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("RABBITMQ_CONFIG_FILE", &config)
            .env("RABBITMQ_MNESIA_BASE", root.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", root.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", root.join("plugins"))
            .env("RABBITMQ_PID_FILE", &pid_file)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start rabbitmq-server: {e}"))?;
        crate::on_interrupt(vec!["rabbitmqctl".into(), "-n".into(), name.clone(), "shutdown".into()]);
        let node = OwnNode { name, port, server, pid_file };
        node.ctl(&["wait", &node.pid_file.to_string_lossy(), "--timeout", "60"])?;
        Ok(node)
    }

    fn ctl(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("rabbitmqctl")
            .args(["-n", &self.name])
            .args(args)
            .output()
            .map_err(|e| format!("rabbitmqctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("rabbitmqctl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
        }
    }
}

impl Drop for OwnNode {
    fn drop(&mut self) {
        let _ = self.ctl(&["shutdown"]);
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
