-- Money movements beyond usage (sidecar/movements.py): credits (grant, topup, allowance) and debits
-- (refund, expiry), each idempotent by its movement id in `grants` and recorded by one ledger row.
ALTER TABLE ledger DROP CONSTRAINT ledger_kind_check;
ALTER TABLE ledger ADD CONSTRAINT ledger_kind_check
    CHECK (kind IN ('usage', 'grant', 'topup', 'allowance', 'refund', 'expiry'));
-- A debit takes at most what remains: the part it could not take is recorded here (refund, expiry).
ALTER TABLE ledger ADD COLUMN short_micro bigint NOT NULL DEFAULT 0 CHECK (short_micro >= 0);
-- The usage fee of a call (percent of its token cost; never BYOK, never a free model), charged on top
-- of cost_micro: a billed usage row's balance impact is -(cost_micro + fee_micro). fee_waived_micro is
-- the part of the fee the workspace's fee waiver took instead.
ALTER TABLE ledger ADD COLUMN fee_micro bigint NOT NULL DEFAULT 0 CHECK (fee_micro >= 0);
ALTER TABLE ledger ADD COLUMN fee_waived_micro bigint NOT NULL DEFAULT 0 CHECK (fee_waived_micro >= 0);
-- Settled in post-charge mode: nothing was held, the actual cost was debited even below zero.
ALTER TABLE ledger ADD COLUMN postpaid boolean NOT NULL DEFAULT false;

-- `grants` is now the index of every movement: movement id -> kind, amount, ledger event.
ALTER TABLE grants DROP CONSTRAINT grants_kind_check;
ALTER TABLE grants ADD CONSTRAINT grants_kind_check
    CHECK (kind IN ('grant', 'topup', 'allowance', 'refund', 'expiry'));
-- A debit may ask for "everything that remains" (an expiry): no amount.
ALTER TABLE grants ALTER COLUMN amount_micro DROP NOT NULL;
ALTER TABLE grants ADD COLUMN taken_micro bigint CHECK (taken_micro >= 0);  -- a debit's result, once known
ALTER TABLE grants ADD COLUMN short_micro bigint CHECK (short_micro >= 0);

-- The fee waiver used so far, kept with the balance (same transactions, same version), so a Redis
-- load reads both at one instant.
ALTER TABLE accounts ADD COLUMN fee_waived_micro bigint NOT NULL DEFAULT 0;
-- A balance change owed to Redis may carry waiver used too (events settled under an older load).
ALTER TABLE balance_sync ADD COLUMN waived_micro bigint NOT NULL DEFAULT 0;

-- Per-workspace money settings. No row: the deployment's defaults (config `wallet`).
CREATE TABLE wallets (
    workspace_id        text PRIMARY KEY REFERENCES workspaces (id),
    mode                text NOT NULL DEFAULT 'prepaid' CHECK (mode IN ('prepaid', 'postpaid')),
    -- postpaid: calls are admitted while the balance is above -credit_limit_micro
    credit_limit_micro  bigint NOT NULL DEFAULT 0 CHECK (credit_limit_micro >= 0),
    -- the first fee_waiver_micro of usage fees are waived (NULL: the deployment's default)
    fee_waiver_micro    bigint CHECK (fee_waiver_micro >= 0),
    -- expiry: from this instant no call is admitted and the remaining balance is forfeited once
    expires_at          timestamptz,
    -- grows with every change: Redis keeps the newest settings whichever writer comes last (wallet.lua)
    version             bigint NOT NULL DEFAULT 1,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- Key budgets: a client key may spend at most budget_micro per period ('total', 'monthly', 'daily',
-- UTC boundaries); what it spent is the ledger's usage rows of that key in the period.
ALTER TABLE api_keys ADD COLUMN budget_micro bigint CHECK (budget_micro >= 0);
ALTER TABLE api_keys ADD COLUMN budget_period text CHECK (budget_period IN ('total', 'monthly', 'daily'));
ALTER TABLE api_keys ADD COLUMN budget_since timestamptz;  -- a 'total' budget counts from here
CREATE INDEX ledger_key_time ON ledger (key_id, created_at) WHERE key_id IS NOT NULL;
