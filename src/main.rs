//! The `ticketflow` binary: parse the command line, set up logging, run a command,
//! map failures to exit codes (0 ok, 1 runtime failure, 2 usage or configuration).

use clap::Parser;

// A worker allocates small, short-lived buffers for every message and call; mimalloc
// serves them with less contention between threads than the system allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use ticketflow::cli::{self, Cli, LogFormat};

fn main() {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    cli::set_json_logs(matches!(cli.log_format, LogFormat::Json));
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            cli::say("ERROR", &format!("cannot start the async runtime: {e}"));
            std::process::exit(1);
        }
    };
    if let Err(failure) = runtime.block_on(cli::run(cli)) {
        if failure.code != 130 {
            cli::say("ERROR", &format!("{:#}", failure.error));
        }
        std::process::exit(failure.code);
    }
}

/// Warnings and errors of ours. lapin logs at ERROR every refusal the broker sends,
/// expected ones included (a passive declaration of a missing queue); the errors that
/// matter reach the user through our own messages. `TICKETFLOW_LOG` overrides this.
const DEFAULT_LOG_FILTER: &str = "warn,lapin=off";

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TICKETFLOW_LOG").unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    // Colour codes only for a person at a terminal, never into a file or a collector.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}
