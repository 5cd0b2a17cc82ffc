"""Where the data plane listens (issue 12.2 and 12.6): the ops port may listen elsewhere than the data
port (`server.ops_host`: in the agent's pod the data port is on loopback, probes reach the ops port on
the pod's address), and the data port may be shared with another process (`server.reuse_port`)."""

from __future__ import annotations

import socket

import aiohttp
import pytest
from support.harness import start_sidecar, stop_sidecar

from sidecar.app import Runtime


async def _runtime(redis_url: str, database_url: str, **server):
    sidecar = await start_sidecar(redis_url, database_url, server=server)
    runtime = Runtime(sidecar.svc, data_plane=True, control_plane=False)
    await runtime.start("127.0.0.1", 0, 0)
    return sidecar, runtime


async def test_the_ops_port_listens_on_ops_host(redis_client, redis_url, migrated_database_url):
    sidecar, runtime = await _runtime(redis_url, migrated_database_url, ops_host="127.0.0.2")
    try:
        _, ops_port = runtime.ports
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.2:{ops_port}/healthz") as resp:
                assert resp.status == 200
            with pytest.raises(aiohttp.ClientConnectionError):
                await http.get(f"http://127.0.0.1:{ops_port}/healthz")
    finally:
        await runtime.shutdown()
        await stop_sidecar(sidecar)


@pytest.mark.parametrize("reuse_port", [True, False])
async def test_the_data_port_is_shared_only_with_reuse_port(redis_client, redis_url, migrated_database_url, reuse_port):
    sidecar, runtime = await _runtime(redis_url, migrated_database_url, reuse_port=reuse_port)
    try:
        data_port, _ = runtime.ports
        other = socket.socket()
        try:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if reuse_port:
                other.bind(("127.0.0.1", data_port))  # a second process would bind beside it
            else:
                with pytest.raises(OSError):
                    other.bind(("127.0.0.1", data_port))
        finally:
            other.close()
    finally:
        await runtime.shutdown()
        await stop_sidecar(sidecar)
