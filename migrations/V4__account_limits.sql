-- Account-wide rate limits: every worker process (a member) heartbeats, per provider,
-- the demand it sees and the share of the account's limits it uses. Each member
-- reads the live rows and computes the same division of the limits; rows of members
-- that stopped heartbeating are ignored, then deleted.
CREATE TABLE limit_members (
    member   text NOT NULL,
    provider text NOT NULL,
    -- Requests per second this member would make: its recent rate plus its backlog.
    demand   double precision NOT NULL,
    -- The most of the provider's limits (0..1) this member may enforce until its next
    -- heartbeat: its share in force, or a raise it is about to make. The others never
    -- raise into it.
    share    double precision NOT NULL,
    seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (member, provider)
);

-- A provider's 429 pauses the account: the retry-after one member saw, for all.
CREATE TABLE limit_pauses (
    provider text PRIMARY KEY,
    until    timestamptz NOT NULL
);
