-- Fallback between targets: how many attempts a call took and why the last fallback happened.
ALTER TABLE ledger ADD COLUMN attempts smallint NOT NULL DEFAULT 1 CHECK (attempts >= 1);
ALTER TABLE ledger ADD COLUMN fallback_reason text;
-- The protocol the client spoke (openai_chat, anthropic_messages, ...).
ALTER TABLE ledger ADD COLUMN protocol text;

-- Tokens per minute per key, alongside requests per minute. NULL: no token limit.
ALTER TABLE api_keys ADD COLUMN tokens_per_minute integer CHECK (tokens_per_minute > 0);
