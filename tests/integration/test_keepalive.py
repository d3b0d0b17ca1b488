"""HTTP/2 keepalive: a watch stream whose network path dies without a word (no FIN, no RST: a
NAT that forgot the connection, a host that lost power) is noticed by both ends. The client's
pings end its stream, so its RevocationWatcher resumes on a new connection and sees what it
missed; the server's pings end the stream it was holding for a client that is gone."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from agentid_client import AgentIdClient, RevocationWatcher, channel_options

from tests.conftest import ADMIN_KEY, CHECK_KEY, FakeClock, IdpFixture, running_harness


class FreezingProxy:
    """Forwards TCP connections to a port. ``freeze()`` makes the connections open now go
    silent (nothing forwarded either way, nothing closed), as a dead network path does; later
    connections are forwarded as usual."""

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._frozen: list[asyncio.Event] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FreezingProxy]:
        server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def freeze(self) -> None:
        for frozen in self._frozen:
            frozen.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
        frozen = asyncio.Event()
        self._frozen.append(frozen)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, frozen))
            self._tasks.add(task)

    @staticmethod
    async def _pump(
        source: asyncio.StreamReader, sink: asyncio.StreamWriter, frozen: asyncio.Event
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await source.read(65536):
                if frozen.is_set():
                    await asyncio.Event().wait()  # silent from now on: never forwards, never closes
                sink.write(data)
                await sink.drain()
        sink.close()


def short_keepalive(config: dict[str, Any]) -> None:
    config["server"] = {
        **config.get("server", {}),
        "keepalive_time": "300ms",
        "keepalive_timeout": "300ms",
        "min_client_ping_interval": "100ms",
    }


async def test_a_watcher_on_a_dead_path_notices_resumes_and_misses_nothing(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    # The server's own pings off (an hour): the client's must do the noticing.
    def client_pings_only(config: dict[str, Any]) -> None:
        short_keepalive(config)
        config["server"]["keepalive_time"] = "1h"

    async with (
        running_harness(tmp_path, idp, clock, mutate=client_pings_only) as h,
        FreezingProxy(h.running.port).running() as proxy,
    ):
        options = channel_options(keepalive_time=0.3, keepalive_timeout=0.3)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}", options=options)
        watcher = RevocationWatcher(channel, CHECK_KEY, retry_delay=0.05, max_retry_delay=0.2)
        watcher.start()
        try:
            first, second = await h.delegate(), await h.delegate()
            async with AgentIdClient(f"127.0.0.1:{h.running.port}", ADMIN_KEY) as admin:
                done = await admin.revoke(session_id=first.session_id)
                await asyncio.wait_for(watcher.wait_for(done.revocation_sequence), 5)
                proxy.freeze()  # the watcher's connection goes silent
                done = await admin.revoke(session_id=second.session_id)
            await asyncio.wait_for(watcher.wait_for(done.revocation_sequence), 10)
            assert watcher.is_revoked(first.serial)
            assert watcher.is_revoked(second.serial)
        finally:
            await watcher.stop()
            await channel.close()


async def test_the_server_ends_the_stream_of_a_client_that_is_gone(
    tmp_path: Path, idp: IdpFixture, clock: FakeClock
) -> None:
    async with (
        running_harness(tmp_path, idp, clock, mutate=short_keepalive) as h,
        FreezingProxy(h.running.port).running() as proxy,
    ):
        revocations = h.running.hubs[0]
        # A client that never pings (no keepalive options), then vanishes.
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}")
        watcher = RevocationWatcher(channel, CHECK_KEY, retry_delay=60)
        watcher.start()
        try:
            async with asyncio.timeout(5):
                while len(revocations) == 0:  # noqa: ASYNC110 (no event says a watcher came)
                    await asyncio.sleep(0.02)
            proxy.freeze()
            async with asyncio.timeout(5):
                while len(revocations) > 0:  # noqa: ASYNC110 (nor that it went)
                    await asyncio.sleep(0.05)
        finally:
            await watcher.stop()
            await channel.close()
