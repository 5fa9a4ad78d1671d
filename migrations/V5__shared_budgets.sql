-- Daily budget caps shared by the worker replicas. Each replica (a member) leases
-- parts of a tier's cap for a day and reserves each ticket's most expensive reply
-- against its lease; the leases of one tier and day never sum above the cap but for
-- the one request that found less left than it needed (one ticket over, at most).
CREATE TABLE budget_leases (
    tier         text NOT NULL,
    -- The calendar day in limits.budget_time_zone.
    day          date NOT NULL,
    member       text NOT NULL,
    -- The cap the member counted against (its configuration's daily_usd).
    cap_usd      double precision NOT NULL,
    -- The part of the cap this member holds: spent, reserved or not yet used.
    granted_usd  double precision NOT NULL DEFAULT 0,
    -- What the member reported spent and held reserved by tickets in flight.
    spent_usd    double precision NOT NULL DEFAULT 0,
    reserved_usd double precision NOT NULL DEFAULT 0,
    seen_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (day, tier, member)
);
