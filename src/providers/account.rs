//! Account-wide rate limits across worker processes. A provider's
//! `requests_per_minute` and `tokens_per_minute` are facts about the account, so the
//! worker replicas divide them, through the PostgreSQL ledger they already share (no
//! other server, no database round trip per call):
//!
//! - Every heartbeat ([`Timing`], `limits.account_heartbeat_ms`) each replica (a member) records, per rate-limited provider,
//!   its demand (requests per second it asked for lately, plus its backlog) and the
//!   share it enforces, and reads the live members' rows. Every member computes the
//!   same division from the same rows ([`divide`]): max-min fair by demand, what
//!   nobody asks for spread evenly, so one busy replica can use nearly all of the
//!   account while the others idle.
//! - governor stays the enforcer in each process; only its quota changes
//!   ([`ProviderLimits::set_share`]).
//! - A member lowers its share at once and raises it only after two heartbeats (from
//!   no share at all, as soon as it has claimed the raise: a new or restarted replica
//!   is at work one heartbeat after it first reported), and never above what the
//!   others leave unclaimed: each row carries the member's claim
//!   (its share, or the raise it is about to make), and a member raises only to what
//!   it claimed itself and one minus the others' claims. Of two members that
//!   heartbeat, at least one reads the other's new claim (each writes before it
//!   reads), so the shares in force never sum above the limit, whatever the timing.
//!   A member that lowers its share writes its lower claim at once (one more
//!   statement, only then), so the room it leaves is usable a heartbeat sooner.
//! - A member that stops heartbeating (killed, cut off) is dropped from the division
//!   after three heartbeats, and its share goes to the others two heartbeats later. A
//!   member that cannot reach the database keeps its share while the others still
//!   count it (three heartbeats less one), then falls back to a safe share: its last
//!   share, decaying toward the limit divided by the members it last knew (half the
//!   gap each heartbeat), never above what it had, never the whole limit. When the
//!   database is down for everyone (the usual outage) nobody can raise, so the shares
//!   in force still sum to at most one. A member cut off alone keeps its fallback
//!   while the others divide the whole limit among them: during such a split the
//!   account may see up to one member's part too many, and the provider's 429s (which
//!   pause that member) are the backstop.
//! - A 429 one member receives pauses the provider for every member: its
//!   `retry-after` is written with the heartbeat and read by the others with theirs.
//!
//! `ticketflow process` runs alone and has no members: its limiters keep the whole
//! account.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::limits::ProviderLimits;
use super::Providers;
use crate::ledger::LedgerError;

/// The clock of the division.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How often members heartbeat.
    pub heartbeat: Duration,
    /// A member not seen for this long is left out of the division.
    pub live_for: Duration,
    /// How long a raise waits, so that every other member has lowered first.
    pub raise_after: Duration,
}

impl Timing {
    /// Heartbeats every `heartbeat`; a member is counted for three of them and a
    /// raise waits two (every other member heartbeats within one).
    pub fn every(heartbeat: Duration) -> Self {
        Timing { heartbeat, live_for: heartbeat * 3, raise_after: heartbeat * 2 }
    }
}
/// Shares are multiples of this (rounded down), so that members never hold a sliver
/// above what the division gave them.
const STEP: f64 = 0.001;
/// What is left of a member's reported demand one heartbeat later when it asks for
/// less: a member that stops asking gives its share up over a few heartbeats.
const DEMAND_DECAY: f64 = 0.7;
/// Smallest raise worth a new limiter (each change costs one interval); a raise from
/// nothing and every lowering are always made.
const MIN_RAISE: f64 = 0.01;

/// What a member says about one provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub provider: String,
    /// Requests per second it would make: recent rate plus backlog.
    pub demand: f64,
    /// The most it may enforce until its next heartbeat: its share in force, or the
    /// raise it is waiting to make if higher. The others never raise into it.
    pub claim: f64,
}

/// A live member's row.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub member: String,
    pub demand: f64,
    pub claim: f64,
}

/// The live members' rows and the pauses in force, as of one heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// provider -> the rows of the members seen within `live_for`.
    pub members: BTreeMap<String, Vec<Seen>>,
    /// provider -> how long its pause still lasts.
    pub pauses: BTreeMap<String, Duration>,
}

/// Where members meet: the PostgreSQL ledger (`ledger::postgres`), or a test double.
#[async_trait]
pub trait Meeting: Send + Sync {
    /// Records `member`'s reports and the pauses it wants shared (provider, how long
    /// from now); returns the rows of every member seen within `live_for`, itself
    /// included, and the pauses in force.
    async fn heartbeat(
        &self,
        member: &str,
        reports: &[Report],
        pauses: &[(String, Duration)],
        live_for: Duration,
    ) -> Result<Snapshot, LedgerError>;

    /// Removes `member`'s rows: a member that stops cleanly hands its share back at once.
    async fn leave(&self, member: &str) -> Result<(), LedgerError>;
}

/// The division of one provider's limits among members with these demands (in any
/// unit, the same for all): max-min fair, so no member gets more than it asks while
/// another gets less than an equal part, and what is left when all are served is
/// spread evenly (a member that starts asking has a part at once). The shares sum to
/// one; no members, no shares.
pub fn divide(limit: f64, demands: &[f64]) -> Vec<f64> {
    let n = demands.len();
    if n == 0 {
        return Vec::new();
    }
    let limit = limit.max(f64::MIN_POSITIVE);
    let wants: Vec<f64> = demands.iter().map(|d| (d.max(0.0) / limit).min(1.0)).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|a, b| wants[*a].total_cmp(&wants[*b]));
    let mut shares = vec![0.0; n];
    let mut left = 1.0f64;
    for (k, &i) in order.iter().enumerate() {
        let fair = left / (n - k) as f64;
        shares[i] = wants[i].min(fair);
        left -= shares[i];
    }
    if left > 0.0 {
        for s in &mut shares {
            *s += left / n as f64;
        }
    }
    shares
}

/// One provider as this member sees it.
struct Seat {
    name: String,
    limits: Arc<ProviderLimits>,
    /// Requests per second the account allows (the configured limit, less headroom).
    limit: f64,
    asked_before: u64,
    /// A raise not yet in force: the lowest target seen since, and since when.
    raise: Option<(f64, Instant)>,
    /// What this member claimed in its latest report.
    claimed: f64,
    /// Members (this one included) in the latest division heard.
    known: usize,
    /// The demand of the latest report the others heard, and of the report in flight.
    heard_demand: f64,
    sent_demand: f64,
}

impl Seat {
    /// The most this member may enforce until its next heartbeat: its share in force,
    /// or the raise it is waiting to make if higher.
    fn claim_now(&self) -> f64 {
        let pending = self.raise.map_or(0.0, |(lowest, _)| lowest);
        self.limits.share().max(pending)
    }

    /// What the others hear: the demand and claim last settled.
    fn report(&self) -> Report {
        Report { provider: self.name.clone(), demand: self.sent_demand, claim: self.claimed }
    }
}

/// This process as a member of its account's division.
pub struct Member {
    id: String,
    timing: Timing,
    meeting: Arc<dyn Meeting>,
    seats: Vec<Seat>,
    last_heard: Option<Instant>,
}

impl Member {
    /// A member for every rate-limited provider of `providers`; each starts with no
    /// share until the first heartbeat has told the others it is here.
    pub fn new(id: &str, timing: Timing, meeting: Arc<dyn Meeting>, providers: &Providers) -> Self {
        let seats = providers
            .by_name
            .iter()
            .filter_map(|(name, handle)| {
                let limits = handle.limits.clone()?;
                limits.set_share(0.0);
                Some(Seat {
                    name: name.clone(),
                    limit: limits.requests_per_second_configured(),
                    asked_before: limits.requested().0,
                    limits,
                    raise: None,
                    claimed: 0.0,
                    known: 1,
                    heard_demand: 0.0,
                    sent_demand: 0.0,
                })
            })
            .collect();
        Member { id: id.to_owned(), timing, meeting, seats, last_heard: None }
    }

    /// Heartbeats until `stop`, then leaves.
    pub async fn run(mut self, stop: CancellationToken) {
        if self.seats.is_empty() {
            return;
        }
        let mut tick = tokio::time::interval(self.timing.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last = Instant::now();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let elapsed = last.elapsed().max(Duration::from_millis(100));
            last = Instant::now();
            self.beat(elapsed).await;
        }
        if let Err(e) = self.meeting.leave(&self.id).await {
            tracing::debug!(error = %e, live_for = ?self.timing.live_for, "could not leave the account division; the others drop this member when it is no longer seen");
        }
    }

    /// One heartbeat: report, read, and apply the division.
    pub async fn beat(&mut self, elapsed: Duration) {
        let mut reports = Vec::with_capacity(self.seats.len());
        let mut pauses = Vec::new();
        for seat in &mut self.seats {
            let asked = seat.limits.requested().0;
            let rate = asked.saturating_sub(seat.asked_before) as f64 / elapsed.as_secs_f64();
            seat.asked_before = asked;
            let backlog = seat.limits.waiting() as f64 / self.timing.heartbeat.as_secs_f64();
            // Demand falls gradually, per heartbeat heard: a member whose work stalled
            // (its database cut off, say) keeps its part for the tickets it still
            // holds, instead of losing it the moment it is heard again and then
            // queueing those tickets behind a share too small for them.
            seat.sent_demand = (rate + backlog).max(seat.heard_demand * DEMAND_DECAY);
            seat.claimed = seat.claim_now();
            reports.push(seat.report());
            if let Some(until) = seat.limits.take_pause_to_share() {
                pauses.push((seat.name.clone(), until));
            }
        }
        let shared: Vec<(String, Duration)> =
            pauses.iter().map(|(p, until)| (p.clone(), until.saturating_duration_since(Instant::now()))).collect();
        let t = self.timing;
        let heard =
            tokio::time::timeout(t.heartbeat, self.meeting.heartbeat(&self.id, &reports, &shared, t.live_for)).await;
        let error = match heard {
            Ok(Ok(snapshot)) => {
                self.last_heard = Some(Instant::now());
                if self.apply(&snapshot) {
                    self.tell_lowered().await;
                }
                return;
            }
            Ok(Err(e)) => e.to_string(),
            Err(_) => "no answer within a heartbeat".to_owned(),
        };
        // The pauses go out with the next heartbeat that is heard.
        for (provider, until) in pauses {
            if let Some(seat) = self.seats.iter().find(|s| s.name == provider) {
                seat.limits.share_pause_again(until);
            }
        }
        self.unheard(&error);
    }

    /// Applies the division; says whether a share was lowered.
    fn apply(&mut self, snapshot: &Snapshot) -> bool {
        let now = Instant::now();
        let mut lowered = false;
        for seat in &mut self.seats {
            seat.heard_demand = seat.sent_demand;
            if let Some(pause) = snapshot.pauses.get(&seat.name) {
                seat.limits.pause_until(now + *pause);
            }
            let members = snapshot.members.get(&seat.name).map(Vec::as_slice).unwrap_or(&[]);
            seat.known = members.len().max(1);
            let demands: Vec<f64> = members.iter().map(|m| m.demand).collect();
            let shares = divide(seat.limit, &demands);
            let target = members.iter().zip(&shares).find(|(m, _)| m.member == self.id).map_or(0.0, |(_, s)| *s);
            let target = (target / STEP).floor() * STEP;
            let current = seat.limits.share();
            if target <= current {
                seat.raise = None;
                if target < current {
                    seat.limits.set_share(target);
                    lowered = true;
                }
                continue;
            }
            let (lowest, since) = match seat.raise {
                Some((lowest, since)) => (lowest.min(target), since),
                None => (target, now),
            };
            // A member with no share (new, restarted, idle until now) takes what the
            // others' claims leave as soon as it has claimed it: a fresh replica is at
            // work after one heartbeat more, not three. Other raises wait, so that
            // shares do not swing with every change of demand.
            if now.duration_since(since) < self.timing.raise_after && current > 0.0 {
                seat.raise = Some((lowest, since));
                continue;
            }
            // Never into what the others claim, never above this member's own claim.
            let others: f64 = members.iter().filter(|m| m.member != self.id).map(|m| m.claim).sum();
            let room = ((1.0 - others).max(0.0) / STEP).floor() * STEP;
            let to = lowest.min(room).min(seat.claimed);
            if to > current && (to - current >= MIN_RAISE || current == 0.0) {
                seat.limits.set_share(to);
            }
            // Not all of it yet: claim the rest with the next report.
            seat.raise = (to < lowest).then_some((lowest, since));
        }
        lowered
    }

    /// A lowered share is claimed at once, not a heartbeat later: the member that
    /// waits for the room (a new replica, one whose demand grew) raises into it on
    /// its next heartbeat. Claims only fall here, so the others' raises stay safe
    /// whether or not this write arrives.
    async fn tell_lowered(&mut self) {
        let mut reports = Vec::with_capacity(self.seats.len());
        for seat in &mut self.seats {
            seat.claimed = seat.claimed.min(seat.claim_now());
            reports.push(seat.report());
        }
        let t = self.timing;
        let told = tokio::time::timeout(t.heartbeat, self.meeting.heartbeat(&self.id, &reports, &[], t.live_for)).await;
        if !matches!(told, Ok(Ok(_))) {
            tracing::debug!("could not claim a lowered share at once; the next heartbeat does");
        }
    }

    /// The meeting could not be reached: keep the share while the others still
    /// count this member, then decay toward the safe share, the limit divided by
    /// the members last known (never up: a raise needs the others' claims).
    fn unheard(&mut self, error: &str) {
        let counted = self.last_heard.is_some_and(|t| t.elapsed() + self.timing.heartbeat < self.timing.live_for);
        tracing::warn!(%error, keeping_shares = counted, "account division unreachable");
        for seat in &mut self.seats {
            seat.raise = None;
            if !counted {
                let current = seat.limits.share();
                // Never the whole limit: a member that knew only itself may have missed
                // one that joined since.
                let safe = 1.0 / seat.known.max(2) as f64;
                if current > safe {
                    let next = safe + (current - safe) / 2.0;
                    // Down to the step, and to the safe share once within one step of it.
                    let next = if next - safe < STEP { safe } else { next };
                    seat.limits.set_share((next / STEP).floor() * STEP);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
