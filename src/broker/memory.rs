//! The in-memory broker: a bounded queue of deliveries (the input of `ticketflow
//! process`) and a publisher that collects outputs (tests).

use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Acker, BrokerError, Delivery, Publisher, Source};
use crate::ticket::{Output, SourceRef};

/// How long a requeued message waits before it is delivered again, so a message
/// whose unit is busy elsewhere does not spin.
const REQUEUE_DELAY: Duration = Duration::from_millis(20);

/// Producer side of the in-memory queue.
#[derive(Clone)]
pub struct MemoryProducer {
    tx: mpsc::Sender<Delivery>,
}

/// Consumer side of the in-memory queue.
pub struct MemoryQueue {
    rx: mpsc::Receiver<Delivery>,
}

/// A bounded in-memory queue; `capacity` bounds memory and pushes back on the producer.
pub fn queue(capacity: usize) -> (MemoryProducer, MemoryQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    (MemoryProducer { tx }, MemoryQueue { rx })
}

impl MemoryProducer {
    /// Enqueues a message; waits while the queue is full. Returns false once the
    /// consumer is gone.
    pub async fn send(&self, payload: Bytes, full_len: Option<u64>, source: SourceRef, replay_count: u32) -> bool {
        let requeue = Requeue { tx: self.tx.clone(), payload, full_len, source, replay_count };
        let (tx, delivery) = requeue.delivery();
        tx.send(delivery).await.is_ok()
    }
}

/// What is needed to put a delivery back in the queue.
struct Requeue {
    tx: mpsc::Sender<Delivery>,
    payload: Bytes,
    full_len: Option<u64>,
    source: SourceRef,
    replay_count: u32,
}

impl Requeue {
    fn delivery(self) -> (mpsc::Sender<Delivery>, Delivery) {
        let again = Requeue {
            tx: self.tx.clone(),
            payload: self.payload.clone(),
            full_len: self.full_len,
            source: self.source.clone(),
            replay_count: self.replay_count,
        };
        let delivery = Delivery {
            payload: self.payload,
            full_len: self.full_len,
            source: self.source,
            replay_count: self.replay_count,
            acker: Box::new(MemoryAcker { requeue: Some(again) }),
        };
        (self.tx, delivery)
    }
}

/// Holds a sender so the queue stays open while any delivery is unsettled: the
/// consumer sees the end of the input only when nothing can be requeued any more.
struct MemoryAcker {
    requeue: Option<Requeue>,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        let again = if requeue { self.requeue.take() } else { None };
        match again {
            Some(requeue) => {
                // Requeue from a task of its own: the caller may hold the last in-flight
                // permit while the queue is full. The sender it holds keeps the queue open
                // until the message is back in it, so nothing is lost at end of input.
                tokio::spawn(async move {
                    tokio::time::sleep(REQUEUE_DELAY).await;
                    let (tx, delivery) = requeue.delivery();
                    let _ = tx.send(delivery).await;
                });
                Ok(())
            }
            None => {
                tracing::warn!("in-memory delivery rejected without requeue; it is not processed");
                Ok(())
            }
        }
    }
}

#[async_trait]
impl Source for MemoryQueue {
    async fn recv(&mut self) -> Option<Delivery> {
        self.rx.recv().await
    }
}

/// A publisher that keeps every output in memory (tests).
#[derive(Debug, Default)]
pub struct MemoryPublisher {
    outputs: Mutex<Vec<Output>>,
}

impl MemoryPublisher {
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything published so far.
    pub fn outputs(&self) -> Vec<Output> {
        self.outputs.lock().map(|o| o.clone()).unwrap_or_default()
    }
}

#[async_trait]
impl Publisher for MemoryPublisher {
    async fn publish(&self, output: &Output) -> Result<(), BrokerError> {
        self.outputs
            .lock()
            .map_err(|_| BrokerError::Publish("memory publisher lock poisoned".into()))?
            .push(output.clone());
        Ok(())
    }
}
