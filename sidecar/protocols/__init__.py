"""Wire protocols: pure functions from bytes to facts and back. No I/O here."""
