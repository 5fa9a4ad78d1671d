//! Daily spend caps per tier, with reservations. When a tier's cap for the current
//! day is spent, tickets routed to it degrade to the configured fallback (another
//! tier or a human) and the route's reasons say so.
//!
//! - Before the reply calls of a ticket routed to a capped tier, the pipeline
//!   reserves an upper bound of what the ticket will cost ([`Budgets::reserve`]);
//!   after them it settles the reservation to what the calls really cost
//!   ([`Budgets::settle`]). Tickets in flight therefore count against the cap before
//!   they are paid.
//! - Reservations draw on a lease: the part of the day's cap this process holds. A
//!   lease is taken from a [`Bank`] in chunks, so most reservations need no round
//!   trip. The bank of `ticketflow process` is in memory ([`LocalBank`]); the
//!   workers' is the ledger's database (`ledger::meeting::PgBank`), so that every
//!   replica draws on the same cap.
//! - A bank grants leases up to the cap, and once, to the request that finds less
//!   left than it needs, the whole of it: the cap is exceeded by at most one ticket's
//!   reservation, whatever the number of replicas and tickets in flight.
//! - Leases a process does not use go back to the bank with the next sync
//!   ([`Budgets::sync`]), and all of them when it stops ([`Budgets::leave`]). A
//!   process killed outright strands its unused lease until the day ends.
//! - The day is the calendar day in `limits.budget_time_zone` (UTC by default).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use async_trait::async_trait;
use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;

use crate::ledger::LedgerError;
pub use crate::settings::BudgetSettings;

/// A new lease covers this many reservations like the one that asked for it, when
/// the cap leaves room: fewer round trips to the bank, little held idle.
const CHUNK_RESERVATIONS: f64 = 4.0;

/// Where processes lease their parts of the daily caps.
#[async_trait]
pub trait Bank: Send + Sync {
    /// Grants `member` more of `tier`'s cap for `day`: up to `want` (at least `need`
    /// when possible) out of what the members' leases leave of `cap`; or, the one
    /// time the cap leaves less than `need` but more than nothing, exactly `need`.
    /// Returns the amount granted (zero once the cap is leased out).
    async fn lease(
        &self,
        member: &str,
        tier: &str,
        day: NaiveDate,
        cap: f64,
        need: f64,
        want: f64,
    ) -> Result<f64, LedgerError>;

    /// Records `member`'s use of its lease on `tier` for `day`: what it has spent and
    /// holds reserved, and the lease it keeps (`keep`, at least spent + reserved).
    async fn report(&self, member: &str, tier: &str, day: NaiveDate, use_: Use) -> Result<(), LedgerError>;
}

/// One member's use of its lease.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Use {
    pub spent: f64,
    pub reserved: f64,
    pub keep: f64,
}

/// A bank in memory: one process's caps (`ticketflow process`, tests).
#[derive(Debug, Default)]
pub struct LocalBank {
    leased: Mutex<BTreeMap<(String, NaiveDate), BTreeMap<String, f64>>>,
}

impl LocalBank {
    fn leases(&self) -> MutexGuard<'_, BTreeMap<(String, NaiveDate), BTreeMap<String, f64>>> {
        self.leased.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What a bank grants when `leased` of `cap` is out: the rule every bank follows.
/// `want`, but at most half of what is left and at least `need`; nothing once the
/// cap is leased out; and `need` to the one request that finds less than it.
pub fn grant(cap: f64, leased: f64, need: f64, want: f64) -> f64 {
    let left = cap - leased;
    if left <= 0.0 || need <= 0.0 {
        0.0
    } else if left < need {
        need
    } else {
        // At most half of what is left (and at least `need`), so that the other
        // members find their part too.
        want.min(left / 2.0).max(need).min(left)
    }
}

#[async_trait]
impl Bank for LocalBank {
    async fn lease(
        &self,
        member: &str,
        tier: &str,
        day: NaiveDate,
        cap: f64,
        need: f64,
        want: f64,
    ) -> Result<f64, LedgerError> {
        let mut all = self.leases();
        let leases = all.entry((tier.to_owned(), day)).or_default();
        let granted = grant(cap, leases.values().sum(), need, want);
        *leases.entry(member.to_owned()).or_default() += granted;
        Ok(granted)
    }

    async fn report(&self, member: &str, tier: &str, day: NaiveDate, use_: Use) -> Result<(), LedgerError> {
        if let Some(lease) = self.leases().get_mut(&(tier.to_owned(), day)).and_then(|l| l.get_mut(member)) {
            *lease = use_.keep;
        }
        Ok(())
    }
}

/// A routing decision changed by a spent budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Degraded {
    pub target: String,
    pub reason: String,
}

/// A reservation against a tier's cap, to be settled with what the ticket cost
/// ([`Hold::settle`]). Dropped unsettled (the ticket's attempt was cancelled, maybe
/// after calls the provider bills), it counts as spent in full: the cap errs on the
/// side of the account.
#[must_use = "a reservation is settled with what the ticket cost"]
pub struct Hold {
    budgets: Arc<Budgets>,
    tier: String,
    day: NaiveDate,
    usd: f64,
    open: bool,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hold").field("tier", &self.tier).field("day", &self.day).field("usd", &self.usd).finish()
    }
}

impl Hold {
    /// Settles the reservation with what the ticket's calls cost.
    pub fn settle(mut self, cost_usd: f64) {
        self.open = false;
        self.budgets.settle(&self, cost_usd);
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.open {
            tracing::debug!(tier = %self.tier, usd = self.usd, "reservation dropped unsettled; counted as spent");
            self.budgets.settle(self, self.usd);
        }
    }
}

/// One capped tier's day, as this process sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Ledgered {
    /// Leased from the bank for the day (it may hold more than `spent + reserved`).
    leased: f64,
    spent: f64,
    reserved: f64,
    /// Reservations made since the last sync: a member that made none gives its
    /// unused lease back.
    since_sync: u32,
}

#[derive(Debug, Default)]
struct Days {
    day: Option<NaiveDate>,
    tiers: BTreeMap<String, Ledgered>,
}

/// The caps of this process's tiers and its use of them.
pub struct Budgets {
    caps: BTreeMap<String, BudgetSettings>,
    zone: Tz,
    bank: Arc<dyn Bank>,
    member: String,
    days: Mutex<Days>,
    /// One bank conversation at a time, so leases and reports never cross.
    talking: tokio::sync::Mutex<()>,
}

impl Budgets {
    /// Caps kept in this process alone, days in `zone`.
    pub fn new(caps: BTreeMap<String, BudgetSettings>, zone: Tz) -> Self {
        Self::shared(caps, zone, Arc::new(LocalBank::default()), "process")
    }

    /// Caps shared through `bank`, where this process is `member`.
    pub fn shared(caps: BTreeMap<String, BudgetSettings>, zone: Tz, bank: Arc<dyn Bank>, member: &str) -> Self {
        for tier in caps.keys() {
            crate::telemetry::budget_spent(tier, 0.0);
        }
        Budgets {
            caps,
            zone,
            bank,
            member: member.to_owned(),
            days: Mutex::new(Days::default()),
            talking: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether `tier` has a cap.
    pub fn capped(&self, tier: &str) -> bool {
        self.caps.contains_key(tier)
    }

    /// The day now, in the configured time zone.
    pub fn today(&self) -> NaiveDate {
        Utc::now().with_timezone(&self.zone).date_naive()
    }

    fn days(&self) -> MutexGuard<'_, Days> {
        self.days.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This process's figures for today, turning the page when `day` is a later day
    /// (yesterday's reservations settle into nothing). The page never turns back: a
    /// `day` read before midnight by a call that finished after it gets today's
    /// page, and its day.
    fn on(days: &mut Days, day: NaiveDate) -> (NaiveDate, &mut BTreeMap<String, Ledgered>) {
        match days.day {
            Some(page) if page >= day => (page, &mut days.tiers),
            _ => {
                days.day = Some(day);
                days.tiers.clear();
                (day, &mut days.tiers)
            }
        }
    }

    /// Reserves `usd` against `tier`'s cap for today: `Ok(None)` for a tier without a
    /// cap, `Ok(Some(hold))` when the cap has room, or where the ticket goes instead.
    pub async fn reserve(self: &Arc<Self>, tier: &str, usd: f64) -> Result<Option<Hold>, Degraded> {
        let Some(cap) = self.caps.get(tier) else { return Ok(None) };
        let usd = if usd.is_finite() { usd.max(0.0) } else { 0.0 };
        if let Some(hold) = self.take(tier, self.today(), usd) {
            return Ok(Some(hold));
        }
        let _talking = self.talking.lock().await;
        // Another reservation may have leased meanwhile, or the day changed.
        let day = self.today();
        if let Some(hold) = self.take(tier, day, usd) {
            return Ok(Some(hold));
        }
        let (day, need) = {
            let mut days = self.days();
            let (day, tiers) = Self::on(&mut days, day);
            let t = tiers.entry(tier.to_owned()).or_default();
            // What the lease lacks, an overrun of earlier tickets included.
            (day, usd - (t.leased - t.spent - t.reserved))
        };
        let want = usd * CHUNK_RESERVATIONS;
        let unavailable = match self.bank.lease(&self.member, tier, day, cap.daily_usd, need, want).await {
            Ok(granted) => {
                let mut days = self.days();
                match Self::on(&mut days, day) {
                    (page, tiers) if page == day => tiers.entry(tier.to_owned()).or_default().leased += granted,
                    // Leased for a day that has ended: it lapses with it.
                    _ => {}
                }
                false
            }
            Err(e) => {
                tracing::warn!(%tier, error = %e, "could not lease more of the tier's daily budget; the ticket goes where a spent budget sends it");
                true
            }
        };
        self.take(tier, day, usd).map(Some).ok_or_else(|| Degraded {
            target: cap.when_spent.clone(),
            reason: format!("budget:{tier}_{}->{}", if unavailable { "unavailable" } else { "spent" }, cap.when_spent),
        })
    }

    /// A reservation out of the lease held, if it covers `usd`.
    fn take(self: &Arc<Self>, tier: &str, day: NaiveDate, usd: f64) -> Option<Hold> {
        let mut days = self.days();
        let (day, tiers) = Self::on(&mut days, day);
        let t = tiers.entry(tier.to_owned()).or_default();
        // A reservation of nothing (a free model) always fits.
        if usd > 0.0 && t.spent + t.reserved + usd > t.leased * (1.0 + 1e-12) {
            return None;
        }
        t.reserved += usd;
        t.since_sync += 1;
        Some(Hold { budgets: self.clone(), tier: tier.to_owned(), day, usd, open: true })
    }

    /// Ends `hold`'s reservation, adding `cost_usd` to the spend.
    fn settle(&self, hold: &Hold, cost_usd: f64) {
        let cost = if cost_usd.is_finite() { cost_usd.max(0.0) } else { 0.0 };
        let mut days = self.days();
        if days.day != Some(hold.day) {
            // Reserved yesterday: today's figures start from nothing.
            return;
        }
        let t = days.tiers.entry(hold.tier.clone()).or_default();
        t.reserved = (t.reserved - hold.usd).max(0.0);
        if cost > 0.0 {
            t.spent += cost;
            crate::telemetry::budget_spent(&hold.tier, t.spent);
        }
    }

    /// What `tier` has spent today in this process.
    pub fn spent_today(&self, tier: &str) -> f64 {
        let days = self.days();
        match days.day {
            Some(day) if day == self.today() => days.tiers.get(tier).map_or(0.0, |t| t.spent),
            _ => 0.0,
        }
    }

    /// Reports this process's use to the bank; a tier that made no reservation since
    /// the last sync gives its unused lease back.
    pub async fn sync(&self) -> Result<(), LedgerError> {
        self.report(false).await
    }

    /// Gives every unused lease back (the process stops).
    pub async fn leave(&self) -> Result<(), LedgerError> {
        self.report(true).await
    }

    async fn report(&self, all: bool) -> Result<(), LedgerError> {
        let _talking = self.talking.lock().await;
        let (day, uses): (NaiveDate, Vec<(String, Use)>) = {
            let mut days = self.days();
            let (day, tiers) = Self::on(&mut days, self.today());
            let uses = tiers
                .iter_mut()
                .map(|(tier, t)| {
                    if all || t.since_sync == 0 {
                        t.leased = t.leased.min(t.spent + t.reserved);
                    }
                    // Tickets that cost more than they reserved: the lease grows to
                    // cover them, so the bank counts every dollar spent.
                    t.leased = t.leased.max(t.spent + t.reserved);
                    t.since_sync = 0;
                    (tier.clone(), Use { spent: t.spent, reserved: t.reserved, keep: t.leased })
                })
                .collect();
            (day, uses)
        };
        for (tier, use_) in uses {
            self.bank.report(&self.member, &tier, day, use_).await?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caps(usd: f64) -> BTreeMap<String, BudgetSettings> {
        BTreeMap::from([("premium".to_string(), BudgetSettings { daily_usd: usd, when_spent: "cheap".into() })])
    }

    #[tokio::test]
    async fn degrades_once_the_cap_is_reserved_and_settles_to_the_real_cost() {
        let b = Arc::new(Budgets::new(caps(1.0), Tz::UTC));
        assert!(b.reserve("cheap", 100.0).await.unwrap().is_none(), "tiers without a cap are never held");
        // A lease of half the cap (four such reservations would be 0.8).
        let first = b.reserve("premium", 0.2).await.unwrap().unwrap();
        let second = b.reserve("premium", 0.5).await.unwrap().unwrap();
        // 0.7 reserved, 0.05 of a 0.75 lease and 0.25 of the cap left: this one is the
        // one reservation allowed over the cap.
        let third = b.reserve("premium", 0.5).await.unwrap().unwrap();
        let d = b.reserve("premium", 0.01).await.unwrap_err();
        assert_eq!(d.target, "cheap");
        assert_eq!(d.reason, "budget:premium_spent->cheap");
        // Settled below the estimates: the room comes back.
        first.settle(0.1);
        second.settle(0.2);
        third.settle(0.2);
        assert!((b.spent_today("premium") - 0.5).abs() < 1e-12);
        let fourth = b.reserve("premium", 0.6).await.unwrap().unwrap();
        fourth.settle(0.6);
        assert!((b.spent_today("premium") - 1.1).abs() < 1e-12);
        // 1.2 leased (the cap and the one reservation over it), 1.1 spent.
        let last = b.reserve("premium", 0.1).await.unwrap().unwrap();
        assert!(b.reserve("premium", 0.01).await.is_err(), "the cap crossed once is not crossed again");
        last.settle(0.1);
    }

    #[tokio::test]
    async fn replicas_sharing_a_bank_never_lease_more_than_the_cap_and_one_reservation() {
        const CAP: f64 = 0.05;
        const MOST: f64 = 0.008;
        let bank = Arc::new(LocalBank::default());
        let replicas: Vec<Arc<Budgets>> =
            (0..3).map(|i| Arc::new(Budgets::shared(caps(CAP), Tz::UTC, bank.clone(), &format!("r{i}")))).collect();
        // Four tickets in flight on every replica at any time, each reserving 0.008
        // and costing between 0.001 and 0.008; one lane of each replica syncs.
        let mut lanes = Vec::new();
        for (i, b) in replicas.iter().enumerate() {
            for lane in 0..4 {
                let b = b.clone();
                lanes.push(tokio::spawn(async move {
                    let (mut spent, mut degraded) = (0.0, 0);
                    for k in 0..20 {
                        match b.reserve("premium", MOST).await {
                            Ok(Some(hold)) => {
                                tokio::task::yield_now().await;
                                let cost = 0.001 + 0.007 * (((i * 80 + lane * 20 + k) * 37 % 100) as f64 / 100.0);
                                hold.settle(cost);
                                spent += cost;
                            }
                            Ok(None) => panic!("premium is capped"),
                            Err(_) => degraded += 1,
                        }
                        if lane == 0 && k % 5 == 0 {
                            b.sync().await.unwrap();
                        }
                    }
                    (spent, degraded)
                }));
            }
        }
        let (mut spent, mut degraded) = (0.0, 0);
        for lane in lanes {
            let (s, d) = lane.await.unwrap();
            spent += s;
            degraded += d;
        }
        let leased: f64 = bank.leases().values().flat_map(|l| l.values()).sum();
        assert!(spent <= CAP + MOST + 1e-12, "spent {spent}");
        assert!(leased <= CAP + MOST + 1e-12, "leased {leased}");
        assert!(degraded > 0 && spent > CAP / 2.0, "spent {spent}, {degraded} degraded");
        let local: f64 = replicas.iter().map(|b| b.spent_today("premium")).sum();
        assert!((local - spent).abs() < 1e-9);
    }

    #[tokio::test]
    async fn an_idle_replica_gives_its_unused_lease_back() {
        let bank = Arc::new(LocalBank::default());
        let a = Arc::new(Budgets::shared(caps(0.05), Tz::UTC, bank.clone(), "a"));
        let lease = || bank.leases().values().next().and_then(|l| l.get("a").copied()).unwrap();
        let hold = a.reserve("premium", 0.01).await.unwrap().unwrap();
        hold.settle(0.004);
        assert!((lease() - 0.025).abs() < 1e-12, "a chunk: half of the cap");
        a.sync().await.unwrap();
        assert!((lease() - 0.025).abs() < 1e-12, "reserved since the last sync: kept");
        a.sync().await.unwrap();
        assert!((lease() - 0.004).abs() < 1e-12, "idle since: all but the spend goes back");
        let hold = a.reserve("premium", 0.01).await.unwrap().unwrap();
        a.leave().await.unwrap();
        assert!((lease() - 0.014).abs() < 1e-12, "leaving keeps what is spent or reserved");
        hold.settle(0.01);
    }

    #[tokio::test]
    async fn a_reservation_dropped_unsettled_counts_in_full_and_an_overrun_is_reported() {
        let bank = Arc::new(LocalBank::default());
        let b = Arc::new(Budgets::shared(caps(1.0), Tz::UTC, bank.clone(), "a"));
        let lease = || bank.leases().values().next().and_then(|l| l.get("a").copied()).unwrap();
        let hold = b.reserve("premium", 0.2).await.unwrap().unwrap();
        drop(hold); // the ticket's attempt was cancelled, perhaps after billed calls
        assert!((b.spent_today("premium") - 0.2).abs() < 1e-12);
        // A ticket that cost more than it reserved (a refusal, then the bypass).
        let hold = b.reserve("premium", 0.2).await.unwrap().unwrap();
        hold.settle(0.5);
        b.sync().await.unwrap();
        assert!((lease() - 0.7).abs() < 1e-12, "the bank counts the overrun: {}", lease());
        // The next reservation asks for what the lease lacks, the overrun included.
        let hold = b.reserve("premium", 0.1).await.unwrap().unwrap();
        hold.settle(0.1);
        assert!((b.spent_today("premium") - 0.8).abs() < 1e-12);
    }

    #[tokio::test]
    async fn the_page_turns_forward_only() {
        let b = Arc::new(Budgets::new(caps(1.0), Tz::UTC));
        let today = b.today();
        let tomorrow = today.succ_opt().unwrap();
        let after_midnight = b.take("premium", tomorrow, 0.0).unwrap();
        // A reservation that read the day just before midnight gets the new page.
        let late = b.take("premium", today, 0.0).unwrap();
        assert_eq!((after_midnight.day, late.day), (tomorrow, tomorrow));
        assert_eq!(b.days().day, Some(tomorrow));
        late.settle(0.0);
        after_midnight.settle(0.0);
    }

    #[test]
    fn the_bank_grants_up_to_the_cap_and_crosses_it_once() {
        assert_eq!(grant(1.0, 0.0, 0.1, 0.4), 0.4);
        assert!((grant(1.0, 0.8, 0.1, 0.4) - 0.1).abs() < 1e-12, "half of what is left, at least the need");
        assert!((grant(1.0, 0.5, 0.1, 0.2) - 0.2).abs() < 1e-12, "what is wanted, within half of the rest");
        assert_eq!(grant(1.0, 0.95, 0.1, 0.4), 0.1, "the one request that finds less than it needs");
        assert_eq!(grant(1.0, 1.05, 0.1, 0.4), 0.0);
        assert_eq!(grant(1.0, 0.5, 0.0, 0.4), 0.0);
    }

    #[test]
    fn the_day_turns_in_the_configured_time_zone() {
        let b = Budgets::new(caps(1.0), "Asia/Bangkok".parse().unwrap());
        let utc = Utc::now().date_naive();
        let bangkok = Utc::now().with_timezone(&chrono_tz::Asia::Bangkok).date_naive();
        assert_eq!(b.today(), bangkok);
        assert!(b.today() == utc || b.today() == utc.succ_opt().unwrap());
    }
}
