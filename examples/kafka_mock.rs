//! A Kafka broker for trying ticketflow by hand and in scripts: librdkafka's mock
//! cluster, listening on loopback, until Ctrl-C or SIGTERM.
//!
//! ```sh
//! cargo run --example kafka_mock            # prints: bootstrap servers 127.0.0.1:PORT
//! TICKETFLOW__BROKER__KIND=kafka TICKETFLOW__BROKER__KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:PORT ticketflow topics
//! ```
//!
//! It starts with the default topics (`tickets`, `ticket-replies`, `ticket-costs`,
//! `tickets-dlq`, six partitions each).
//!
//! `cargo run --example kafka_mock -- 3` starts three brokers. The mock keeps
//! everything in memory: it is for development and tests, never for production.

use rdkafka::mocking::MockCluster;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let brokers: i32 = match std::env::args().nth(1).map(|a| a.parse()) {
        None => 1,
        Some(Ok(n)) if n > 0 => n,
        Some(_) => {
            eprintln!("usage: kafka_mock [BROKERS]  (a positive number, default 1)");
            std::process::exit(2);
        }
    };
    let cluster = match MockCluster::new(brokers) {
        Ok(cluster) => cluster,
        Err(e) => {
            eprintln!("error: cannot start the mock cluster: {e}");
            std::process::exit(1);
        }
    };
    // The mock serves no CreateTopics: the default topics are made here, with six
    // partitions; others appear on first use (librdkafka's mock default partitions).
    for topic in ["tickets", "ticket-replies", "ticket-costs", "tickets-dlq"] {
        if let Err(e) = cluster.create_topic(topic, 6, 1) {
            eprintln!("error: cannot create topic {topic}: {e}");
            std::process::exit(1);
        }
    }
    println!("bootstrap servers {}", cluster.bootstrap_servers());
    use std::io::Write as _;
    let _ = std::io::stdout().flush();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    drop(cluster);
}
