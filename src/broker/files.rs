//! The output side of `ticketflow process`: `replies.jsonl`, `costs.jsonl` and
//! `dead_letters.jsonl` in the output directory, one JSON document per line.
//!
//! - A run writes `NAME.jsonl.partial` files and renames them over `NAME.jsonl` when
//!   it ends (finished or interrupted), so the previous run's outputs stay whole
//!   until this run has outputs to replace them with.
//! - With a durable ledger (`process --ledger`), each output is written and flushed
//!   to the operating system before `publish` returns: once the ledger marks a unit
//!   published (and a re-run will not send it again), its lines survive a crash of
//!   the process (not of the machine: there is no fsync per output). Flushes are
//!   group commits: one flush covers every output written while it waited. With
//!   the in-memory ledger a crash forgets what was published along with the
//!   outputs, and a re-run answers everything again, so outputs stay buffered.
//! - Partial files left by a run that crashed are kept, renamed with a timestamp,
//!   since with `--ledger` they may hold the only copy of replies already marked
//!   published.
//! - Each output is serialized before the lock is taken and written as whole lines,
//!   so the files hold only complete records.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{BrokerError, Publisher, ToJson};
use crate::ticket::Output;

const BUFFER: usize = 256 * 1024;
const NAMES: [&str; 3] = ["replies.jsonl", "costs.jsonl", "dead_letters.jsonl"];

struct Files {
    replies: BufWriter<File>,
    costs: BufWriter<File>,
    dead_letters: BufWriter<File>,
    /// Outputs written into the buffers, and how many of them are flushed.
    written: u64,
    flushed: u64,
}

/// Publishes outputs to JSONL files.
pub struct FilePublisher {
    dir: PathBuf,
    files: Mutex<Files>,
    /// Flush each output before `publish` returns (see the module docs).
    flush_each: bool,
}

fn partial(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.partial"))
}

impl FilePublisher {
    /// Creates `dir` if needed and this run's partial files in it. Returns the
    /// publisher and the names that leftover partial files of a crashed run were
    /// kept under. `flush_each`: flush every output before `publish` returns, for a
    /// durable ledger (see the module docs).
    pub fn create(dir: &Path, flush_each: bool) -> std::io::Result<(Self, Vec<PathBuf>)> {
        std::fs::create_dir_all(dir)?;
        let mut kept = Vec::new();
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%S");
        for name in NAMES {
            let leftover = partial(dir, name);
            if leftover.exists() {
                let keep = dir.join(format!("{name}.crashed-{stamp}"));
                std::fs::rename(&leftover, &keep)?;
                kept.push(keep);
            }
        }
        let open = |name: &str| -> std::io::Result<BufWriter<File>> {
            Ok(BufWriter::with_capacity(BUFFER, File::create(partial(dir, name))?))
        };
        let files = Files {
            replies: open(NAMES[0])?,
            costs: open(NAMES[1])?,
            dead_letters: open(NAMES[2])?,
            written: 0,
            flushed: 0,
        };
        Ok((FilePublisher { dir: dir.to_owned(), files: Mutex::new(files), flush_each }, kept))
    }

    /// Flushes the files and puts them in place of the previous run's outputs.
    pub fn commit(&self) -> Result<(), BrokerError> {
        let mut guard = self.files.lock().map_err(|_| BrokerError::Publish("output lock poisoned".into()))?;
        let f = &mut *guard;
        for w in [&mut f.replies, &mut f.costs, &mut f.dead_letters] {
            w.flush().map_err(|e| BrokerError::Publish(format!("flushing output files: {e}")))?;
        }
        for name in NAMES {
            std::fs::rename(partial(&self.dir, name), self.dir.join(name))
                .map_err(|e| BrokerError::Publish(format!("renaming {name}.partial into place: {e}")))?;
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for FilePublisher {
    async fn publish(&self, output: &Output) -> Result<(), BrokerError> {
        let ser = |v: &dyn ToJson| -> Result<Vec<u8>, BrokerError> {
            let mut line = v.to_json().map_err(|e| BrokerError::Refused(format!("serializing output: {e}")))?;
            line.push(b'\n');
            Ok(line)
        };
        let mut cost_lines = Vec::new();
        for c in output.costs() {
            cost_lines.extend(ser(c)?);
        }
        let (main, is_reply) = match output {
            Output::Reply { reply, .. } => (ser(reply)?, true),
            Output::DeadLetter { dead_letter, .. } => (ser(dead_letter)?, false),
        };
        let io = |e: std::io::Error| BrokerError::Publish(format!("writing output files: {e}"));
        // A poisoned lock will not heal: refused, so the attempt counts towards its bound.
        let lock = || self.files.lock().map_err(|_| BrokerError::Refused("output lock poisoned".into()));
        let mine = {
            let mut guard = lock()?;
            let f = &mut *guard;
            f.costs.write_all(&cost_lines).map_err(io)?;
            if is_reply { &mut f.replies } else { &mut f.dead_letters }.write_all(&main).map_err(io)?;
            f.written += 1;
            f.written
        };
        if !self.flush_each {
            return Ok(());
        }
        // Group commit: whoever takes the lock first flushes every output written so
        // far; the others find theirs flushed already.
        let mut guard = lock()?;
        let f = &mut *guard;
        if f.flushed < mine {
            for w in [&mut f.costs, &mut f.replies, &mut f.dead_letters] {
                w.flush().map_err(io)?;
            }
            f.flushed = f.written;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previous_outputs_survive_until_commit_and_crashed_partials_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("replies.jsonl"), "yesterday\n").unwrap();
        std::fs::write(dir.path().join("replies.jsonl.partial"), "crashed run\n").unwrap();
        let (publisher, kept) = FilePublisher::create(dir.path(), true).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read_to_string(&kept[0]).unwrap(), "crashed run\n");
        assert_eq!(std::fs::read_to_string(dir.path().join("replies.jsonl")).unwrap(), "yesterday\n");
        publisher.commit().unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("replies.jsonl")).unwrap(), "");
        assert!(!dir.path().join("replies.jsonl.partial").exists());
    }
}
