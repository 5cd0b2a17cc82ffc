"""Development tools, apart from the product: `sidecar dev`, the mock provider and the embedded
Redis/Postgres servers that `sidecar dev`, the tests and the benchmark start.

Nothing in `sidecar serve | control | migrate` imports this package, and the production image does not
ship it (see the Dockerfile).
"""
