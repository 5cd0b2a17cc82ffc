-- Console sessions (control/console/sessions.py). The cookie carries a random session id; only its
-- SHA-256 is stored, so a copy of this table opens no session. A session names the admin token it was
-- opened with by that token's configured SHA-256: permissions and workspace are read from the config
-- on every request, so removing or narrowing a token takes effect on its open sessions at once.
CREATE TABLE console_sessions (
    id_sha256     bytea PRIMARY KEY,
    token_sha256  bytea NOT NULL,
    csrf_token    text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL
);
CREATE INDEX console_sessions_token ON console_sessions (token_sha256, created_at);
CREATE INDEX console_sessions_expiry ON console_sessions (expires_at);
