"""A metering sidecar for AI agents. See README.md and docs/."""

__version__ = "0.1.0"
