-- The read side (DESIGN.md section 12): a stable order for the ledger history, daily roll-ups kept in
-- the same transaction as the rows they summarise, and the record of archived monthly partitions.

-- 1. The history's order. A row's created_at is its settle time in Redis; the row reaches Postgres
-- later (a batch, a Postgres outage, a spool replay), so a cursor "after time T" would skip a row
-- settled before T but written after the page was read. The history therefore pages in the order rows
-- were COMMITTED to the ledger: each row records the id of the transaction that wrote it, and a page
-- shows only rows of transactions below the reader's snapshot xmin, every one of which has ended.
-- A row can only appear with a transaction id above anything already served, so no cursor skips or
-- repeats a row (sidecar/statements/history.py). Existing rows get 0 (they were all committed before
-- this migration), ordered among themselves by event id. Both statements are instant: a constant
-- default is not written into existing rows, and SET DEFAULT only applies to rows inserted from now on.
ALTER TABLE ledger ADD COLUMN insert_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE ledger ALTER COLUMN insert_xid SET DEFAULT pg_current_xact_id();
-- Keyset pagination per workspace: a page is one index range scan per partition, at any depth.
CREATE INDEX ledger_history ON ledger (workspace_id, insert_xid, event_id);

-- 2. Daily roll-ups: one row per workspace, UTC day, kind, status, provider, model and billing path.
-- Written by a statement-level AFTER INSERT trigger on the ledger, from the statement's transition
-- table: only rows actually inserted are in it (the dedup trigger and ON CONFLICT DO NOTHING drop the
-- others before), and it runs inside the inserting transaction: the flusher's batch, a grant, a
-- payment's top-up, any future writer. So a replayed batch adds nothing, and the roll-up commits or
-- rolls back with its rows. Unlike the ledger it is updated in place: it is derived data, and
-- `sidecar audit` checks it against the ledger (finding rollup_vs_ledger).
CREATE TABLE ledger_daily (
    workspace_id           text NOT NULL,
    day                    date NOT NULL,
    kind                   text NOT NULL,
    status                 text NOT NULL,
    provider               text NOT NULL,  -- '' when the row has none (grants, top-ups)
    model                  text NOT NULL,
    byok                   boolean NOT NULL,
    rows                   bigint NOT NULL,
    input_tokens           bigint NOT NULL,
    output_tokens          bigint NOT NULL,
    cache_read_tokens      bigint NOT NULL,
    cache_write_5m_tokens  bigint NOT NULL,
    cache_write_1h_tokens  bigint NOT NULL,
    reasoning_tokens       bigint NOT NULL,
    cost_micro             bigint NOT NULL,
    upstream_cost_micro    bigint NOT NULL,
    fee_micro              bigint NOT NULL DEFAULT 0,
    balance_impact_micro   bigint NOT NULL,
    PRIMARY KEY (workspace_id, day, kind, status, provider, model, byok)
);
CREATE INDEX ledger_daily_day ON ledger_daily (day);  -- the margin report spans every workspace

-- (Re)creates the trigger function. The ledger's usage fee (a fee_micro column) may be added by a
-- later migration: that migration ends with `SELECT ledger_daily_install();` and the roll-ups sum it
-- from then on (rows before it had no fee). Until the column exists the roll-up's fee is 0.
CREATE FUNCTION ledger_daily_fee_sum() RETURNS text LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN EXISTS (
        SELECT 1 FROM pg_attribute WHERE attrelid = 'ledger'::regclass AND attname = 'fee_micro' AND NOT attisdropped
    ) THEN 'sum(fee_micro)::bigint' ELSE '0::bigint' END
$$;

CREATE FUNCTION ledger_daily_install() RETURNS void LANGUAGE plpgsql AS $install$
DECLARE
    fee text := ledger_daily_fee_sum();
BEGIN
    EXECUTE format($function$
        CREATE OR REPLACE FUNCTION ledger_daily_add() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER
        SET search_path FROM CURRENT AS $body$
        BEGIN
            -- In key order: two transactions adding to the same roll-up rows lock them in one order.
            INSERT INTO ledger_daily AS d
                SELECT workspace_id, (created_at AT TIME ZONE 'UTC')::date, kind, status,
                       coalesce(provider, ''), coalesce(model, ''), byok, count(*),
                       sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(cache_read_tokens)::bigint,
                       sum(cache_write_5m_tokens)::bigint, sum(cache_write_1h_tokens)::bigint,
                       sum(reasoning_tokens)::bigint, sum(cost_micro)::bigint, sum(upstream_cost_micro)::bigint,
                       %s, sum(balance_impact_micro)::bigint
                FROM new_rows GROUP BY 1, 2, 3, 4, 5, 6, 7 ORDER BY 1, 2, 3, 4, 5, 6, 7
            ON CONFLICT (workspace_id, day, kind, status, provider, model, byok) DO UPDATE SET
                rows = d.rows + EXCLUDED.rows,
                input_tokens = d.input_tokens + EXCLUDED.input_tokens,
                output_tokens = d.output_tokens + EXCLUDED.output_tokens,
                cache_read_tokens = d.cache_read_tokens + EXCLUDED.cache_read_tokens,
                cache_write_5m_tokens = d.cache_write_5m_tokens + EXCLUDED.cache_write_5m_tokens,
                cache_write_1h_tokens = d.cache_write_1h_tokens + EXCLUDED.cache_write_1h_tokens,
                reasoning_tokens = d.reasoning_tokens + EXCLUDED.reasoning_tokens,
                cost_micro = d.cost_micro + EXCLUDED.cost_micro,
                upstream_cost_micro = d.upstream_cost_micro + EXCLUDED.upstream_cost_micro,
                fee_micro = d.fee_micro + EXCLUDED.fee_micro,
                balance_impact_micro = d.balance_impact_micro + EXCLUDED.balance_impact_micro;
            RETURN NULL;
        END $body$
    $function$, fee);
END $install$;

SELECT ledger_daily_install();

CREATE TRIGGER ledger_daily AFTER INSERT ON ledger REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_daily_add();

-- The roll-ups of the rows already in the ledger, the same way.
DO $backfill$
BEGIN
    EXECUTE format($sql$
        INSERT INTO ledger_daily
            SELECT workspace_id, (created_at AT TIME ZONE 'UTC')::date, kind, status, coalesce(provider, ''),
                   coalesce(model, ''), byok, count(*), sum(input_tokens)::bigint, sum(output_tokens)::bigint,
                   sum(cache_read_tokens)::bigint, sum(cache_write_5m_tokens)::bigint,
                   sum(cache_write_1h_tokens)::bigint, sum(reasoning_tokens)::bigint, sum(cost_micro)::bigint,
                   sum(upstream_cost_micro)::bigint, %s, sum(balance_impact_micro)::bigint
            FROM ledger GROUP BY 1, 2, 3, 4, 5, 6, 7
    $sql$, ledger_daily_fee_sum());
END $backfill$;

-- 3. Retention (`sidecar ledger archive`): a monthly partition detached from the ledger and written
-- to a file. What it held per workspace and kind is kept here, so the money identity still holds:
-- balance = what the ledger holds + what its archived months held (sidecar audit adds both).
CREATE TABLE ledger_archives (
    month        date PRIMARY KEY,      -- the first day of the archived month
    partition    text NOT NULL,         -- the detached table (dropped once the file is verified, if asked)
    rows         bigint NOT NULL,
    file         text,                  -- where the rows were written
    sha256       text,                  -- of that file
    archived_at  timestamptz NOT NULL DEFAULT now(),
    dropped_at   timestamptz
);
CREATE TABLE ledger_archive_totals (
    month                 date NOT NULL REFERENCES ledger_archives (month),
    workspace_id          text NOT NULL,
    kind                  text NOT NULL,
    rows                  bigint NOT NULL,
    balance_impact_micro  bigint NOT NULL,
    PRIMARY KEY (month, workspace_id, kind)
);
CREATE TRIGGER ledger_archives_no_update_delete BEFORE DELETE ON ledger_archives
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
CREATE TRIGGER ledger_archive_totals_no_update_delete BEFORE UPDATE OR DELETE ON ledger_archive_totals
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
