-- The system of record. Money columns are bigint micro-credits.

CREATE TABLE workspaces (
    id          text PRIMARY KEY,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE offices (
    id            text PRIMARY KEY,
    workspace_id  text NOT NULL REFERENCES workspaces (id),
    name          text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now()
);

-- Client API keys. Only a SHA-256 of the key is stored; the key itself is shown once at creation.
CREATE TABLE api_keys (
    id              text PRIMARY KEY,
    workspace_id    text NOT NULL REFERENCES workspaces (id),
    office_id       text REFERENCES offices (id),
    name            text NOT NULL,
    key_hash        bytea NOT NULL UNIQUE,
    last4           text NOT NULL,
    rate_limit_rpm  integer NOT NULL CHECK (rate_limit_rpm > 0),
    created_at      timestamptz NOT NULL DEFAULT now(),
    revoked_at      timestamptz
);
CREATE INDEX api_keys_workspace ON api_keys (workspace_id);

-- The balance the ledger implies, kept current in the same transaction as the ledger rows.
-- `version` grows by one with every committed change, so Redis can tell which changes it has.
CREATE TABLE accounts (
    workspace_id   text PRIMARY KEY REFERENCES workspaces (id),
    balance_micro  bigint NOT NULL DEFAULT 0,
    version        bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Credit grants and top-ups, idempotent by the caller's grant id.
CREATE TABLE grants (
    workspace_id  text NOT NULL REFERENCES workspaces (id),
    grant_id      text NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('grant', 'topup')),
    amount_micro  bigint NOT NULL CHECK (amount_micro > 0),
    event_id      uuid NOT NULL,
    pg_version    bigint,  -- the account version it committed at: lets a retry finish the Redis side
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, grant_id)
);

-- One immutable row per finished call and per credit movement. Partitioned by time; the dedup key
-- includes the partition key (created_at is fixed when the event is settled, so a replay of the
-- same event lands on the same key).
CREATE TABLE ledger (
    event_id               uuid NOT NULL,
    created_at             timestamptz NOT NULL,
    kind                   text NOT NULL CHECK (kind IN ('usage', 'grant', 'topup')),
    status                 text NOT NULL,
    workspace_id           text NOT NULL,
    office_id              text,
    key_id                 text,
    request_id             text,
    idempotency_key        text,
    session_id             text,
    provider               text,
    model                  text,
    upstream_model         text,
    input_tokens           bigint NOT NULL DEFAULT 0,
    output_tokens          bigint NOT NULL DEFAULT 0,
    cache_read_tokens      bigint NOT NULL DEFAULT 0,
    cache_write_5m_tokens  bigint NOT NULL DEFAULT 0,
    cache_write_1h_tokens  bigint NOT NULL DEFAULT 0,
    reasoning_tokens       bigint NOT NULL DEFAULT 0,
    cost_micro             bigint NOT NULL CHECK (cost_micro >= 0),
    upstream_cost_micro    bigint NOT NULL DEFAULT 0,
    hold_micro             bigint NOT NULL DEFAULT 0,
    balance_impact_micro   bigint NOT NULL,
    balance_after_micro    bigint,
    byok                   boolean NOT NULL DEFAULT false,
    estimated              boolean NOT NULL DEFAULT false,
    hold_lost              boolean NOT NULL DEFAULT false,
    error                  text,
    started_at             timestamptz,
    first_byte_at          timestamptz,
    ended_at               timestamptz,
    PRIMARY KEY (event_id, created_at)
) PARTITION BY RANGE (created_at);

CREATE TABLE ledger_default PARTITION OF ledger DEFAULT;
CREATE INDEX ledger_workspace_time ON ledger (workspace_id, created_at);
CREATE INDEX ledger_request ON ledger (request_id);

CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger is append-only: % is refused', TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;

-- Row triggers on the partitioned table are cloned onto every partition; TRUNCATE triggers are not,
-- so each partition gets its own (a partition can be truncated directly).
CREATE TRIGGER ledger_no_update_delete BEFORE UPDATE OR DELETE ON ledger
    FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change();

CREATE FUNCTION ledger_protect(partition regclass) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format('CREATE TRIGGER ledger_no_truncate BEFORE TRUNCATE ON %s
                    FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change()', partition);
END $$;

SELECT ledger_protect('ledger');
SELECT ledger_protect('ledger_default');

-- Monthly partitions, created ahead of time by `sidecar migrate` (run it at least monthly).
CREATE FUNCTION ledger_ensure_partitions(months_ahead integer) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    month_start date := date_trunc('month', now())::date;
    name text;
BEGIN
    FOR i IN 0..months_ahead LOOP
        name := format('ledger_%s', to_char(month_start, 'YYYY_MM'));
        IF to_regclass(name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I PARTITION OF ledger FOR VALUES FROM (%L) TO (%L)',
                           name, month_start, (month_start + interval '1 month')::date);
            PERFORM ledger_protect(name::regclass);
        END IF;
        month_start := (month_start + interval '1 month')::date;
    END LOOP;
END $$;
