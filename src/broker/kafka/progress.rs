//! A consumer group's progress through a partition whose messages are handled out
//! of order, as `replay` handles its dead-letter topic: a filtered run leaves the
//! dead letters that do not match where they are, for a later run, and moves the
//! ones after them.
//!
//! A committed offset alone cannot say that: it must stay at the first message left
//! for later, and the next run would then move again what this one moved after it.
//! So the commit carries, in its metadata, the offsets above the position that are
//! handled already (`tf-done:12-40,42`); the next run starts at the position and
//! skips those.

use std::collections::BTreeSet;

use rdkafka::topic_partition_list::Offset;

const PREFIX: &str = "tf-done:";

/// Kafka brokers refuse commit metadata over `offset.metadata.max.bytes` (4096 by
/// default): past this, a run handles no more of the partition.
pub const MAX_METADATA: usize = 3_000;

/// Where one partition stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    /// The first offset not yet handled.
    position: i64,
    /// Offsets above `position` handled already.
    above: BTreeSet<i64>,
}

impl Progress {
    /// The progress a commit records (`committed`, with its `metadata`) for a
    /// partition whose first message is at `low`.
    pub fn from_commit(committed: Offset, metadata: &str, low: i64) -> Progress {
        let position = match committed {
            Offset::Offset(n) => n.max(low),
            _ => low,
        };
        let mut above = BTreeSet::new();
        for range in metadata.strip_prefix(PREFIX).unwrap_or_default().split(',').filter(|r| !r.is_empty()) {
            let (from, to) = range.split_once('-').unwrap_or((range, range));
            if let (Ok(from), Ok(to)) = (from.parse::<i64>(), to.parse::<i64>()) {
                above.extend(from.max(position + 1)..=to);
            }
        }
        Progress { position, above }
    }

    pub fn position(&self) -> i64 {
        self.position
    }

    /// Whether an earlier run (or this one) handled `offset` already.
    pub fn is_done(&self, offset: i64) -> bool {
        offset < self.position || self.above.contains(&offset)
    }

    /// Records `offset` as handled.
    pub fn done(&mut self, offset: i64) {
        if offset < self.position {
            return;
        }
        self.above.insert(offset);
        while self.above.remove(&self.position) {
            self.position += 1;
        }
    }

    /// The metadata to commit with [`Progress::position`].
    pub fn metadata(&self) -> String {
        let mut out = String::from(PREFIX);
        let mut offsets = self.above.iter().copied().peekable();
        while let Some(from) = offsets.next() {
            let mut to = from;
            while offsets.peek() == Some(&(to + 1)) {
                to = offsets.next().unwrap_or(to);
            }
            if out.len() > PREFIX.len() {
                out.push(',');
            }
            if from == to {
                out.push_str(&from.to_string());
            } else {
                out.push_str(&format!("{from}-{to}"));
            }
        }
        out
    }

    /// Whether the metadata still fits what a broker accepts.
    pub fn fits(&self) -> bool {
        self.metadata().len() <= MAX_METADATA
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handled_offsets_above_a_kept_one_survive_the_commit_and_the_position_closes_gaps() {
        let mut p = Progress::from_commit(Offset::Invalid, "", 5);
        assert_eq!(p.position(), 5);
        for o in [6, 7, 8, 10] {
            p.done(o);
        }
        assert_eq!((p.position(), p.metadata().as_str()), (5, "tf-done:6-8,10"));
        let again = Progress::from_commit(Offset::Offset(p.position()), &p.metadata(), 0);
        assert_eq!(again, p);
        assert!(again.is_done(4) && again.is_done(7) && again.is_done(10));
        assert!(!again.is_done(5) && !again.is_done(9) && !again.is_done(11));
        p.done(5);
        assert_eq!((p.position(), p.metadata().as_str()), (9, "tf-done:10"));
        p.done(9);
        assert_eq!((p.position(), p.metadata().as_str()), (11, "tf-done:"));
    }

    #[test]
    fn foreign_or_stale_metadata_is_ignored() {
        let p = Progress::from_commit(Offset::Offset(20), "something else", 0);
        assert_eq!((p.position(), p.metadata().as_str()), (20, "tf-done:"));
        // Offsets below the position (or below the partition's start) mean nothing.
        let p = Progress::from_commit(Offset::Offset(3), "tf-done:1-2,5,x-9", 4);
        assert_eq!((p.position(), p.metadata().as_str()), (4, "tf-done:5"));
    }

    #[test]
    fn interleaved_kept_offsets_are_bounded_by_what_a_broker_accepts() {
        let mut p = Progress::from_commit(Offset::Offset(0), "", 0);
        let mut o = 1;
        while p.fits() {
            p.done(o);
            o += 2;
        }
        assert!(p.metadata().len() > MAX_METADATA && o > 500);
    }
}
