"""The data plane: upstream sessions, forwarding, and the request lifecycle."""
