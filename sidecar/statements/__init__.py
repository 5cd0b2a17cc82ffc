"""The read side (DESIGN.md section 12): ledger history, CSV statements, the usage summary, the margin
report and the retention of old months. Postgres only, never Redis: what these show is what the system
of record holds. Pure parsing lives in `filters`; each other module is one query shape."""
