-- Cheaper writes per unit of work (BENCHMARKS.md, "PostgreSQL ledger").

-- 1. The output of a finished unit lives in its decision row, written once, instead
--    of in `units`: updating a unit's row with a 2 KB output, then clearing it at the
--    publish mark, left a large dead row version per unit, which bloated `units`,
--    evicted it from shared buffers and slowed every later claim. Unit rows now stay
--    small, so their updates are heap-only. The decision row also keeps the exact
--    output published, for audit.
ALTER TABLE decisions ADD COLUMN output text;
UPDATE decisions d SET output = u.pending_output
FROM units u
WHERE u.unit_id = d.unit_id AND u.pending_output IS NOT NULL
  AND d.id = (SELECT max(id) FROM decisions WHERE unit_id = u.unit_id);
ALTER TABLE units DROP COLUMN pending_output;
ALTER TABLE units SET (fillfactor = 50);
COMMENT ON COLUMN decisions.worker_id IS
    'The claim that decided: worker id and delivery attempt (worker#n).';
COMMENT ON COLUMN decisions.output IS
    'The output (reply or dead letter with its cost records) exactly as published. Text, not jsonb: the ticket metadata must be echoed as the exact text received.';

-- 2. The report filters cost records, decisions and dead letters by time. Those rows
--    are appended in roughly time order, so a BRIN index (a few pages for millions of
--    rows) serves the same range scans as a B-tree at a fraction of the write cost.
DROP INDEX cost_records_at;
CREATE INDEX cost_records_at ON cost_records USING brin (at);
DROP INDEX decisions_decided_at;
CREATE INDEX decisions_decided_at ON decisions USING brin (decided_at);
DROP INDEX dead_letters_failed_at;
CREATE INDEX dead_letters_failed_at ON dead_letters USING brin (failed_at);

-- 3. Outputs above the TOAST threshold (long replies) are compressed; lz4 costs a
--    fraction of the default pglz's CPU. A server built without lz4 keeps pglz.
DO $$
BEGIN
    ALTER TABLE decisions ALTER COLUMN output SET COMPRESSION lz4;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'lz4 is not available; outputs stay compressed with pglz';
END
$$;
