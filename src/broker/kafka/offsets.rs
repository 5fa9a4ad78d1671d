//! Which offset of each partition may be committed: the lowest offset still in
//! flight, or one past the highest polled when none is. Completions arrive in any
//! order (thousands in flight, keys in parallel); the commit position never passes a
//! message that has not finished, whatever finishes after it. Offsets need not be
//! contiguous (compaction, transaction markers): only polled offsets count.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

#[derive(Debug, Default)]
struct Partition {
    in_flight: BTreeSet<i64>,
    /// One past the highest offset polled.
    next: i64,
}

impl Partition {
    fn position(&self) -> i64 {
        self.in_flight.first().copied().unwrap_or(self.next)
    }
}

/// The in-flight offsets of every partition of this consumer.
#[derive(Debug, Default)]
pub struct Offsets {
    partitions: Mutex<HashMap<(String, i32), Partition>>,
}

impl Offsets {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<(String, i32), Partition>) -> T) -> T {
        f(&mut self.partitions.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// A message was polled: it is in flight until [`Offsets::completed`].
    pub fn polled(&self, topic: &str, partition: i32, offset: i64) {
        self.with(|parts| {
            let p = parts.entry((topic.to_owned(), partition)).or_default();
            p.in_flight.insert(offset);
            p.next = p.next.max(offset + 1);
        });
    }

    /// A message is done. Returns the partition's new commit position when this
    /// completion moved it.
    pub fn completed(&self, topic: &str, partition: i32, offset: i64) -> Option<i64> {
        self.with(|parts| {
            let p = parts.get_mut(&(topic.to_owned(), partition))?;
            let before = p.position();
            p.in_flight.remove(&offset);
            let after = p.position();
            (after > before).then_some(after)
        })
    }

    /// The commit position of a partition (the next offset to consume), if any
    /// message of it was polled.
    pub fn position(&self, topic: &str, partition: i32) -> Option<i64> {
        self.with(|parts| parts.get(&(topic.to_owned(), partition)).map(Partition::position))
    }

    /// Messages of a partition still in flight.
    pub fn in_flight(&self, topic: &str, partition: i32) -> usize {
        self.with(|parts| parts.get(&(topic.to_owned(), partition)).map_or(0, |p| p.in_flight.len()))
    }

    /// The partition is no longer ours (revoked): its next owner starts from the
    /// committed position, and late completions of ours change nothing.
    pub fn forget(&self, topic: &str, partition: i32) {
        self.with(|parts| parts.remove(&(topic.to_owned(), partition)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_position_waits_for_the_slowest_message() {
        let o = Offsets::default();
        for offset in [10, 11, 12] {
            o.polled("t", 0, offset);
        }
        assert_eq!(o.position("t", 0), Some(10));
        assert_eq!(o.completed("t", 0, 11), None, "11 done, 10 still in flight");
        assert_eq!(o.completed("t", 0, 12), None);
        assert_eq!(o.completed("t", 0, 10), Some(13), "all done: one past the last");
        assert_eq!(o.position("t", 1), None);
        o.polled("t", 0, 20); // a gap (compaction): only polled offsets count
        assert_eq!(o.position("t", 0), Some(20));
        o.forget("t", 0);
        assert_eq!(o.completed("t", 0, 20), None, "a revoked partition's completions change nothing");
    }

    proptest! {
        #[test]
        fn the_position_never_passes_an_unfinished_message(order in Just((0..40i64).collect::<Vec<_>>()).prop_shuffle()) {
            let o = Offsets::default();
            for offset in 0..40 {
                o.polled("t", 3, offset);
            }
            let mut done = BTreeSet::new();
            for offset in order {
                done.insert(offset);
                o.completed("t", 3, offset);
                let lowest_unfinished = (0..40).find(|x| !done.contains(x)).unwrap_or(40);
                prop_assert_eq!(o.position("t", 3), Some(lowest_unfinished));
            }
        }
    }
}
