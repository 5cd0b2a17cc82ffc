-- Money in (DESIGN.md section 11): billing profiles, payment orders and their append-only events,
-- payment events kept for review, and invoices numbered without gaps per issuer and year.

-- A workspace's billing profile: who buys. Each order freezes a copy of it in its tax snapshot.
CREATE TABLE billing_profiles (
    workspace_id  text PRIMARY KEY REFERENCES workspaces (id),
    legal_name    text NOT NULL,
    address       text NOT NULL DEFAULT '',
    country       text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    tax_id        text,
    email         text,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- A request to buy credits. Amounts, currency and the tax snapshot are frozen at creation; the status
-- moves forward only. Both are enforced below by a trigger, whoever writes.
CREATE TABLE payment_orders (
    id                   text PRIMARY KEY,
    workspace_id         text NOT NULL REFERENCES workspaces (id),
    client_order_id      text NOT NULL,  -- the caller's idempotency id
    provider             text NOT NULL CHECK (provider IN ('stripe', 'manual')),
    purpose              text NOT NULL CHECK (purpose IN ('checkout', 'reload', 'manual')),
    status               text NOT NULL CHECK (status IN
                             ('created', 'pending', 'paid', 'credited', 'expired', 'failed', 'canceled', 'refunded')),
    amount_micro         bigint NOT NULL CHECK (amount_micro > 0),       -- the credits bought
    fee_micro            bigint NOT NULL CHECK (fee_micro >= 0),         -- the purchase fee, on top
    tax_micro            bigint NOT NULL CHECK (tax_micro >= 0),
    total_micro          bigint NOT NULL CHECK (total_micro = amount_micro + fee_micro + tax_micro),
    currency             text NOT NULL CHECK (currency ~ '^[a-z]{3}$'),
    total_minor          bigint NOT NULL CHECK (total_minor > 0),       -- what the provider charges
    tax_snapshot         jsonb NOT NULL,
    customer_ref         text,            -- the provider's customer (a saved payment method's owner)
    payment_method_ref   text,            -- the saved payment method an off-session order charges
    provider_session_id  text,            -- Stripe: the Checkout Session
    provider_payment_id  text,            -- Stripe: the PaymentIntent
    checkout_url         text,
    payment_reference    text,            -- manual: the operator's reference
    refunded_micro       bigint,          -- credits a refund removed
    refund_spent_micro   bigint,          -- the part of the order already spent when it was refunded
    transition_detail    jsonb NOT NULL DEFAULT '{}',  -- copied into the event of the next transition
    created_at           timestamptz NOT NULL DEFAULT now(),
    updated_at           timestamptz NOT NULL DEFAULT now(),
    UNIQUE (workspace_id, client_order_id)
);
CREATE INDEX payment_orders_workspace ON payment_orders (workspace_id, created_at, id);
CREATE UNIQUE INDEX payment_orders_payment ON payment_orders (provider_payment_id) WHERE provider_payment_id IS NOT NULL;

-- Every status an order takes, in order; never changed.
CREATE TABLE payment_order_events (
    id           bigserial PRIMARY KEY,
    order_id     text NOT NULL REFERENCES payment_orders (id),
    from_status  text,
    to_status    text NOT NULL,
    detail       jsonb NOT NULL DEFAULT '{}',
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX payment_order_events_order ON payment_order_events (order_id, id);

CREATE FUNCTION payment_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % is refused', TG_TABLE_NAME, TG_OP USING ERRCODE = 'insufficient_privilege';
END $$;

CREATE TRIGGER payment_order_events_append_only BEFORE UPDATE OR DELETE ON payment_order_events
    FOR EACH ROW EXECUTE FUNCTION payment_refuse_change();
CREATE TRIGGER payment_order_events_no_truncate BEFORE TRUNCATE ON payment_order_events
    FOR EACH STATEMENT EXECUTE FUNCTION payment_refuse_change();
CREATE TRIGGER payment_orders_no_delete BEFORE DELETE ON payment_orders
    FOR EACH ROW EXECUTE FUNCTION payment_refuse_change();
CREATE TRIGGER payment_orders_no_truncate BEFORE TRUNCATE ON payment_orders
    FOR EACH STATEMENT EXECUTE FUNCTION payment_refuse_change();

-- The forward-only state machine. A same-status update may set the provider's ids; nothing else.
CREATE FUNCTION payment_order_transition_allowed(from_status text, to_status text) RETURNS boolean
    LANGUAGE sql IMMUTABLE AS $$
    SELECT (from_status, to_status) IN (
        ('created', 'pending'), ('created', 'paid'), ('created', 'expired'), ('created', 'failed'),
        ('created', 'canceled'),
        ('pending', 'paid'), ('pending', 'expired'), ('pending', 'failed'), ('pending', 'canceled'),
        ('paid', 'credited'), ('paid', 'refunded'), ('credited', 'refunded'))
$$;

CREATE FUNCTION payment_order_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.status <> 'created' THEN
            RAISE EXCEPTION 'a payment order starts as created, not %', NEW.status USING ERRCODE = 'check_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF (NEW.id, NEW.workspace_id, NEW.client_order_id, NEW.provider, NEW.purpose, NEW.amount_micro,
        NEW.fee_micro, NEW.tax_micro, NEW.total_micro, NEW.currency, NEW.total_minor, NEW.tax_snapshot,
        NEW.created_at)
       IS DISTINCT FROM
       (OLD.id, OLD.workspace_id, OLD.client_order_id, OLD.provider, OLD.purpose, OLD.amount_micro,
        OLD.fee_micro, OLD.tax_micro, OLD.total_micro, OLD.currency, OLD.total_minor, OLD.tax_snapshot,
        OLD.created_at) THEN
        RAISE EXCEPTION 'payment order %: amounts, currency and tax snapshot are frozen at creation', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    -- A provider id, once set, stays (a second session for one order would be a second payment).
    IF (OLD.provider_session_id IS NOT NULL AND NEW.provider_session_id IS DISTINCT FROM OLD.provider_session_id)
       OR (OLD.provider_payment_id IS NOT NULL AND NEW.provider_payment_id IS DISTINCT FROM OLD.provider_payment_id)
       OR (OLD.payment_reference IS NOT NULL AND NEW.payment_reference IS DISTINCT FROM OLD.payment_reference)
       OR (OLD.refunded_micro IS NOT NULL AND NEW.refunded_micro IS DISTINCT FROM OLD.refunded_micro) THEN
        RAISE EXCEPTION 'payment order %: a recorded provider id, reference or refund cannot change', OLD.id
            USING ERRCODE = 'insufficient_privilege';
    END IF;
    IF NEW.status IS DISTINCT FROM OLD.status THEN
        IF NOT payment_order_transition_allowed(OLD.status, NEW.status) THEN
            RAISE EXCEPTION 'payment order %: % -> % is not a forward transition', OLD.id, OLD.status, NEW.status
                USING ERRCODE = 'check_violation';
        END IF;
    END IF;
    NEW.updated_at := now();
    RETURN NEW;
END $$;

CREATE TRIGGER payment_order_guard BEFORE INSERT OR UPDATE ON payment_orders
    FOR EACH ROW EXECUTE FUNCTION payment_order_guard();

-- The event of each status an order takes, written by the database itself (AFTER: the order row
-- exists for the event's foreign key), so no writer can move an order without leaving its event.
CREATE FUNCTION payment_order_event() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO payment_order_events (order_id, from_status, to_status, detail)
            VALUES (NEW.id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.status END, NEW.status, NEW.transition_detail);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER payment_order_event AFTER INSERT OR UPDATE ON payment_orders
    FOR EACH ROW EXECUTE FUNCTION payment_order_event();

-- Every verified provider event, once (its id), with what it did: an audit trail and the review queue.
-- outcome: applied (changed an order), ignored (nothing to do: a replay, a stale event), review (refused
-- and kept for an operator: an amount or currency that does not match its order), deferred (its order
-- is not there yet, or not in the state it needs: the provider redelivers it).
CREATE TABLE payment_events (
    provider      text NOT NULL,
    event_id      text NOT NULL,
    type          text NOT NULL,
    order_id      text,
    outcome       text NOT NULL CHECK (outcome IN ('applied', 'ignored', 'review', 'deferred')),
    reason        text,
    deliveries    integer NOT NULL DEFAULT 1,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (provider, event_id)
);
CREATE INDEX payment_events_review ON payment_events (order_id) WHERE outcome = 'review';

-- Gapless invoice numbers: one counter row per issuer and year, incremented in the crediting
-- transaction (the row lock serialises creditings; a rollback gives the number back).
CREATE TABLE invoice_counters (
    issuer  text NOT NULL,
    year    integer NOT NULL,
    last    bigint NOT NULL,
    PRIMARY KEY (issuer, year)
);

CREATE TABLE invoices (
    number         text PRIMARY KEY,            -- INV-2026-000123
    issuer         text NOT NULL,
    year           integer NOT NULL,
    seq            bigint NOT NULL,
    order_id       text NOT NULL UNIQUE REFERENCES payment_orders (id),
    workspace_id   text NOT NULL REFERENCES workspaces (id),
    issuer_snapshot jsonb NOT NULL,
    issued_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (issuer, year, seq)
);
CREATE INDEX invoices_workspace ON invoices (workspace_id, issued_at);
CREATE TRIGGER invoices_append_only BEFORE UPDATE OR DELETE ON invoices
    FOR EACH ROW EXECUTE FUNCTION payment_refuse_change();
CREATE TRIGGER invoices_no_truncate BEFORE TRUNCATE ON invoices
    FOR EACH STATEMENT EXECUTE FUNCTION payment_refuse_change();
