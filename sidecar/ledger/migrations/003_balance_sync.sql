-- Balance changes Postgres committed that the live Redis balance may not hold yet: ledger events
-- settled in a Redis that has since restarted empty. Written in the flush transaction, applied to
-- Redis right after commit (exactly once, by version and token), then deleted. A crash in between
-- leaves the row here, and the next flush finishes the job.
CREATE TABLE balance_sync (
    workspace_id  text NOT NULL,
    pg_version    bigint NOT NULL,
    gen           text NOT NULL,   -- the Redis load the events were settled under
    delta_micro   bigint NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (workspace_id, pg_version, gen)
);
