-- The all-premium baseline is what the same tickets would have cost before the
-- migration: one premium reply call per answered unit, with no triage and no
-- moderation. Only a unit's answering call (stage `reply`, outcome `ok`) keeps a
-- baseline price; every other call's is 0 (they were priced at premium rates too,
-- which about doubled the baseline and inflated the savings).
UPDATE cost_records SET baseline_cost_usd = 0 WHERE NOT (stage = 'reply' AND outcome = 'ok');
COMMENT ON COLUMN cost_records.baseline_cost_usd IS
    'For the call that answered its unit (stage reply, outcome ok): its tokens priced on pricing.baseline_model; 0 for every other call.';
