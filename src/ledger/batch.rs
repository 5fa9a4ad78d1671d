//! Group commit for the ledger: callers hand in one request each and await its own
//! result, while a background task runs whatever requests have queued up as one
//! batch (one statement, one commit). An idle ledger runs batches of one with no added
//! delay; a busy one amortises round trips, parsing and commits over many units.

use std::future::Future;
use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::sync::{mpsc, oneshot, Notify};

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
    /// returns one result per request, in order. When no batch is running, whatever has
    /// queued goes at once (an idle ledger adds no delay). While one runs, requests
    /// accumulate, and a further batch starts early only once `max_batch / 4` are
    /// waiting, up to `concurrency` at once: fewer, larger batches cost the server less
    /// per unit than many small ones, and a burst still gets parallel batches.
    pub fn spawn<F, Fut>(max_batch: usize, concurrency: usize, run: F) -> Self
    where
        F: Fn(Vec<Req>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Vec<Result<Resp, LedgerError>>> + Send + 'static,
    {
        let max_batch = max_batch.max(1);
        let concurrency = concurrency.max(1);
        let early = (max_batch / 4).max(1);
        let (tx, mut rx) = mpsc::channel::<Job<Req, Resp>>(max_batch * concurrency * 4);
        let run = Arc::new(run);
        let running = Arc::new(AtomicUsize::new(0));
        let finished = Arc::new(Notify::new());
        // Ends when every sender (every clone of the ledger) is gone; each batch task
        // answers its callers, who are awaiting them, so nothing is left behind.
        tokio::spawn(async move {
            let mut batch: Vec<Job<Req, Resp>> = Vec::new();
            let mut open = true;
            loop {
                if batch.is_empty() {
                    match rx.recv().await {
                        Some(job) => batch.push(job),
                        None => return,
                    }
                }
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(job) => batch.push(job),
                        Err(_) => break,
                    }
                }
                let busy = running.load(Ordering::Acquire);
                if busy == 0 || (busy < concurrency && batch.len() >= early) || !open {
                    running.fetch_add(1, Ordering::AcqRel);
                    let (run, running, finished) = (run.clone(), running.clone(), finished.clone());
                    let jobs = std::mem::take(&mut batch);
                    tokio::spawn(async move {
                        let (requests, replies): (Vec<Req>, Vec<_>) = jobs.into_iter().unzip();
                        let n = requests.len();
                        let mut results = run(requests).await;
                        if results.len() != n {
                            let e = LedgerError::Other(format!(
                                "batch returned {} results for {n} requests",
                                results.len()
                            ));
                            results = (0..n).map(|_| Err(e.clone())).collect();
                        }
                        for (reply, result) in replies.into_iter().zip(results) {
                            let _ = reply.send(result);
                        }
                        running.fetch_sub(1, Ordering::AcqRel);
                        finished.notify_one();
                    });
                    if !open {
                        return;
                    }
                    continue;
                }
                // Wait for a running batch to finish or for more requests.
                tokio::select! {
                    _ = finished.notified() => {}
                    job = rx.recv(), if batch.len() < max_batch => match job {
                        Some(job) => batch.push(job),
                        None => open = false,
                    },
                }
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_batch_starts_only_when_a_quarter_batch_waits_and_never_beyond_the_limit() {
        let running = Arc::new(AtomicUsize::new(0));
        let starts = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (r, s) = (running.clone(), starts.clone());
        let b: Batcher<u32, u32> = Batcher::spawn(32, 2, move |reqs: Vec<u32>| {
            let others = r.fetch_add(1, Ordering::SeqCst);
            s.lock().unwrap().push((reqs.len(), others));
            let r = r.clone();
            async move {
                for _ in 0..20 {
                    tokio::task::yield_now().await;
                }
                r.fetch_sub(1, Ordering::SeqCst);
                reqs.into_iter().map(|x| Ok(x + 1)).collect()
            }
        });
        assert_eq!(b.call(41).await.unwrap(), 42, "a lone request runs at once");
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..2000u32 {
            let b = b.clone();
            tasks.spawn(async move { assert_eq!(b.call(i).await.unwrap(), i + 1) });
        }
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
        let starts = starts.lock().unwrap();
        assert_eq!(starts.iter().map(|(n, _)| n).sum::<usize>(), 2001);
        for &(size, others) in starts.iter() {
            assert!(others < 2, "a third batch ran alongside two: {starts:?}");
            assert!(others == 0 || size >= 8, "a batch of {size} started beside a running one: {starts:?}");
        }
    }
}
