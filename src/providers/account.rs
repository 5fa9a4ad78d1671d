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
//! - A member lowers its share at once and raises it only after two heartbeats: by
//!   then every other member has seen the same rows and lowered its own, so the sum
//!   of the shares in force never exceeds the limit while they move.
//! - A member that stops heartbeating (killed, cut off) is dropped from the division
//!   after three heartbeats, and its share goes to the others two heartbeats later. A
//!   member that cannot reach the database keeps its share only as long as the
//!   others still count it (three heartbeats less one), then
//!   drops to nothing: never more than the division gave it, never the whole limit.
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
/// Smallest change of share worth a new limiter (each change costs one interval).
const MIN_CHANGE: f64 = 0.01;

/// What a member says about one provider.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    pub provider: String,
    /// Requests per second it would make: recent rate plus backlog.
    pub demand: f64,
    /// The share it enforces now.
    pub share: f64,
}

/// The live members' rows and the pauses in force, as of one heartbeat.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// provider -> (member, demand), for members seen within [`LIVE_FOR`].
    pub demands: BTreeMap<String, Vec<(String, f64)>>,
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
            reports.push(Report { provider: seat.name.clone(), demand: rate + backlog, share: seat.limits.share() });
            if let Some(until) = seat.limits.take_pause_to_share() {
                pauses.push((seat.name.clone(), until.saturating_duration_since(Instant::now())));
            }
        }
        let t = self.timing;
        let heard =
            tokio::time::timeout(t.heartbeat, self.meeting.heartbeat(&self.id, &reports, &pauses, t.live_for)).await;
        match heard {
            Ok(Ok(snapshot)) => {
                self.last_heard = Some(Instant::now());
                self.apply(&snapshot);
            }
            Ok(Err(e)) => self.unheard(&e.to_string()),
            Err(_) => self.unheard("no answer within a heartbeat"),
        }
    }

    fn apply(&mut self, snapshot: &Snapshot) {
        let now = Instant::now();
        for seat in &mut self.seats {
            if let Some(pause) = snapshot.pauses.get(&seat.name) {
                seat.limits.pause_until(now + *pause);
            }
            let members = snapshot.demands.get(&seat.name).map(Vec::as_slice).unwrap_or(&[]);
            let demands: Vec<f64> = members.iter().map(|(_, d)| *d).collect();
            let shares = divide(seat.limit, &demands);
            let target = members.iter().zip(&shares).find(|((m, _), _)| *m == self.id).map_or(0.0, |(_, s)| *s);
            let current = seat.limits.share();
            if target <= current {
                seat.raise = None;
                if current - target >= MIN_CHANGE || target == 0.0 {
                    seat.limits.set_share(target);
                }
                continue;
            }
            let (lowest, since) = match seat.raise {
                Some((lowest, since)) => (lowest.min(target), since),
                None => (target, now),
            };
            if now.duration_since(since) >= self.timing.raise_after {
                if lowest - current >= MIN_CHANGE {
                    seat.limits.set_share(lowest);
                }
                seat.raise = None;
            } else {
                seat.raise = Some((lowest, since));
            }
        }
    }

    /// The meeting could not be reached: keep the share while the others still
    /// count this member, then give it up (they will have divided it among them).
    fn unheard(&mut self, error: &str) {
        let counted = self.last_heard.is_some_and(|t| t.elapsed() + self.timing.heartbeat < self.timing.live_for);
        tracing::warn!(%error, keeping_shares = counted, "account division unreachable");
        for seat in &mut self.seats {
            seat.raise = None;
            if !counted {
                seat.limits.set_share(0.0);
            }
        }
    }
}

#[cfg(test)]
mod tests;
