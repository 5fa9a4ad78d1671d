//! The in-memory broker: a bounded queue of deliveries (the input of `ticketflow
//! process`) and a publisher that collects outputs (tests).

use std::sync::Mutex;

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{Acker, BrokerError, Delivery, Lane, Message, Publisher, Source, SourceEvent};
use crate::ticket::Output;

/// Producer side of the in-memory queue.
#[derive(Clone)]
pub struct MemoryProducer {
    tx: mpsc::Sender<Message>,
}

/// Consumer side of the in-memory queue. A handed-back delivery goes back into the
/// queue while a producer is still open; after the input's end there is nobody left
/// to read it, so it is dropped (the dispatcher counts it as handed back).
pub struct MemoryQueue {
    rx: mpsc::Receiver<Message>,
    requeue: mpsc::WeakSender<Message>,
    paused: bool,
}

/// A bounded in-memory queue; `capacity` bounds memory and pushes back on the producer.
pub fn queue(capacity: usize) -> (MemoryProducer, MemoryQueue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let requeue = tx.downgrade();
    (MemoryProducer { tx }, MemoryQueue { rx, requeue, paused: false })
}

impl MemoryProducer {
    /// Enqueues a message; waits while the queue is full. Returns false once the
    /// consumer is gone.
    pub async fn send(&self, message: Message) -> bool {
        self.tx.send(message).await.is_ok()
    }
}

/// Settles one in-memory delivery; a requeue puts the message back at the end of
/// the queue, marked redelivered.
struct MemoryAcker {
    message: Option<Message>,
    tx: Option<mpsc::Sender<Message>>,
}

#[async_trait]
impl Acker for MemoryAcker {
    async fn ack(self: Box<Self>) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn nack(mut self: Box<Self>, requeue: bool) -> Result<(), BrokerError> {
        match (requeue, self.message.take(), self.tx.take()) {
            (true, Some(mut message), Some(tx)) => {
                message.redelivered = true;
                // try_send: the caller may be the consumer itself, which would wait
                // forever on a full queue it is the only one to drain.
                match tx.try_send(message) {
                    Ok(()) => Ok(()),
                    Err(mpsc::error::TrySendError::Full(message)) => {
                        tokio::spawn(async move {
                            let _ = tx.send(message).await;
                        });
                        Ok(())
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

#[async_trait]
impl Source for MemoryQueue {
    async fn next(&mut self) -> Result<Option<SourceEvent>, BrokerError> {
        if self.paused {
            std::future::pending::<()>().await;
        }
        let Some(message) = self.rx.recv().await else { return Ok(None) };
        let acker = MemoryAcker { message: Some(message.clone()), tx: self.requeue.upgrade() };
        Ok(Some(SourceEvent::Delivery(Delivery { message, acker: Box::new(acker) })))
    }

    fn pause(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self, _lanes: &[Lane]) -> Result<(), BrokerError> {
        self.paused = false;
        Ok(())
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
