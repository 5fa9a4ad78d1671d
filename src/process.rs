//! `ticketflow process FILE|-`: the whole pipeline in one process. A reader streams
//! the JSONL input into the in-memory queue; the dispatcher drives it through
//! the pipeline with the in-memory ledger and the file publisher. Memory stays flat:
//! the queue is bounded, lines are read one at a time and capped at the size limit.
//! Each line is keyed by its ticket's `conversation_id`, so the dispatcher answers a
//! conversation's tickets in input order.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncBufRead;

use crate::backoff::Backoff;
use crate::broker::files::FilePublisher;
use crate::broker::{memory, Message};
use crate::dispatch::{DispatchConfig, Dispatcher, RetryPolicy, RunStats, Shutdown};
use crate::intake;
use crate::ledger::memory::MemoryLedger;
use crate::ledger::postgres::PgLedger;
use crate::ledger::resilient::{Health, Resilient};
use crate::ledger::Ledger;
use crate::pipeline::Pipeline;
use crate::providers::admission::{admission_target, RateAdmission};
use crate::providers::Providers;
use crate::settings::Settings;
use crate::summary::{Summary, SummaryObserver};
use crate::ticket::SourceRef;
use crate::triage::Analyzer;

/// Options of one `process` run.
#[derive(Debug, Clone)]
pub struct ProcessOptions {
    /// Input file, or `-` for standard input.
    pub input: PathBuf,
    pub out_dir: PathBuf,
    /// Show a progress bar (when stderr is a terminal) or periodic progress lines.
    pub progress: bool,
    /// How long in-flight tickets may take after Ctrl-C before they are abandoned.
    pub drain_timeout: Duration,
    /// Record in the PostgreSQL ledger at `database.url` instead of in memory.
    pub postgres_ledger: bool,
    /// Count the run in the Prometheus metrics (installed by the caller).
    pub metrics: bool,
}

/// What a run produced.
#[derive(Debug)]
pub struct ProcessReport {
    pub summary: Summary,
    pub elapsed: Duration,
    pub interrupted: bool,
    /// Tickets read but neither answered nor dead-lettered (only after an interruption).
    pub unfinished: u64,
}

/// A failure that stops the run.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open input {path}")]
    Input { path: String, source: std::io::Error },
    #[error("cannot create outputs in {path}")]
    Output { path: String, source: std::io::Error },
    #[error(transparent)]
    Providers(#[from] crate::providers::BuildError),
    #[error("reading input: {0}")]
    Read(std::io::Error),
    #[error(transparent)]
    Publish(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
}

/// Runs the pipeline over a file. `shutdown.stop_intake` is cancelled by the caller on
/// the first Ctrl-C and `shutdown.abort` on the second.
pub async fn run(
    settings: Arc<Settings>,
    opts: ProcessOptions,
    shutdown: Shutdown,
) -> Result<ProcessReport, ProcessError> {
    let started = Instant::now();
    // Everything that can fail is checked before the output directory is touched:
    // a typo in the input path must not cost the previous run's outputs.
    let analyzer = Arc::new(Analyzer::new(&settings.triage));
    let providers = Providers::from_settings(&settings, analyzer.clone())?;
    let (reader, total_bytes) = intake::open_jsonl(&opts.input)
        .await
        .map_err(|source| ProcessError::Input { path: opts.input.display().to_string(), source })?;
    let topic = if opts.input == Path::new("-") { "stdin".to_owned() } else { opts.input.display().to_string() };
    let store: Arc<dyn Ledger> = if opts.postgres_ledger {
        Arc::new(PgLedger::connect(&settings.database).await?)
    } else {
        Arc::new(MemoryLedger::new())
    };
    let (publisher, kept) = FilePublisher::create(&opts.out_dir, opts.postgres_ledger)
        .map_err(|source| ProcessError::Output { path: opts.out_dir.display().to_string(), source })?;
    for path in kept {
        tracing::warn!(path = %path.display(), "kept the partial outputs of an earlier run that did not finish");
    }
    let publisher = Arc::new(publisher);
    let health = Health::new();
    let ledger = Arc::new(Resilient::new(store, health.clone(), Backoff::default()));
    let pipeline = Arc::new(Pipeline::new(settings.clone(), analyzer, providers.clone(), ledger, publisher.clone()));

    let max_in_flight = settings.limits.max_in_flight;
    let (producer, queue) = memory::queue(max_in_flight);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let stats = Arc::new(RunStats::default());
    let summary = Arc::new(SummaryObserver::default());
    let admission = Arc::new(RateAdmission::new(&providers, admission_target(&settings)));

    let progress = opts.progress.then(|| Progress::start(total_bytes, bytes_read.clone(), stats.clone()));
    let limit = settings.limits.max_message_bytes;
    let read = {
        let stop = shutdown.stop_intake.clone();
        let bytes_read = bytes_read.clone();
        tokio::spawn(async move {
            tokio::select! {
                r = feed(reader, producer, topic, limit, bytes_read) => r,
                _ = stop.cancelled() => Ok(()),
            }
        })
    };
    let dispatcher = Dispatcher {
        handler: pipeline,
        config: DispatchConfig { max_in_flight, retry: RetryPolicy::from_settings(&settings.limits) },
        observers: {
            let mut observers: Vec<Arc<dyn crate::observe::Observer>> = vec![summary.clone(), admission.clone()];
            if opts.metrics {
                observers.push(Arc::new(crate::telemetry::Metrics));
            }
            observers
        },
        admission,
        health,
        stats: stats.clone(),
    };
    // The in-memory queue cannot fail.
    let _ = dispatcher.run(queue, shutdown.clone()).await;
    let read_result = read.await;
    if let Some(p) = progress {
        p.finish();
    }
    publisher.commit()?;
    let summary = summary.take();
    match read_result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(ProcessError::Read(e)),
        Err(join) => return Err(ProcessError::Read(std::io::Error::other(join.to_string()))),
    }
    let interrupted = shutdown.stop_intake.is_cancelled();
    Ok(ProcessReport {
        summary,
        elapsed: started.elapsed(),
        interrupted,
        unfinished: stats.handed_back.load(Ordering::Relaxed) + stats.rejected.load(Ordering::Relaxed),
    })
}

/// Reads JSONL lines into the queue. Blank lines are skipped; a line longer than the
/// size limit is not kept whole in memory: only `limit + 1` bytes of it are queued,
/// with its real length, so intake rejects it as `too_large`.
async fn feed(
    mut reader: Box<dyn AsyncBufRead + Unpin + Send>,
    producer: memory::MemoryProducer,
    topic: String,
    limit: usize,
    bytes_read: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let mut line_no: i64 = 0;
    let mut line: Vec<u8> = Vec::new();
    while let Some(read) = intake::read_line(&mut reader, limit, &mut line).await? {
        bytes_read.fetch_add(read.consumed, Ordering::Relaxed);
        line_no += 1;
        if intake::is_blank(&line, &read) {
            continue;
        }
        let cut = read.full_len_if_cut(&line);
        let message = Message {
            key: if cut.is_some() { None } else { intake::conversation_key(&line) },
            payload: Bytes::copy_from_slice(&line),
            full_len: cut,
            source: SourceRef { topic: topic.clone(), partition: 0, offset: line_no },
            redelivered: false,
            stable_offset: false,
            replay_count: 0,
        };
        if !producer.send(message).await {
            return Ok(());
        }
    }
    Ok(())
}

/// Progress display: a bar on a terminal, otherwise a line every few seconds.
struct Progress {
    task: tokio::task::JoinHandle<()>,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn start(total_bytes: Option<u64>, bytes_read: Arc<AtomicU64>, stats: Arc<RunStats>) -> Self {
        let terminal = std::io::stderr().is_terminal();
        let bar = terminal.then(|| {
            let bar = match total_bytes {
                Some(n) => indicatif::ProgressBar::new(n),
                None => indicatif::ProgressBar::new_spinner(),
            };
            let style = indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar
        });
        let bar_for_task = bar.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let period = if bar_for_task.is_some() { Duration::from_millis(200) } else { Duration::from_secs(5) };
            let mut tick = tokio::time::interval(period);
            tick.tick().await;
            loop {
                tick.tick().await;
                let done = stats.acked.load(Ordering::Relaxed);
                let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-9);
                match &bar_for_task {
                    Some(bar) => {
                        bar.set_position(bytes_read.load(Ordering::Relaxed));
                        bar.set_message(format!("{done} tickets, {rate:.0}/s"));
                    }
                    None => crate::cli::say("INFO", &format!("progress: {done} tickets done, {rate:.0} tickets/s")),
                }
            }
        });
        Progress { task, bar }
    }

    fn finish(self) {
        self.task.abort();
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
