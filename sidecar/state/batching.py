"""Auto-pipelining for the hot-path scripts.

Every call makes two script calls (admit, settle). Sent one by one, each costs redis-py about
100 us of CPU (connection checkout, packing, a round trip); under load, concurrent calls' scripts
sent together in one pipeline cost a third of that each. The batcher collects the script calls made
during one turn of the event loop and sends them as one pipeline on the next; alone, a call waits
for nothing more than that turn.

Every script is safe to run twice for the same call, so a pipeline retried after a broken
connection (redis-py's retry) cannot double an effect.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

BATCH_COMMANDS_MAX = 256  # commands per pipeline; more waiting go in the next one


class _Pending:
    __slots__ = ("args", "future", "keys", "script")

    def __init__(self, script: AsyncScript, keys: Sequence, args: Sequence, future: asyncio.Future) -> None:
        self.script, self.keys, self.args, self.future = script, keys, args, future


class ScriptBatcher:
    def __init__(self, client: aioredis.Redis | aioredis.RedisCluster) -> None:
        self.client = client
        self._pending: list[_Pending] = []
        self._scheduled = False
        self._tasks: set[asyncio.Task] = set()

    async def run(self, script: AsyncScript, keys: Sequence, args: Sequence):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_Pending(script, keys, args, future))
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._scheduled = False
        while self._pending:
            batch, self._pending = self._pending[:BATCH_COMMANDS_MAX], self._pending[BATCH_COMMANDS_MAX:]
            task = asyncio.ensure_future(self._send(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[_Pending]) -> None:
        try:
            replies = await self._execute(batch)
            if any(isinstance(r, NoScriptError) for r in replies):  # Redis restarted: load, send those again
                for item in {id(p.script): p.script for p in batch}.values():
                    item.sha = await self.client.script_load(item.script)
                again = [p for p, r in zip(batch, replies, strict=True) if isinstance(r, NoScriptError)]
                for p, r in zip(again, await self._execute(again), strict=True):
                    replies[batch.index(p)] = r
        except BaseException as exc:  # the whole pipeline failed: every call in it sees why
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc if isinstance(exc, Exception) else asyncio.CancelledError())
            if not isinstance(exc, Exception):
                raise
            return
        for p, reply in zip(batch, replies, strict=True):
            if p.future.done():
                continue
            if isinstance(reply, Exception):
                p.future.set_exception(reply)
            else:
                p.future.set_result(reply)

    async def _execute(self, batch: list[_Pending]) -> list:
        if len(batch) == 1:  # no pipeline machinery for a lone call
            p = batch[0]
            try:
                return [await self.client.evalsha(p.script.sha, len(p.keys), *p.keys, *p.args)]
            except NoScriptError as exc:
                return [exc]
        async with self.client.pipeline(transaction=False) as pipe:
            for p in batch:
                # By name, not pipe.evalsha: redis-py's cluster pipeline refuses that method, yet routes
                # the command by its keys (every key of one call shares a slot, state/keys.py).
                pipe.execute_command("EVALSHA", p.script.sha, len(p.keys), *p.keys, *p.args)
            return await pipe.execute(raise_on_error=False)
