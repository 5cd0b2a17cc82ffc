"""Redis: the hot path. Lua scripts and a thin typed wrapper; this package owns the key layout."""
