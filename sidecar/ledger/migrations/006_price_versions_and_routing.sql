-- Issue 16: each ledger row records the price version it was billed at, why its target was chosen, and
-- the priced classes beyond text tokens (audio and image tokens, server-tool calls).

-- Every price a sidecar may bill at, registered (idempotently) by each process at start: the version id
-- is a content hash of the entry's name, source, sell and upstream prices and effective time, so the
-- same prices give the same id on every replica and restart and a row's version always names one price.
CREATE TABLE price_versions (
    version        text PRIMARY KEY,
    price          text NOT NULL,             -- the cost profile's entry (a model, or model@provider)
    source         text NOT NULL,             -- 'config' (pricing.yaml) or 'genai-prices==<version>'
    effective_at   timestamptz,               -- NULL: in force since the start
    prices         jsonb NOT NULL,            -- sell and upstream, scaled integers (money.PRICE_SCALE)
    registered_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE ledger ADD COLUMN price_version text;  -- price_versions.version (NULL: expired before a target)
ALTER TABLE ledger ADD COLUMN route_reason text;   -- policy, fallback:<n>, skipped_<why>:<target>; ';'-joined
ALTER TABLE ledger ADD COLUMN input_audio_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE ledger ADD COLUMN input_image_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE ledger ADD COLUMN output_audio_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE ledger ADD COLUMN output_image_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE ledger ADD COLUMN web_searches integer NOT NULL DEFAULT 0;
ALTER TABLE ledger ADD COLUMN file_searches integer NOT NULL DEFAULT 0;
