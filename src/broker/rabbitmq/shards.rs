//! RabbitMQ input shards: conversations kept in order across worker replicas.
//!
//! With `broker.rabbitmq.shards` = N > 0, the input (`broker.topics.input`, say
//! `tickets`) is an `x-consistent-hash` exchange bound to N queues `tickets.0` …
//! `tickets.N-1`, each with single active consumer. The exchange hashes the routing
//! key, which every publisher sets to the ticket's `conversation_id` ([`routing_key`]),
//! so a conversation's tickets are all in one queue, in the order they were published.
//!
//! The live workers divide the shards among themselves through the ledger's database:
//! each renews its row in `shard_members` every `member_heartbeat_ms`, reads the rows
//! seen within three heartbeats and computes the same division ([`division`]:
//! rendezvous hashing with bounded loads, even parts; adding a member moves about
//! 1/N of the shards, removing one moves its own and rarely one or two others). A
//! worker consumes the shards it is given and no other.
//!
//! Single active consumer is the fence. A worker subscribes to a shard it is given at
//! once; while the previous owner still consumes it, the broker keeps the new consumer
//! standby. The previous owner, once it sees the shard gone, stops taking its
//! deliveries, lets the started ones finish (the dispatcher's revocation), and only
//! then closes the shard's channel (its consumer with it): the broker returns the
//! deliveries it never started, in their order, and activates the standby. So a
//! conversation's next ticket never starts before the previous one is settled. A
//! worker that dies loses its shards when its connection closes (the broker activates
//! a standby) and when the roster drops it (the others then subscribe).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ledger::LedgerError;

/// AMQP short strings (routing keys, message ids) hold at most this many bytes.
pub const SHORT_STRING_MAX: usize = 255;

/// The queue of shard `shard` of `input`.
pub fn queue(input: &str, shard: u16) -> String {
    format!("{input}.{shard}")
}

/// The routing key a ticket of `conversation_id` is published with: the id itself,
/// or, for an id longer than an AMQP short string (255 bytes), `xxh3:` and the hex of
/// its 128-bit XXH3 hash (the same id always gives the same key).
pub fn routing_key(conversation_id: &str) -> Cow<'_, str> {
    short(conversation_id)
}

/// `s`, or its `xxh3:` hash when it does not fit an AMQP short string.
pub fn short(s: &str) -> Cow<'_, str> {
    if s.len() <= SHORT_STRING_MAX {
        Cow::Borrowed(s)
    } else {
        Cow::Owned(format!("xxh3:{:032x}", xxhash_rust::xxh3::xxh3_128(s.as_bytes())))
    }
}

/// The shards of `shards` that `member` is given when `members` are live (see
/// [`division`]).
pub fn assign(shards: u16, members: &[String], member: &str) -> BTreeSet<u16> {
    let Some(me) = members.iter().position(|m| m == member) else { return BTreeSet::new() };
    division(shards, members)
        .into_iter()
        .enumerate()
        .filter(|(_, owner)| *owner == Some(me))
        .map(|(s, _)| s as u16)
        .collect()
}

/// The member given `shard` of `shards`, if any is live.
pub fn owner(shards: u16, shard: u16, members: &[String]) -> Option<&str> {
    let owner = division(shards, members).get(usize::from(shard)).copied().flatten()?;
    Some(members[owner].as_str())
}

/// The owner of every shard, as an index into `members`: rendezvous hashing with
/// bounded loads. Every (member, shard) pair has a score, the XXH3 hash of both; the
/// pairs are taken from the highest score down, and a pair gives its shard to its
/// member unless the shard is given already or the member holds its even part
/// (`shards / members`, rounded up). So the division is even (a replica that held
/// twice its part would bound the fleet's throughput: everything waits on its
/// shards), every member computes the same one from the same list whatever its
/// order, and a change of members moves little: adding one takes about 1/N of the
/// shards to it, removing one moves its shards and, rarely, one or two others so
/// that the parts stay even.
pub fn division(shards: u16, members: &[String]) -> Vec<Option<usize>> {
    let mut owners = vec![None; usize::from(shards)];
    if members.is_empty() {
        return owners;
    }
    let part = usize::from(shards).div_ceil(members.len());
    let mut pairs: Vec<(u64, &str, u16, usize)> = Vec::with_capacity(usize::from(shards) * members.len());
    for (i, member) in members.iter().enumerate() {
        for shard in 0..shards {
            pairs.push((score(member, shard), member.as_str(), shard, i));
        }
    }
    // Highest score first; the member's name and the shard break ties, so that the
    // order of `members` never matters.
    pairs.sort_unstable_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)).then_with(|| a.2.cmp(&b.2)));
    let mut held = vec![0usize; members.len()];
    let mut left = usize::from(shards);
    for (_, _, shard, member) in pairs {
        let owner = &mut owners[usize::from(shard)];
        if owner.is_some() || held[member] >= part {
            continue;
        }
        *owner = Some(member);
        held[member] += 1;
        left -= 1;
        if left == 0 {
            break;
        }
    }
    owners
}

fn score(member: &str, shard: u16) -> u64 {
    let mut bytes = Vec::with_capacity(member.len() + 3);
    bytes.extend_from_slice(member.as_bytes());
    bytes.push(0);
    bytes.extend_from_slice(&shard.to_be_bytes());
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// Where the members meet: the PostgreSQL ledger (`ledger::meeting::PgRoster`), or a
/// test double.
#[async_trait]
pub trait Roster: Send + Sync {
    /// Renews `member`'s row in `scope`; returns the members seen within `live_for`,
    /// itself included, sorted.
    async fn beat(&self, scope: &str, member: &str, live_for: Duration) -> Result<Vec<String>, LedgerError>;
    /// The members of `scope` seen within `live_for`, sorted (`ticketflow members`).
    async fn members(&self, scope: &str, live_for: Duration) -> Result<Vec<String>, LedgerError>;
    /// Removes `member`'s row: its shards go to the others at their next heartbeat.
    async fn leave(&self, scope: &str, member: &str) -> Result<(), LedgerError>;
}

/// A member unseen for this many heartbeats is left out of the division.
pub const LIVE_HEARTBEATS: u32 = 3;

/// The roster's scope for `input` on the broker at `url`: its vhost and the input.
pub fn scope(url: &str, input: &str) -> String {
    let vhost = url
        .split_once("://")
        .map(|(_, rest)| rest)
        .and_then(|rest| rest.split_once('/'))
        .map(|(_, path)| path.split('?').next().unwrap_or(""))
        .filter(|v| !v.is_empty())
        .unwrap_or("%2f");
    format!("{vhost}/{input}")
}

/// One worker's membership: heartbeats every `heartbeat` and publishes the shards it
/// is given on a watch channel; leaves the roster when stopped.
pub struct Membership {
    pub roster: Arc<dyn Roster>,
    pub scope: String,
    pub member: String,
    pub shards: u16,
    pub heartbeat: Duration,
}

impl Membership {
    /// Starts heartbeating; the receiver holds the shards given to this member (none
    /// until the first heartbeat answers). The task ends, leaving the roster, once
    /// `stop` is cancelled.
    pub fn start(self, stop: CancellationToken) -> (watch::Receiver<BTreeSet<u16>>, tokio::task::JoinHandle<()>) {
        let (tx, rx) = watch::channel(BTreeSet::new());
        let task = tokio::spawn(self.run(tx, stop));
        (rx, task)
    }

    async fn run(self, given: watch::Sender<BTreeSet<u16>>, stop: CancellationToken) {
        let live_for = self.heartbeat * LIVE_HEARTBEATS;
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut members_seen = 0;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            // A failed heartbeat keeps the shards as they are: while this member
            // cannot reach the database, the others' division leaves it out after
            // three heartbeats, and single active consumer keeps their consumers
            // standby until it lets go.
            let members = match tokio::time::timeout(live_for, self.roster.beat(&self.scope, &self.member, live_for))
                .await
            {
                Ok(Ok(members)) => members,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "could not renew this worker's membership of the shards' roster; keeping its shards");
                    continue;
                }
                Err(_) => {
                    tracing::warn!(
                        "renewing this worker's membership of the shards' roster timed out; keeping its shards"
                    );
                    continue;
                }
            };
            let mine = assign(self.shards, &members, &self.member);
            if *given.borrow() != mine || members.len() != members_seen {
                if *given.borrow() != mine {
                    tracing::info!(
                        shards = %list(&mine),
                        given = mine.len(),
                        of = self.shards,
                        members = members.len(),
                        "input shards assigned to this worker"
                    );
                }
                members_seen = members.len();
                given.send_replace(mine);
            }
        }
        given.send_replace(BTreeSet::new());
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), self.roster.leave(&self.scope, &self.member))
            .await
            .unwrap_or_else(|_| Err(LedgerError::Other("timed out".into())))
        {
            tracing::info!(error = %e, "could not leave the shards' roster; the others take this worker's shards after three heartbeats");
        }
    }
}

/// Shards as "0,3,7".
pub fn list(shards: &BTreeSet<u16>) -> String {
    shards.iter().map(u16::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("worker-{i}#{:08x}", i * 7919)).collect()
    }

    #[test]
    fn every_shard_has_exactly_one_owner_whatever_the_order_of_the_list() {
        let m = members(5);
        let mut reversed = m.clone();
        reversed.reverse();
        let mut seen = BTreeSet::new();
        for member in &m {
            let mine = assign(64, &m, member);
            assert_eq!(mine, assign(64, &reversed, member));
            for s in mine {
                assert!(seen.insert(s), "shard {s} given twice");
            }
        }
        assert_eq!(seen.len(), 64);
        assert!(assign(8, &[], "x").is_empty());
    }

    #[test]
    fn adding_a_member_moves_about_one_in_n_and_removing_one_moves_its_own_and_few_others() {
        let shards = 256;
        let before = members(3);
        let after = members(4);
        let moved: Vec<u16> = (0..shards).filter(|&s| owner(shards, s, &before) != owner(shards, s, &after)).collect();
        // 1/4 of 256 is 64, all to the newcomer; the bounded loads move a few more.
        let to_newcomer = moved.iter().filter(|&&s| owner(shards, s, &after) == Some(after[3].as_str())).count();
        assert_eq!(to_newcomer, 64, "the newcomer gets its even part");
        assert!(moved.len() <= 64 + 16, "{} of {shards} moved", moved.len());
        let fewer: Vec<String> = after.iter().filter(|m| *m != &after[1]).cloned().collect();
        let others_moved = (0..shards)
            .filter(|&s| owner(shards, s, &after) != Some(after[1].as_str()))
            .filter(|&s| owner(shards, s, &after) != owner(shards, s, &fewer))
            .count();
        assert!(others_moved <= 16, "{others_moved} shards moved although their owner stayed");
    }

    #[test]
    fn the_division_is_even() {
        for (shards, n) in [(16u16, 2usize), (16, 3), (16, 5), (48, 3), (7, 3), (3, 5)] {
            let m = members(n);
            let parts: Vec<usize> = m.iter().map(|member| assign(shards, &m, member).len()).collect();
            assert_eq!(parts.iter().sum::<usize>(), usize::from(shards), "{parts:?}");
            let part = usize::from(shards).div_ceil(n);
            assert!(parts.iter().all(|&p| p <= part), "{shards} shards among {n}: {parts:?}");
        }
    }

    #[test]
    fn routing_keys_fit_an_amqp_short_string() {
        assert_eq!(routing_key("CONV-1"), "CONV-1");
        let cjk = "会".repeat(128);
        let key = routing_key(&cjk);
        assert!(key.len() <= SHORT_STRING_MAX && key.starts_with("xxh3:"), "{key}");
        assert_eq!(key, routing_key(&cjk), "the same id gives the same key");
        assert_ne!(key, routing_key(&"会".repeat(127)));
        let edge = "a".repeat(255);
        assert_eq!(routing_key(&edge), edge.as_str());
    }

    #[test]
    fn the_scope_is_the_vhost_and_the_input() {
        assert_eq!(scope("amqp://guest:guest@127.0.0.1:5672/%2f", "tickets"), "%2f/tickets");
        assert_eq!(scope("amqp://h:5672/prod?heartbeat=5", "tickets"), "prod/tickets");
        assert_eq!(scope("amqp://h:5672", "tickets"), "%2f/tickets");
    }
}
