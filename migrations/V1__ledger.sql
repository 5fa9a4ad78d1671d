-- The ticketflow ledger: units of work, what they cost, how they were routed, and
-- what became of them. Applied by `ticketflow migrate` (refinery keeps its history in
-- refinery_schema_history).

-- One row per unit of work (ticket_id plus a fingerprint of its messages).
CREATE TABLE units (
    unit_id          text PRIMARY KEY,
    ticket_id        text NOT NULL,
    -- in_progress | answered | needs_human | dead_letter
    status           text NOT NULL,
    -- Worker holding the lease while in_progress; another may take over once it expires.
    owner            text,
    lease_until      timestamptz,
    attempts         integer NOT NULL DEFAULT 0,
    replay_count     integer NOT NULL DEFAULT 0,
    -- Sum of every priced call for this unit, across retries, redeliveries and replays.
    cost_usd         double precision NOT NULL DEFAULT 0,
    -- The output (reply or dead letter with its cost records) until its publication is
    -- confirmed, so that a redelivery republishes it instead of calling providers again.
    -- Text, not jsonb: jsonb would reorder keys and reformat numbers, and the ticket's
    -- metadata must be echoed as the exact text received.
    pending_output   text,
    published        boolean NOT NULL DEFAULT false,
    tier             text,
    provider         text,
    model            text,
    category         text,
    language         text,
    latency_ms       bigint,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz
-- Each unit's row is updated twice after its insert (finished, then published). Free
-- space on every page and no index on the updated columns let those updates stay
-- heap-only (HOT), so the table and its primary key do not bloat under load.
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.02);
CREATE INDEX units_ticket_id ON units (ticket_id);

-- One row per provider call that reached a provider (the cost records of SPEC §3.3).
CREATE TABLE cost_records (
    call_id             uuid PRIMARY KEY,
    unit_id             text NOT NULL,
    ticket_id           text NOT NULL,
    stage               text NOT NULL,
    provider            text NOT NULL,
    model               text NOT NULL,
    input_tokens        bigint NOT NULL,
    cached_input_tokens bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    cost_usd            double precision NOT NULL,
    -- The same tokens priced at pricing.baseline_model: the all-premium counterfactual.
    baseline_cost_usd   double precision NOT NULL,
    pricing_version     text NOT NULL,
    outcome             text NOT NULL,
    latency_ms          bigint NOT NULL,
    estimated           boolean NOT NULL,
    at                  timestamptz NOT NULL
);
CREATE INDEX cost_records_at ON cost_records (at);
CREATE INDEX cost_records_unit_id ON cost_records (unit_id);

-- Routing and moderation-bypass decisions, for audit: one row per finished attempt.
CREATE TABLE decisions (
    id          bigserial PRIMARY KEY,
    unit_id     text NOT NULL,
    ticket_id   text NOT NULL,
    status      text NOT NULL,
    tier        text,
    reasons     text[] NOT NULL,
    triage      jsonb,
    moderation  jsonb,
    worker_id   text NOT NULL,
    decided_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX decisions_unit_id ON decisions (unit_id);
CREATE INDEX decisions_decided_at ON decisions (decided_at);

-- Every dead letter, whether or not it belongs to a unit (unparseable input has none).
CREATE TABLE dead_letters (
    id            bigserial PRIMARY KEY,
    unit_id       text,
    ticket_id     text,
    kind          text NOT NULL,
    message       text NOT NULL,
    attempts      integer NOT NULL,
    replay_count  integer NOT NULL,
    source        jsonb NOT NULL,
    payload       text NOT NULL,
    payload_encoding text NOT NULL,
    worker_id     text NOT NULL,
    failed_at     timestamptz NOT NULL
);
CREATE INDEX dead_letters_failed_at ON dead_letters (failed_at);
CREATE INDEX dead_letters_kind ON dead_letters (kind);

-- Replay history of `ticketflow replay`.
CREATE TABLE replays (
    id            bigserial PRIMARY KEY,
    dead_letter_id bigint,
    unit_id       text,
    ticket_id     text,
    replay_count  integer NOT NULL,
    replayed_at   timestamptz NOT NULL DEFAULT now()
);
