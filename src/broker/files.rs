//! The output side of `ticketflow process`: `replies.jsonl`, `costs.jsonl` and
//! `dead_letters.jsonl` in the output directory, one JSON document per line, plus
//! the running [`Summary`].
//!
//! Each output is serialized before any lock is taken and written as whole lines,
//! so the files hold only complete records even when a run is interrupted.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use async_trait::async_trait;

use super::{BrokerError, Publisher};
use crate::providers::pricing::PriceTable;
use crate::summary::Summary;
use crate::ticket::Output;

const BUFFER: usize = 256 * 1024;

struct Files {
    replies: BufWriter<File>,
    costs: BufWriter<File>,
    dead_letters: BufWriter<File>,
    summary: Summary,
}

/// Publishes outputs to JSONL files.
pub struct FilePublisher {
    files: Mutex<Files>,
    prices: PriceTable,
}

impl FilePublisher {
    /// Creates (truncating) the three files in `dir`, creating `dir` if needed.
    pub fn create(dir: &Path, prices: PriceTable) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let open = |name: &str| -> std::io::Result<BufWriter<File>> {
            Ok(BufWriter::with_capacity(BUFFER, File::create(dir.join(name))?))
        };
        Ok(FilePublisher {
            files: Mutex::new(Files {
                replies: open("replies.jsonl")?,
                costs: open("costs.jsonl")?,
                dead_letters: open("dead_letters.jsonl")?,
                summary: Summary::default(),
            }),
            prices,
        })
    }

    /// Flushes the files and returns the summary so far.
    pub fn finish(&self) -> Result<Summary, BrokerError> {
        let mut guard = self.files.lock().map_err(|_| BrokerError::Publish("output lock poisoned".into()))?;
        let f = &mut *guard;
        for w in [&mut f.replies, &mut f.costs, &mut f.dead_letters] {
            w.flush().map_err(|e| BrokerError::Publish(format!("flushing output files: {e}")))?;
        }
        Ok(std::mem::take(&mut f.summary))
    }
}

#[async_trait]
impl Publisher for FilePublisher {
    async fn publish(&self, output: &Output) -> Result<(), BrokerError> {
        let ser = |v: &dyn erased::Json| -> Result<Vec<u8>, BrokerError> {
            let mut line = v.to_json().map_err(|e| BrokerError::Publish(format!("serializing output: {e}")))?;
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
        let mut f = self.files.lock().map_err(|_| BrokerError::Publish("output lock poisoned".into()))?;
        let io = |e: std::io::Error| BrokerError::Publish(format!("writing output files: {e}"));
        f.costs.write_all(&cost_lines).map_err(io)?;
        if is_reply {
            f.replies.write_all(&main).map_err(io)?;
        } else {
            f.dead_letters.write_all(&main).map_err(io)?;
        }
        f.summary.add(output, &self.prices);
        Ok(())
    }
}

/// Object-safe serialization to JSON bytes, so one closure serves every output type.
mod erased {
    pub trait Json {
        fn to_json(&self) -> serde_json::Result<Vec<u8>>;
    }

    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> serde_json::Result<Vec<u8>> {
            serde_json::to_vec(self)
        }
    }
}
