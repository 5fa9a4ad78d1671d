//! Command line: clap definitions and the glue from each command to the library.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use std::io::Write as _;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};

use crate::dispatch::Shutdown;
use crate::process::{self, ProcessOptions};

/// Answers customer-support tickets with LLMs at a fraction of the usual cost.
#[derive(Debug, Parser)]
#[command(name = "ticketflow", version, about)]
pub struct Cli {
    /// Extra configuration file, layered over the defaults and `config/<TICKETFLOW_ENV>.toml`.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
    /// One self-contained page with charts.
    Html,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LimitsFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExplainFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvalFormat {
    Table,
    Json,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the whole pipeline on a JSONL file of tickets, in one process, with no
    /// broker and no database.
    Process {
        /// JSONL file of tickets, or `-` for standard input.
        input: PathBuf,
        /// Directory for replies.jsonl, costs.jsonl and dead_letters.jsonl.
        #[arg(long, default_value = "out")]
        out: PathBuf,
        /// No progress display.
        #[arg(long)]
        quiet: bool,
        /// Seconds in-flight tickets may take to finish after Ctrl-C.
        #[arg(long, default_value_t = 30)]
        drain_timeout_secs: u64,
        /// Record the run in this PostgreSQL ledger (migrated with `ticketflow migrate`)
        /// instead of in memory: a re-run then answers nothing twice and pays nothing twice.
        #[arg(long, value_name = "URL")]
        ledger: Option<String>,
        /// At the end of the run, write the Prometheus metrics a worker would serve on
        /// `/metrics` (tickets, costs, provider calls, latencies) to this file.
        #[arg(long, value_name = "FILE")]
        metrics_file: Option<PathBuf>,
    },
    /// Apply the SQL migrations to the configured database (creating it if needed).
    Migrate {
        /// The database to migrate, instead of `database.url`.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
    },
    /// Cost and routing report from the PostgreSQL ledger.
    Report {
        /// The ledger to read, instead of `database.url`.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// Only what happened at or after this time (RFC 3339, or YYYY-MM-DD for midnight UTC).
        #[arg(long)]
        since: Option<String>,
        /// Only what happened before this time.
        #[arg(long)]
        until: Option<String>,
        /// `table` for a terminal, `json` for tools, `html` for a page with charts.
        #[arg(long, value_enum, default_value = "table")]
        format: ReportFormat,
    },
    /// The account-wide limits and budgets as the worker replicas share them, from the
    /// PostgreSQL ledger: each replica's share of every provider's limits, recent use
    /// against the limits, and today's budget spend, reservations and leases per tier.
    Limits {
        /// The ledger to read, instead of `database.url`.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// The window of the use figures, in minutes (1 to 1440).
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1440))]
        minutes: u32,
        /// `table` for a terminal, `json` for tools.
        #[arg(long, value_enum, default_value = "table")]
        format: LimitsFormat,
    },
    /// Validate the effective configuration and print it with secrets redacted.
    Config,
    /// Creates the broker's input, output and dead-letter topics (Kafka) or queues and
    /// exchanges (RabbitMQ) when missing; idempotent. Reports what it created and what
    /// already existed.
    Topics,
    /// Consumes the configured broker's input (Kafka or RabbitMQ) with the PostgreSQL
    /// ledger, serving /metrics, /healthz and /readyz on `http.listen`, until
    /// SIGTERM/SIGINT (a second signal stops at once).
    Worker {
        /// How long in-flight tickets may take after the first signal before they are
        /// handed back.
        #[arg(long, default_value_t = 30)]
        drain_timeout_secs: u64,
    },
    /// Publishes JSONL tickets to the input queue (what a helpdesk integration does),
    /// with publisher confirms; invalid lines are reported by number and not sent.
    Produce {
        /// JSONL file of tickets, or `-` for standard input.
        input: PathBuf,
    },
    /// Moves dead letters back to the input (Kafka or RabbitMQ). Each leaves the
    /// dead-letter topic or queue only once its republish is confirmed; what does not
    /// match stays there, in its order.
    Replay {
        /// Only this error kind (repeatable, or comma-separated): too_large,
        /// invalid_encoding, invalid_json, invalid_ticket, providers_exhausted,
        /// rejected, internal, delivery_limit (dead-lettered by the broker itself).
        #[arg(long, value_delimiter = ',', value_name = "KIND")]
        kind: Vec<String>,
        /// Only dead letters that failed at or after this time (RFC 3339, or YYYY-MM-DD).
        #[arg(long)]
        since: Option<String>,
        /// Only dead letters that failed before this time.
        #[arg(long)]
        until: Option<String>,
        /// Only this ticket (repeatable, or comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "TICKET_ID")]
        ticket: Vec<String>,
        /// Move at most this many.
        #[arg(long, value_name = "N")]
        limit: Option<u64>,
        /// List what would move; move nothing.
        #[arg(long)]
        dry_run: bool,
        /// At most N republishes per second (spares providers just back from an outage).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        rate: Option<u32>,
    },
    /// Measure the routing policy on labelled tickets: route accuracy and confusion,
    /// recall of every must-escalate class, over-escalation, triage accuracy, and the
    /// estimated spend against the all-premium baseline. Exit 1 when an `[eval]`
    /// floor is missed.
    Eval {
        /// JSONL file of labelled tickets (each a ticket with a `label` object holding
        /// `expected_tier` and optionally the expected triage fields), or `-`.
        input: PathBuf,
        /// Who triages: `heuristic` (the local heuristics, no model, no key) or
        /// `model` (the triage chain, as the pipeline calls it).
        #[arg(long, value_enum, default_value = "heuristic")]
        triage: crate::eval::TriageBy,
        /// A second policy: this TOML file layered over the effective configuration,
        /// evaluated on the same triage.
        #[arg(long, value_name = "OTHER.toml")]
        compare: Option<PathBuf>,
        /// `table` for people, `json` for tools.
        #[arg(long, value_enum, default_value = "table")]
        format: EvalFormat,
    },
    /// Show, for each ticket, the triage, the rules that fired and the route, without
    /// calling any reply model.
    Explain {
        /// JSONL file of tickets, or `-` for standard input.
        input: PathBuf,
        /// A second policy: this TOML file layered over the effective configuration.
        /// Reports the tickets whose route differs and the estimated cost of each.
        #[arg(long, value_name = "OTHER.toml")]
        compare: Option<PathBuf>,
        /// `text` for people, `json` (one object per ticket) for tools.
        #[arg(long, value_enum, default_value = "text")]
        format: ExplainFormat,
    },
    /// Serve mock OpenAI-, DashScope- and Anthropic-compatible endpoints
    /// (`/<provider>/v1/...`) until SIGINT/SIGTERM. The global `--config FILE` is read
    /// as the mock's own TOML configuration here (default: the five default providers).
    MockProvider {
        /// Address to listen on; port 0 picks a free port. The bound address is printed
        /// as `listening on ADDR`.
        #[arg(long, default_value = "127.0.0.1:8089")]
        listen: String,
    },
}

static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes [`say`] write JSON lines (`--log-format json`).
pub fn set_json_logs(json: bool) {
    JSON_LOGS.store(json, std::sync::atomic::Ordering::Relaxed);
}

/// A line for the operator on standard error: as it is, or with `--log-format
/// json` as a JSON object shaped like the log lines (`timestamp`, `level`,
/// `fields.message`, `target`), so that every line of stderr parses. Never panics,
/// even with stderr closed.
pub fn say(level: &str, line: &str) {
    let text = if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        serde_json::json!({
            "timestamp": crate::ticket::now_rfc3339(),
            "level": level,
            "fields": {"message": line},
            "target": "ticketflow",
        })
        .to_string()
    } else if level == "WARN" {
        format!("warning: {line}")
    } else if level == "ERROR" {
        format!("error: {line}")
    } else {
        line.to_owned()
    };
    let _ = writeln!(std::io::stderr(), "{text}");
}

/// A failure with the exit code it maps to (SPEC §2: 1 runtime, 2 usage or configuration).
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure { code: 1, error: e.into() }
    }
}

/// A configuration error (exit 2) naming every provider whose API key is missing.
fn require_keys(settings: &crate::settings::Settings) -> Result<(), Failure> {
    let missing = crate::providers::missing_keys(settings);
    if missing.is_empty() {
        return Ok(());
    }
    Err(Failure { code: 2, error: anyhow::anyhow!("missing API keys: {}", missing.join("; ")) })
}

/// A PostgreSQL URL given on the command line (`flag`), checked before anything
/// connects: an unparseable one is a usage error.
/// Writes a command's document to standard output: a full disk is an error line (exit
/// 1), not a panic; a reader that went away (`| head`) is not an error.
fn emit(text: &str) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(Failure { code: 1, error: anyhow::anyhow!("cannot write to standard output: {e}") })
        }
        _ => Ok(()),
    }
}

fn database_url(flag: &str, url: &str) -> Result<String, Failure> {
    match url.parse::<tokio_postgres::Config>() {
        Ok(_) => Ok(url.to_owned()),
        Err(e) => Err(Failure {
            code: 2,
            error: anyhow::anyhow!("{flag} {}: not a PostgreSQL URL: {e}", crate::settings::redact_url(url)),
        }),
    }
}

/// The policy of `--compare OTHER.toml`: OTHER.toml layered over the configuration.
fn compared_policy(
    config: Option<&std::path::Path>,
    compare: Option<&std::path::Path>,
) -> Result<Option<crate::settings::Settings>, Failure> {
    compare.map(|path| crate::policy::load_with_overlay(config, path).map_err(config_failure)).transpose()
}

/// The whole of an input file, or of standard input for `-`.
fn read_input(input: &std::path::Path) -> Result<String, Failure> {
    if input == std::path::Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading standard input")?;
        Ok(s)
    } else {
        Ok(std::fs::read_to_string(input).with_context(|| format!("cannot read {}", input.display()))?)
    }
}

fn config_failure(e: crate::settings::ConfigError) -> Failure {
    Failure { code: 2, error: e.into() }
}

/// Runs the parsed command.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Explain { input, compare, format } => {
            let settings = Arc::new(crate::policy::load(cli.config.as_deref()).map_err(config_failure)?);
            let other = compared_policy(cli.config.as_deref(), compare.as_deref())?;
            require_keys(&settings)?;
            let (mut reader, _) =
                crate::intake::open_jsonl(&input).await.with_context(|| format!("cannot read {}", input.display()))?;
            let pipeline = Arc::new(crate::pipeline::Pipeline::for_explain(settings.clone())?);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            crate::explain::run(
                pipeline,
                &settings,
                other.as_ref(),
                &mut reader,
                format == ExplainFormat::Json,
                &mut out,
            )
            .await
            .context("explain failed")?;
            std::io::Write::flush(&mut out).context("writing the report")?;
            Ok(())
        }
        Command::Eval { input, triage, compare, format } => {
            let settings = Arc::new(crate::policy::load(cli.config.as_deref()).map_err(config_failure)?);
            let other = compared_policy(cli.config.as_deref(), compare.as_deref())?;
            let text = read_input(&input)?;
            if triage == crate::eval::TriageBy::Model {
                require_keys(&settings)?;
            }
            let report = crate::eval::run(settings, other.as_ref(), &text, triage).await?;
            match format {
                EvalFormat::Table => emit(&crate::eval::render_table(&report))?,
                EvalFormat::Json => {
                    emit(&(serde_json::to_string_pretty(&report).context("rendering the report")? + "\n"))?
                }
            }
            for line in &report.rejected {
                say("WARN", line);
            }
            let missed = report.missed();
            if missed.is_empty() {
                Ok(())
            } else {
                Err(Failure { code: 1, error: anyhow::anyhow!("floors missed: {}", missed.join("; ")) })
            }
        }
        Command::Produce { input } => {
            let mut settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            crate::policy::resolve_identity(&mut settings);
            let report = crate::produce::run(&settings, &input).await?;
            for line in report.invalid.iter().chain(&report.refused) {
                say("WARN", line);
            }
            println!(
                "published {} ticket(s) to `{}`; {} invalid line(s) not sent; {} not confirmed by the broker",
                report.published,
                settings.broker.topics.input,
                report.invalid.len(),
                report.refused.len()
            );
            if report.invalid.is_empty() && report.refused.is_empty() {
                Ok(())
            } else {
                Err(Failure { code: 1, error: anyhow::anyhow!("some lines were not published") })
            }
        }
        Command::Worker { drain_timeout_secs } => {
            let mut settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            require_keys(&settings)?;
            crate::policy::resolve_identity(&mut settings);
            let shutdown = Shutdown::new(Duration::from_secs(drain_timeout_secs));
            spawn_signal_handler(shutdown.clone())?;
            let metrics = crate::telemetry::install().map_err(|e| anyhow::anyhow!(e))?;
            let stats = crate::worker::run(Arc::new(settings), shutdown, metrics).await?;
            let n = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
            // A supervisor may have closed stderr by now: `say` never panics.
            say(
                "INFO",
                &format!(
                    "worker stopped: {} message(s) received, {} acked, {} handed back",
                    n(&stats.received),
                    n(&stats.acked),
                    n(&stats.handed_back)
                ),
            );
            Ok(())
        }
        Command::Replay { kind, since, until, ticket, limit, dry_run, rate } => {
            let mut settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            crate::policy::resolve_identity(&mut settings);
            let usage = |e: String| Failure { code: 2, error: anyhow::anyhow!(e) };
            if let Some(bad) = kind.iter().find(|k| !crate::replay::KINDS.contains(&k.as_str())) {
                return Err(usage(format!(
                    "--kind {bad}: not a dead-letter kind; one of {}",
                    crate::replay::KINDS.join(", ")
                )));
            }
            let time = |flag: &str, v: &Option<String>| -> Result<_, Failure> {
                v.as_deref().map(crate::report::parse_time).transpose().map_err(|e| usage(format!("{flag}: {e}")))
            };
            let options = crate::replay::ReplayOptions {
                kinds: kind,
                since: time("--since", &since)?,
                until: time("--until", &until)?,
                tickets: ticket,
                limit,
                dry_run,
                rate: rate.and_then(std::num::NonZeroU32::new),
            };
            let report = crate::replay::run(&settings, &options).await?;
            for line in &report.listed {
                println!("would replay {line}");
            }
            for line in report.stay_dead.iter().chain(&report.unreadable).chain(&report.failed) {
                say("WARN", line);
            }
            let (input, dlq) = (&settings.broker.topics.input, &settings.broker.topics.dead_letters);
            if dry_run {
                println!(
                    "dry run: {} dead letter(s) of `{dlq}` would move to `{input}`; {} past max_replays stay dead; {} not matching; {} unreadable; nothing moved",
                    report.listed.len(),
                    report.stay_dead.len(),
                    report.unmatched,
                    report.unreadable.len()
                );
            } else {
                println!(
                    "replayed {} dead letter(s) from `{dlq}` to `{input}`; {} past max_replays stay dead; {} not matching and {} unreadable stay in `{dlq}`",
                    report.moved,
                    report.stay_dead.len(),
                    report.unmatched,
                    report.unreadable.len()
                );
            }
            if report.failed.is_empty() {
                Ok(())
            } else {
                Err(Failure {
                    code: 1,
                    error: anyhow::anyhow!(
                        "{} dead letter(s) could not be republished and stay in `{dlq}`",
                        report.failed.len()
                    ),
                })
            }
        }
        Command::Topics => {
            let mut settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            crate::policy::resolve_identity(&mut settings);
            match settings.broker.kind {
                crate::settings::BrokerKind::Rabbitmq => {
                    use crate::broker::rabbitmq::{self, topology};
                    let conn = rabbitmq::connect(&settings.broker.rabbitmq, &settings.worker.id).await?;
                    let declared = topology::declare(&conn, &settings.broker).await;
                    rabbitmq::close(&conn, 200, "done").await;
                    for d in declared? {
                        println!("{d}");
                    }
                    Ok(())
                }
                crate::settings::BrokerKind::Kafka => {
                    for d in crate::broker::kafka::topics::create(&settings.broker).await? {
                        println!("{d}");
                    }
                    Ok(())
                }
            }
        }
        Command::Config => {
            let settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            emit(&settings.redacted_toml())?;
            for warning in crate::policy::filter_warnings(&settings) {
                say("WARN", &warning);
            }
            for missing in crate::providers::missing_keys(&settings) {
                say("WARN", &format!("{missing}: commands that call providers will refuse to start"));
            }
            Ok(())
        }
        Command::Report { database_url: url, since, until, format } => {
            let mut settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            if let Some(url) = &url {
                settings.database.url = database_url("--database-url", url)?;
            }
            let parse = |v: &Option<String>| -> Result<_, Failure> {
                v.as_deref()
                    .map(crate::report::parse_time)
                    .transpose()
                    .map_err(|e| Failure { code: 2, error: anyhow::anyhow!(e) })
            };
            let (since, until) = (parse(&since)?, parse(&until)?);
            let pool = crate::ledger::postgres::reader_pool(&settings.database).await?;
            let report = crate::report::gather(&pool, since, until).await?;
            match format {
                ReportFormat::Table => emit(&crate::report::render_table(&report))?,
                ReportFormat::Json => {
                    emit(&(serde_json::to_string_pretty(&report).context("rendering the report")? + "\n"))?
                }
                ReportFormat::Html => emit(&crate::report::render_html(&report))?,
            }
            Ok(())
        }
        Command::Limits { database_url: url, minutes, format } => {
            let mut settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            if let Some(url) = &url {
                settings.database.url = database_url("--database-url", url)?;
            }
            let pool = crate::ledger::postgres::reader_pool(&settings.database).await?;
            let limits = crate::limits::gather(&pool, &settings, minutes).await?;
            match format {
                LimitsFormat::Table => emit(&crate::limits::render_table(&limits))?,
                LimitsFormat::Json => {
                    emit(&(serde_json::to_string_pretty(&limits).context("rendering the limits")? + "\n"))?
                }
            }
            Ok(())
        }
        Command::Migrate { database_url: url } => {
            let mut settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            if let Some(url) = &url {
                settings.database.url = database_url("--database-url", url)?;
            }
            let applied = crate::ledger::postgres::migrate(&settings.database)
                .await
                .with_context(|| format!("migrating {}", crate::settings::redact_url(&settings.database.url)))?;
            if applied.is_empty() {
                println!("database is up to date (schema version {})", crate::ledger::postgres::latest_version());
            } else {
                println!(
                    "applied migrations {applied:?}; schema version {}",
                    crate::ledger::postgres::latest_version()
                );
            }
            Ok(())
        }
        Command::Process { input, out, quiet, drain_timeout_secs, ledger, metrics_file } => {
            let mut settings = crate::policy::load(cli.config.as_deref()).map_err(config_failure)?;
            if let Some(url) = &ledger {
                settings.database.url = database_url("--ledger", url)?;
            }
            require_keys(&settings)?;
            crate::policy::resolve_identity(&mut settings);
            let settings = Arc::new(settings);
            let shutdown = Shutdown::new(Duration::from_secs(drain_timeout_secs));
            spawn_signal_handler(shutdown.clone())?;
            if !quiet {
                say(
                    "INFO",
                    &format!(
                        "processing {} into {} (Ctrl-C stops intake and finishes what is in flight)",
                        input.display(),
                        out.display()
                    ),
                );
            }
            // Opened before the run, so that a wrong path is reported before the work.
            let metrics_out = metrics_file
                .as_ref()
                .map(|path| {
                    std::fs::File::create(path)
                        .with_context(|| format!("--metrics-file: cannot write {}", path.display()))
                })
                .transpose()?;
            let metrics = metrics_out
                .as_ref()
                .map(|_| crate::telemetry::install())
                .transpose()
                .map_err(|e| anyhow::anyhow!(e))?;
            let opts = ProcessOptions {
                input,
                out_dir: out.clone(),
                progress: !quiet,
                drain_timeout: shutdown.drain_timeout,
                postgres_ledger: ledger.is_some(),
                metrics: metrics.is_some(),
            };
            let report = process::run(settings, opts, shutdown).await.context("process failed")?;
            if let (Some(mut file), Some(handle), Some(path)) = (metrics_out, &metrics, &metrics_file) {
                file.write_all(handle.render().as_bytes())
                    .with_context(|| format!("--metrics-file: cannot write {}", path.display()))?;
            }
            println!("{}", report.summary.render(report.elapsed.as_secs_f64()));
            println!("outputs in {}", out.display());
            if report.interrupted {
                say(
                    "WARN",
                    &format!(
                        "interrupted: stopped reading input; {} ticket(s) already read were not finished and are not in the outputs (run again to answer them)",
                        report.unfinished
                    ),
                );
                return Err(Failure { code: 130, error: anyhow::anyhow!("interrupted") });
            }
            Ok(())
        }
        Command::MockProvider { listen } => {
            use crate::mock_provider::{self, MockConfig, MockServer};
            let config = match cli.config.as_deref() {
                Some(path) => {
                    MockConfig::from_toml_file(path).map_err(|e| Failure { code: 2, error: anyhow::anyhow!(e) })?
                }
                None => MockConfig::default(),
            };
            let server = MockServer::new(config);
            let listener =
                tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("cannot listen on {listen}"))?;
            let shutdown = mock_provider::shutdown_signal().context("installing the SIGINT/SIGTERM handlers")?;
            let addr = listener.local_addr().context("reading the bound address")?;
            println!("listening on {addr}");
            std::io::Write::flush(&mut std::io::stdout()).context("writing to stdout")?;
            server.serve(listener, shutdown).await.context("mock provider failed")?;
            Ok(())
        }
    }
}

/// First SIGINT/SIGTERM: stop intake and drain. Second: abandon in-flight work.
/// The handlers are registered before this returns, so a caller may announce that
/// the run has started and be sure a signal from then on is handled.
fn spawn_signal_handler(shutdown: Shutdown) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut terminate = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        tokio::spawn(async move {
            let mut count = 0;
            loop {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                count += 1;
                if count == 1 {
                    shutdown.stop_intake.cancel();
                    // Not eprintln!: with stderr closed (a supervisor that went away) it
                    // would panic, and this task would never see the second signal.
                    say("INFO", "stopping: finishing in-flight tickets (send the signal again to stop at once)");
                } else {
                    shutdown.abort.cancel();
                    return;
                }
            }
        });
    }
    #[cfg(not(unix))]
    {
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            shutdown.stop_intake.cancel();
            let _ = tokio::signal::ctrl_c().await;
            shutdown.abort.cancel();
        });
    }
    Ok(())
}
