"""The ledger: event schema, the stream-to-Postgres flusher, and migrations."""
