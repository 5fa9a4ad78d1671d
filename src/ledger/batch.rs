//! Group commit for the ledger: callers hand in one request each and await its own
//! result, while a background task runs whatever requests have queued up as one
//! batch (one statement, one commit). An idle ledger runs batches of one with no added
//! delay; a busy one amortises round trips, parsing and commits over many units.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use super::LedgerError;

type Job<Req, Resp> = (Req, oneshot::Sender<Result<Resp, LedgerError>>);

/// A batching front for one kind of ledger write.
pub struct Batcher<Req, Resp> {
    tx: mpsc::Sender<Job<Req, Resp>>,
}

impl<Req, Resp> Clone for Batcher<Req, Resp> {
    fn clone(&self) -> Self {
        Batcher { tx: self.tx.clone() }
    }
}

impl<Req: Send + 'static, Resp: Send + 'static> Batcher<Req, Resp> {
    /// Starts the batching task. `run` gets a batch of at most `max_batch` requests and
    /// returns one result per request, in order. At most `concurrency` batches run at
    /// once; requests arriving meanwhile wait and form the next batch.
    pub fn spawn<F, Fut>(max_batch: usize, concurrency: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<Resp, LedgerError>>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<Job<Req, Resp>>(max_batch.max(1) * concurrency.max(1) * 4);
        let run = Arc::new(run);
        let permits = Arc::new(Semaphore::new(concurrency.max(1)));
        // Ends when every sender (every clone of the ledger) is gone; each batch task
        // answers its callers, who are awaiting them, so nothing is left behind.
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let Ok(permit) = permits.clone().acquire_owned().await else { return };
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let run = run.clone();
                tokio::spawn(async move {
                    let (requests, replies): (Vec<Req>, Vec<_>) = batch.into_iter().unzip();
                    let n = requests.len();
                    let mut results = run(requests).await;
                    if results.len() != n {
                        let e =
                            LedgerError::Other(format!("batch returned {} results for {n} requests", results.len()));
                        results = (0..n).map(|_| Err(e.clone())).collect();
                    }
                    for (reply, result) in replies.into_iter().zip(results) {
                        let _ = reply.send(result);
                    }
                    drop(permit);
                });
            }
        });
        Batcher { tx }
    }

    /// Submits one request and waits for its result.
    pub async fn call(&self, request: Req) -> Result<Resp, LedgerError> {
        let (reply, result) = oneshot::channel();
        self.tx.send((request, reply)).await.map_err(|_| LedgerError::Other("ledger batcher stopped".into()))?;
        result.await.map_err(|_| LedgerError::Other("ledger batch abandoned".into()))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_are_batched_and_each_gets_its_own_answer() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = batches.clone();
        let b: Batcher<u32, u32> = Batcher::spawn(64, 1, move |reqs: Vec<u32>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::task::yield_now().await;
                reqs.into_iter()
                    .map(|r| if r == 7 { Err(LedgerError::Other("seven".into())) } else { Ok(r * 2) })
                    .collect()
            }
        });
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..500u32 {
            let b = b.clone();
            tasks.spawn(async move { (i, b.call(i).await) });
        }
        while let Some(r) = tasks.join_next().await {
            let (i, result) = r.unwrap();
            match result {
                Ok(v) => assert_eq!(v, i * 2),
                Err(e) => assert_eq!((i, e.to_string()), (7, "ledger error: seven".into())),
            }
        }
        let n = batches.load(Ordering::SeqCst);
        assert!(n < 500, "500 concurrent requests ran in {n} batches");
    }
}
