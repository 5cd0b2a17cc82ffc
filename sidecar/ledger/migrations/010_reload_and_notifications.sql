-- Auto-reload (a payment started when a settlement leaves the balance under a threshold) and
-- notifications (signed webhooks to a customer's endpoint, with a durable delivery log).

-- Threshold crossings, one row per workspace and purpose. A crossing is recorded once: by the one
-- conditional UPDATE that finds the watch armed (below_ms NULL). It is re-armed only by an
-- observation above the threshold made later (Redis time) than the crossing, so observations that
-- reach Postgres out of order can neither fire a crossing twice nor re-arm it early.
CREATE TABLE balance_watches (
    workspace_id     text NOT NULL REFERENCES workspaces (id),
    kind             text NOT NULL CHECK (kind IN ('notify', 'reload')),
    threshold_micro  bigint NOT NULL CHECK (threshold_micro > 0),
    below_ms         bigint,                   -- Redis time of the settlement that crossed; NULL: armed
    rearmed_ms       bigint NOT NULL DEFAULT 0, -- Redis time of the observation that last re-armed it
    PRIMARY KEY (workspace_id, kind)
);

CREATE TABLE auto_reload_settings (
    workspace_id       text PRIMARY KEY REFERENCES workspaces (id),
    enabled            boolean NOT NULL,
    threshold_micro    bigint NOT NULL CHECK (threshold_micro > 0),
    amount_micro       bigint NOT NULL CHECK (amount_micro >= threshold_micro),
    customer_id        text,                   -- the payment provider's customer and saved method
    payment_method_id  text,
    failures           integer NOT NULL DEFAULT 0 CHECK (failures >= 0), -- consecutive, since the last success
    retry_at           timestamptz,            -- after a failure: no new reload before this
    disabled_reason    text,                   -- set when repeated failures turned it off
    disabled_at        timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- One row per reload attempt. Its id is the payment's idempotency key.
CREATE TABLE auto_reloads (
    id                   text PRIMARY KEY,
    workspace_id         text NOT NULL REFERENCES workspaces (id),
    amount_micro         bigint NOT NULL CHECK (amount_micro > 0),
    state                text NOT NULL CHECK (state IN ('pending', 'processing', 'succeeded', 'failed')),
    attempt              integer NOT NULL CHECK (attempt >= 1),
    reason               text NOT NULL CHECK (reason IN ('threshold', 'retry')),
    available_micro      bigint,               -- the available balance that started it
    provider_payment_id  text,
    order_id             text,
    failure_reason       text,
    created_at           timestamptz NOT NULL DEFAULT now(),
    started_at           timestamptz,
    finished_at          timestamptz
);
-- The guard: at most one reload in flight per workspace, whatever the number of processes.
CREATE UNIQUE INDEX auto_reloads_one_in_flight ON auto_reloads (workspace_id)
    WHERE state IN ('pending', 'processing');
CREATE INDEX auto_reloads_by_workspace ON auto_reloads (workspace_id, created_at DESC);

-- States move forward only: pending -> processing -> succeeded | failed, or pending -> succeeded |
-- failed directly (a webhook may beat the record of the payment's start). Amounts never change.
CREATE FUNCTION auto_reloads_forward_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'auto_reloads rows are never deleted';
    END IF;
    IF NEW.workspace_id <> OLD.workspace_id OR NEW.amount_micro <> OLD.amount_micro OR NEW.id <> OLD.id THEN
        RAISE EXCEPTION 'an auto-reload''s workspace and amount never change';
    END IF;
    IF NEW.state = OLD.state
        OR (OLD.state = 'pending' AND NEW.state IN ('processing', 'succeeded', 'failed'))
        OR (OLD.state = 'processing' AND NEW.state IN ('succeeded', 'failed')) THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION 'auto-reload % cannot move from % to %', OLD.id, OLD.state, NEW.state;
END $$;
CREATE TRIGGER auto_reloads_forward_only BEFORE UPDATE OR DELETE ON auto_reloads
    FOR EACH ROW EXECUTE FUNCTION auto_reloads_forward_only();

-- A workspace's endpoint. The signing secret is sealed like a BYOK key (byok/vault.py): AES-256-GCM
-- under its own data key, wrapped by a KEK that never reaches the database.
CREATE TABLE notification_endpoints (
    workspace_id     text PRIMARY KEY REFERENCES workspaces (id),
    url              text NOT NULL,
    events           text[] NOT NULL,
    kek_id           text NOT NULL,
    wrapped_dek      bytea NOT NULL,
    ciphertext       bytea NOT NULL,
    secret_last4     text NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- One row per event to deliver; `body` is the exact bytes signed and sent on every attempt.
CREATE TABLE notification_deliveries (
    id               text PRIMARY KEY,
    workspace_id     text NOT NULL REFERENCES workspaces (id),
    event_type       text NOT NULL,
    dedup_key        text NOT NULL,   -- the event happens once: one crossing, one reload, one key failure
    body             text NOT NULL,
    state            text NOT NULL CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_status      integer,
    last_error       text,
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    UNIQUE (workspace_id, dedup_key)
);
CREATE INDEX notification_deliveries_due ON notification_deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX notification_deliveries_by_workspace ON notification_deliveries (workspace_id, created_at DESC);

CREATE TABLE notification_attempts (
    delivery_id  text NOT NULL REFERENCES notification_deliveries (id),
    attempt      integer NOT NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    status_code  integer,          -- the endpoint's HTTP status; NULL: no answer
    error        text,
    duration_ms  integer NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
