"""A local copy of the revoked set, kept in sync by WatchRevocations.

A service that checks agent tokens itself (or caches decisions) runs one ``RevocationWatcher``:
it starts from a snapshot, applies every event in order, and on any disconnect resumes after the
last sequence it applied, so it never misses or repeats one. When its sequence cannot be continued
(an event out of order, or a server whose history ends before it, OUT_OF_RANGE: say, a database
restored from a backup) it starts over from a fresh snapshot, answering from the set it has
until then.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time

import grpc
from agentid.v1 import agentid_pb2 as pb
from agentid.v1 import agentid_pb2_grpc
from pyroaring import BitMap

log = logging.getLogger(__name__)


class WatcherStopped(Exception):
    """The watcher stopped for good (agentid refused its credential): its revoked set is no
    longer kept, so it answers no more questions. Restart it with a credential that works."""


EXPIRY_GRACE = 300.0  # seconds a revocation is kept past its token's expiry (clock leeways)


class WatcherNotReady(Exception):
    """The watcher has no snapshot yet: it cannot tell a revoked session from a live one. Await
    ``wait_for(0)`` after ``start()``."""


class _Gap(Exception):
    """An event out of sequence (the service guarantees none; if one comes, resynchronise)."""


class RevocationWatcher:
    """Keeps ``revoked`` (serials) and ``sequence`` in sync with the service.

    Give it a channel made with ``channel_options()``: its keepalive pings are how the watcher
    learns that a quiet stream's network path has died. While the service cannot be reached it
    answers from the set it has and keeps trying. If the service refuses its credential it
    stops for good, logs why, and ``is_revoked`` raises ``WatcherStopped`` from then on, as it
    does after ``stop()`` or any other end of ``run()``: a caller is never answered from a set
    nobody keeps. Before the first snapshot it raises ``WatcherNotReady``. Revoked sessions
    whose tokens have expired are dropped ``EXPIRY_GRACE`` seconds later (a verifier's clock
    leeway), those in a snapshot at the next snapshot."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        api_key: str,
        *,
        retry_delay: float = 0.5,
        max_retry_delay: float = 10.0,
    ) -> None:
        self._stub = agentid_pb2_grpc.AgentIdentityServiceStub(channel)
        self._metadata = (("authorization", f"Bearer {api_key}"),)
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self.revoked = BitMap()
        self.sequence = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._received = False  # the current stream delivered something
        self._expiring: list[tuple[float, int]] = []  # (expires_at, serial) of events applied
        self.failure: BaseException | None = None  # why it stopped for good
        self._snapshot_seen = False

    def is_revoked(self, serial: int) -> bool:
        if self.failure is not None:
            raise WatcherStopped("the revocation watcher has stopped") from self.failure
        if not self._snapshot_seen:
            raise WatcherNotReady("the revocation watcher has no snapshot yet")
        return serial % (1 << 32) in self.revoked

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="revocation-watcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Its end: cancelled, or stopped before for a reason that is in ``failure``.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def wait_for(self, sequence: int) -> None:
        """Returns once a snapshot and every revocation up to ``sequence`` are applied locally
        (``wait_for(0)``: the first snapshot); WatcherStopped if the watcher stops first."""
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    (self._snapshot_seen and self.sequence >= sequence) or self.failure is not None
                )
            )
        if self.failure is not None:
            raise WatcherStopped("the revocation watcher has stopped") from self.failure

    async def run(self) -> None:
        """Watches until cancelled, reconnecting with backoff and resuming where it stopped.
        However it ends, the watcher answers no more questions afterwards."""
        try:
            await self._run()
        except BaseException as end:
            if self.failure is None:
                self.failure = end
                if not isinstance(end, asyncio.CancelledError):
                    log.error("revocation watcher stopped: %s", type(end).__name__)
            async with self._changed:
                self._changed.notify_all()  # wait_for raises now
            raise

    async def _run(self) -> None:
        delay = self._retry_delay
        while True:
            self._received = False
            try:
                await self._watch_once()
            except grpc.aio.AioRpcError as error:
                code = error.code()
                if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                    self.failure = error
                    log.error(
                        "revocation watcher stopped: agentid refused its credential (%s: %s)",
                        code.name,
                        error.details(),
                    )
                    raise
                if code == grpc.StatusCode.OUT_OF_RANGE:
                    log.warning(
                        "the service's revocations end before %d; starting over from a snapshot",
                        self.sequence,
                    )
                    self.sequence = 0
                else:
                    log.info(
                        "revocation watch ended (%s); resuming after %d", code.name, self.sequence
                    )
            except _Gap as gap:
                log.error("%s; starting over from a snapshot", gap)
                self.sequence = 0
            except ValueError:  # a snapshot that does not decode: take a new one
                log.error("an unreadable revocation snapshot; starting over from a new one")
                self.sequence = 0
            if self._received:  # a stream that delivered was a success: back off from the start
                delay = self._retry_delay
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_retry_delay)

    async def _watch_once(self) -> None:
        request = pb.WatchRevocationsRequest(after_sequence=self.sequence)
        async for response in self._stub.WatchRevocations(request, metadata=self._metadata):
            self._received = True
            async with self._changed:
                if response.HasField("snapshot"):
                    self.revoked = BitMap.deserialize(response.snapshot.revoked_serials)
                    self.sequence = response.snapshot.sequence
                    self._snapshot_seen = True
                    self._expiring.clear()  # the snapshot holds live entries only
                else:
                    event = response.event
                    if event.sequence != self.sequence + 1:
                        raise _Gap(
                            f"revocation event {event.sequence} arrived after {self.sequence}"
                        )
                    serial = event.serial % (1 << 32)
                    self.revoked.add(serial)
                    self.sequence = event.sequence
                    expires = event.expires_at.seconds + event.expires_at.nanos / 1e9
                    heapq.heappush(self._expiring, (expires + EXPIRY_GRACE, serial))
                self._forget_expired()
                self._changed.notify_all()

    def _forget_expired(self) -> None:
        """Serials whose tokens have all expired: they cannot be presented any more."""
        now = time.time()
        while self._expiring and self._expiring[0][0] <= now:
            _, serial = heapq.heappop(self._expiring)
            self.revoked.discard(serial)
