-- One ledger row per event, whatever its timestamp. The ledger's primary key includes its partition
-- key (created_at), so it cannot see the same event written twice at two times: a Redis restored from
-- a stale snapshot resurrects a settled call's hold, and the sweeper records the call again, later.
-- Every event id (for a call: its request id) is therefore also recorded here, unpartitioned, and a
-- BEFORE INSERT trigger on the ledger skips a row whose event id is already known. No writer (the
-- flusher, a grant, a script run by hand) can add a second row for an event without bypassing the
-- triggers as the table's owner, and `sidecar audit` reports that.
CREATE TABLE ledger_event_ids (
    event_id      uuid PRIMARY KEY,
    workspace_id  text NOT NULL,
    created_at    timestamptz NOT NULL
);
INSERT INTO ledger_event_ids (event_id, workspace_id, created_at)
    SELECT DISTINCT ON (event_id) event_id, workspace_id, created_at FROM ledger ORDER BY event_id, created_at
    ON CONFLICT DO NOTHING;

CREATE TRIGGER ledger_event_ids_no_update_delete BEFORE UPDATE OR DELETE ON ledger_event_ids
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();
SELECT ledger_protect('ledger_event_ids');

-- SECURITY DEFINER: the application role inserts into the ledger and needs no right on this table.
CREATE FUNCTION ledger_dedup() RETURNS trigger LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
BEGIN
    INSERT INTO ledger_event_ids (event_id, workspace_id, created_at)
        VALUES (NEW.event_id, NEW.workspace_id, NEW.created_at) ON CONFLICT DO NOTHING;
    IF NOT FOUND THEN
        RETURN NULL;  -- this event is already in the ledger: skip the row (INSERT ... RETURNING omits it)
    END IF;
    RETURN NEW;
END $$;

CREATE TRIGGER ledger_dedup BEFORE INSERT ON ledger FOR EACH ROW EXECUTE FUNCTION ledger_dedup();

-- Monthly partitions, created ahead of time by `sidecar migrate` (run it at least monthly). A row
-- whose month had no partition yet went to ledger_default, and Postgres refuses to create a partition
-- while the default one holds rows of its range. Such rows are moved into the new partition in the
-- same transaction (the append-only triggers are lifted for the move only, by the owner), and a
-- warning is raised; `sidecar migrate` logs it at error and `sidecar audit` exports the count.
CREATE OR REPLACE FUNCTION ledger_ensure_partitions(months_ahead integer) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    month_start date := date_trunc('month', now())::date;
    month_end date;
    name text;
    stray bigint;
BEGIN
    FOR i IN 0..months_ahead LOOP
        name := format('ledger_%s', to_char(month_start, 'YYYY_MM'));
        month_end := (month_start + interval '1 month')::date;
        IF to_regclass(name) IS NULL THEN
            SELECT count(*) INTO stray FROM ledger_default WHERE created_at >= month_start AND created_at < month_end;
            IF stray > 0 THEN
                RAISE WARNING 'ledger_default holds % row(s) of %: moving them into the new partition', stray, name;
                CREATE TEMP TABLE ledger_moving ON COMMIT DROP AS
                    SELECT * FROM ledger_default WHERE created_at >= month_start AND created_at < month_end;
                ALTER TABLE ledger_default DISABLE TRIGGER ledger_no_update_delete;
                DELETE FROM ledger_default WHERE created_at >= month_start AND created_at < month_end;
                ALTER TABLE ledger_default ENABLE TRIGGER ledger_no_update_delete;
            END IF;
            EXECUTE format('CREATE TABLE %I PARTITION OF ledger FOR VALUES FROM (%L) TO (%L)',
                           name, month_start, month_end);
            PERFORM ledger_protect(name::regclass);
            IF stray > 0 THEN
                -- Their event ids are known already: the dedup trigger would skip every one of them.
                EXECUTE format('ALTER TABLE %I DISABLE TRIGGER ledger_dedup', name);
                EXECUTE format('INSERT INTO %I SELECT * FROM ledger_moving', name);
                EXECUTE format('ALTER TABLE %I ENABLE TRIGGER ledger_dedup', name);
                DROP TABLE ledger_moving;
            END IF;
        END IF;
        month_start := month_end;
    END LOOP;
END $$;

-- Balance changes owed to Redis now also come from grants: a grant commits here, and its Redis side
-- can fail (the admin API's Redis is away). The grant's transaction records it in balance_sync with
-- gen = 'grant:<grant id>', which the data plane's flusher applies to Redis like any other owed change.
COMMENT ON COLUMN balance_sync.gen IS 'the Redis load the events were settled under, or grant:<grant id>';
