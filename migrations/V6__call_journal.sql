-- The journal of paid calls (SPEC §3.3, §6): every provider call of a unit that is not
-- finished yet. A call's intent is written before it is sent (its cost record as it
-- would stand if the answer never came back: outcome `lost`, priced at the estimate);
-- its end replaces that with the real record and the model's answer. A unit taken
-- over, retried or handed back resumes from here: finished calls are reused, never
-- paid again, and calls cut off in flight are published as `lost`. Finishing the unit
-- moves its calls into cost_records (with its output) and deletes them here, so this
-- table holds only the calls of units in progress and stays small; a dead-lettered
-- unit's calls stay, settled (recorded and published with the dead letter), so that
-- its replay reuses their answers instead of paying for them again.
CREATE TABLE calls (
    call_id  uuid PRIMARY KEY,
    unit_id  text NOT NULL,
    -- The claim (worker#n) that sent it; intents are fenced by the unit's ownership.
    owner    text NOT NULL,
    -- false while in flight: `record` is then the lost estimate.
    done     boolean NOT NULL DEFAULT false,
    -- The cost record (SPEC §3.3) as JSON text.
    record   text NOT NULL,
    -- The model's answer of an `ok` call, for resuming without calling again.
    answer   text,
    -- Recorded in cost_records with the unit's dead letter: reused, never published again.
    settled  boolean NOT NULL DEFAULT false,
    sent_at  timestamptz NOT NULL DEFAULT clock_timestamp()
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.05);
CREATE INDEX calls_unit_id ON calls (unit_id);

-- Inputs that never became a ticket, once each (SPEC §6: a rejected input redelivered
-- after a lost ack yields no second dead letter). The key is derived from the input's
-- bytes (and replay count): a copy that comes back finds its dead letter published,
-- and is acked with no new output; one whose publish was never confirmed (and whose
-- worker is gone) is published again.
CREATE TABLE rejected_inputs (
    key         text PRIMARY KEY,
    owner       text,
    lease_until timestamptz,
    published   boolean NOT NULL DEFAULT false,
    first_at    timestamptz NOT NULL DEFAULT now()
);
