//! What a run stands on besides the broker: the mock provider, a cuttable TCP proxy
//! in front of PostgreSQL (both on a runtime of their own, so that the runner's
//! waits never slow their answers), and, for the `db-restart` scenario, a
//! PostgreSQL server of the run's own that can be restarted without touching the
//! machine's.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ticketflow::mock_provider::{MockConfig, MockServer};

/// A TCP proxy that can be cut: every connection dropped and new ones refused until
/// it is restored (the workers' view of a database outage).
pub struct Proxy {
    pub port: u16,
    cut: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl Proxy {
    async fn start(upstream: String) -> Result<Proxy, String> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| format!("proxy: {e}"))?;
        let port = listener.local_addr().map_err(|e| format!("proxy: {e}"))?.port();
        let cut = Arc::new(AtomicBool::new(false));
        let links = Arc::new(Mutex::new(Vec::new()));
        let (is_cut, held) = (cut.clone(), links.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if is_cut.load(Ordering::SeqCst) {
                    continue; // refused: dropped at once
                }
                let upstream = upstream.clone();
                let link = tokio::spawn(async move {
                    if let Ok(mut server) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                if let Ok(mut held) = held.lock() {
                    held.retain(|l: &tokio::task::JoinHandle<()>| !l.is_finished());
                    held.push(link);
                }
            }
        });
        Ok(Proxy { port, cut, links })
    }

    pub fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            if let Ok(mut held) = self.links.lock() {
                for link in held.drain(..) {
                    link.abort();
                }
            }
        }
    }
}

/// Starts the mock provider and a proxy to `postgres` (host:port) on a runtime of
/// their own; they serve until the runner exits.
pub fn start(mock: MockConfig, postgres: String) -> Result<(String, MockServer, Proxy), String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build() {
            Ok(runtime) => runtime,
            Err(e) => {
                let _ = tx.send(Err(format!("cannot start a runtime: {e}")));
                return;
            }
        };
        runtime.block_on(async move {
            let started = async {
                let (base, mock) = ticketflow::mock_provider::spawn(mock)
                    .await
                    .map_err(|e| format!("cannot start the mock provider: {e}"))?;
                let proxy = Proxy::start(postgres).await?;
                Ok::<_, String>((base, mock, proxy))
            };
            match started.await {
                Ok(services) => {
                    let _ = tx.send(Ok(services));
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
    });
    rx.recv().map_err(|_| "the services thread stopped".to_string())?
}

pub async fn sql(url: &str) -> Result<tokio_postgres::Client, String> {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.map_err(|e| format!("{url}: {e}"))?;
    tokio::spawn(connection);
    Ok(client)
}

/// A port nobody listens on now.
pub fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free port: {e}"))?;
    listener.local_addr().map(|a| a.port()).map_err(|e| format!("no free port: {e}"))
}

/// Runs a server tool: as the service's own user when the runner is root (PostgreSQL
/// and RabbitMQ refuse to run as root, or drop to their user), else as is.
pub fn as_service_user(user: &str, program: &str) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", user, "--", program]);
        cmd
    } else {
        Command::new(program)
    }
}

pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

/// Hands a directory to a service's user when the runner is root.
pub fn give(dir: &Path, user: &str) -> Result<(), String> {
    if is_root() {
        let status = Command::new("chown").args(["-R", user]).arg(dir).status().map_err(|e| format!("chown: {e}"))?;
        if !status.success() {
            return Err(format!("cannot hand {} to {user}", dir.display()));
        }
    }
    Ok(())
}

fn quiet(mut cmd: Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A PostgreSQL server of the run's own (initdb in the run's directory, a free port,
/// no fsync): restarting it touches nobody else.
pub struct OwnPostgres {
    bin: PathBuf,
    data: PathBuf,
    options: String,
    pub port: u16,
}

impl OwnPostgres {
    pub fn start(dir: &Path) -> Result<OwnPostgres, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|versions| versions.flatten().map(|v| v.path().join("bin")).filter(|b| b.is_dir()).max())
            .ok_or("no PostgreSQL server under /usr/lib/postgresql (the db-restart scenario runs one of its own)")?;
        let root = dir.join("postgres");
        std::fs::create_dir_all(&root).map_err(|e| format!("{}: {e}", root.display()))?;
        give(&root, "postgres")?;
        let data = root.join("data");
        let port = free_port()?;
        let mut initdb = as_service_user("postgres", &bin.join("initdb").to_string_lossy());
        initdb.arg("-D").arg(&data).args(["-A", "trust", "-U", "postgres", "--no-sync"]);
        quiet(initdb, "initdb")?;
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            root.display()
        );
        let pg = OwnPostgres { bin, data, options, port };
        let mut stop: Vec<String> =
            if is_root() { ["runuser", "-u", "postgres", "--"].map(String::from).to_vec() } else { Vec::new() };
        stop.push(pg.bin.join("pg_ctl").to_string_lossy().into_owned());
        stop.extend([
            "-D".into(),
            pg.data.to_string_lossy().into_owned(),
            "stop".into(),
            "-m".into(),
            "immediate".into(),
        ]);
        crate::on_interrupt(stop);
        pg.ctl(&["start"])?;
        Ok(pg)
    }

    fn ctl(&self, action: &[&str]) -> Result<(), String> {
        let mut cmd = as_service_user("postgres", &self.bin.join("pg_ctl").to_string_lossy());
        cmd.arg("-D").arg(&self.data).args(["-w", "-t", "60", "-o", &self.options]);
        cmd.arg("-l").arg(self.data.with_file_name("server.log"));
        cmd.args(action);
        quiet(cmd, &format!("pg_ctl {}", action.join(" ")))
    }

    /// Stops the server (fast shutdown: sessions ended, work rolled back).
    pub fn stop(&self) -> Result<(), String> {
        self.ctl(&["stop", "-m", "fast"])
    }

    pub fn start_again(&self) -> Result<(), String> {
        self.ctl(&["start"])
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.ctl(&["stop", "-m", "immediate"]);
    }
}
