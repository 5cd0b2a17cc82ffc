"""The control plane: the admin API. Separate from the data plane; shares only the typed layers."""
