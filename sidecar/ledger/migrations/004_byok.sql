-- Customers' own provider keys (BYOK). Only ciphertext and the last 4 characters are stored: the
-- key is sealed with AES-256-GCM under its own data key, itself wrapped by a key-encryption key
-- (KEK) that never reaches the database. The associated data binds each row's ciphertext to its
-- workspace, office and provider.
CREATE TABLE byok_keys (
    id                 text PRIMARY KEY,
    workspace_id       text NOT NULL REFERENCES workspaces (id),
    office_id          text REFERENCES offices (id),
    provider           text NOT NULL,
    kek_id             text NOT NULL,
    wrapped_dek        bytea NOT NULL,
    ciphertext         bytea NOT NULL,
    last4              text NOT NULL,
    status             text NOT NULL CHECK (status IN ('active', 'inactive')),
    failing_until      timestamptz,  -- set when the provider refused the key: calls skip it until then
    failure_reason     text,
    created_at         timestamptz NOT NULL DEFAULT now(),
    last_validated_at  timestamptz,
    last_used_at       timestamptz,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- At most one active key per scope and provider: matching is by provider, never per model.
CREATE UNIQUE INDEX byok_keys_one_active ON byok_keys (workspace_id, coalesce(office_id, ''), provider)
    WHERE status = 'active';

-- Why a call did not use the customer's key after all (its key failed, or is cooling down).
ALTER TABLE ledger ADD COLUMN byok_fallback_reason text;
