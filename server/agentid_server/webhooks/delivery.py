"""Delivers step-up notices to the `[[step_up.notify]]` endpoints.

``submit`` is called on the event loop right after a commit; it only builds the notices and
puts them on each endpoint's queue, so a slow or dead receiver never slows a StepUp or a Check.
Each endpoint has its own queue (``queue_size`` notices, 1000 by default) and its own workers
(``workers``, 4 by default), so one failing receiver holds up no other. A full queue drops its
oldest notice, with a warning and the ``dropped`` count: the newest step-ups are the ones still
waiting for a human.

A notice is attempted up to ``max_attempts`` times: 2xx is delivered; 408, 429, 5xx, a timeout
or a connection failure is tried again after ``retry_delay`` doubled each time (at most
``MAX_BACKOFF``), with jitter, or after the receiver's ``Retry-After`` on 429 and 503 (at most
``RETRY_AFTER_CAP``); any other answer (3xx included: redirects are never followed) is final.
Response bodies are never read. Logs name an endpoint by its index and host, never its path,
query or secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from urllib.parse import urlsplit

import aiohttp

from agentid_server.domain.notices import Notice, NoticeEvent, notices
from agentid_server.domain.ports import Clock
from agentid_server.domain.stepup import StepUp
from agentid_server.webhooks.signing import signature

log = logging.getLogger(__name__)
QUEUE_SIZE = 1000  # notices waiting for a worker, per endpoint
WORKERS = 4  # deliveries under way at once, per endpoint (each holds its retries)
MAX_BACKOFF = 30.0  # seconds between two attempts at most (Retry-After aside)
RETRY_AFTER_CAP = 60.0  # a receiver's Retry-After is honoured up to this
DROP_LOG_INTERVAL = 10.0  # a full queue warns at most this often (each drop is counted)


@dataclass(frozen=True)
class Endpoint:
    """One receiver, as configured (its secret read already)."""

    index: int
    url: str
    secret: bytes | None
    events: frozenset[NoticeEvent]
    timeout: float = 5.0
    max_attempts: int = 5
    retry_delay: float = 3.0

    @property
    def label(self) -> str:
        """How logs name it: the config key and the host alone."""
        return f"step_up.notify[{self.index}] ({urlsplit(self.url).hostname})"


@dataclass
class _Lane:
    """An endpoint's queue and what its workers share."""

    endpoint: Endpoint
    queue: asyncio.Queue[Notice]
    under_way: int = 0  # taken off the queue, not yet delivered or given up
    last_drop_log: float = float("-inf")


class _Outcome(enum.Enum):
    DELIVERED = "delivered"
    RETRY = "retry"
    FINAL = "final"  # not delivered, and trying again would not help


class WebhookNotifier:
    """The queues, workers and HTTP session of the step-up notifications."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        *,
        base_url: str,
        clock: Clock,
        user_agent: str = "agentid",
        queue_size: int = QUEUE_SIZE,
        workers: int = WORKERS,
    ) -> None:
        """``base_url``: the public URL the console links are built on."""
        self._lanes = [_Lane(e, asyncio.Queue(maxsize=queue_size)) for e in endpoints]
        self._base_url = base_url
        self._clock = clock
        self._user_agent = user_agent
        self._workers_each = workers
        self._wanted = frozenset(e for lane in self._lanes for e in lane.endpoint.events)
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None
        self._stopped = False
        # Counted for the metrics and the logs.
        self.delivered = 0
        self.failed = 0  # not delivered: a final answer, or every attempt failed
        self.dropped = 0  # never attempted to the end: a full queue, or the stop

    @property
    def pending(self) -> int:
        """Notices queued or under way, over all endpoints."""
        return sum(lane.queue.qsize() + lane.under_way for lane in self._lanes)

    def start(self) -> None:
        """Opens the session and starts the workers (on the running loop)."""
        self._session = client_session(
            max(1, len(self._lanes)) * self._workers_each, self._workers_each
        )
        for lane in self._lanes:
            for n in range(self._workers_each):
                name = f"webhook-{lane.endpoint.index}-{n}"
                self._tasks.append(asyncio.create_task(self._work(lane), name=name))

    def submit(self, changed: list[StepUp]) -> None:
        """Queues the notices due for step-up changes committed here. Never blocks, never
        raises: a commit has happened, and its caller is waiting for its answer."""
        try:
            due = notices(changed, self._wanted, self._base_url, self._clock.now())
            for notice in due:
                for lane in self._lanes:
                    if notice.event in lane.endpoint.events:
                        self._put(lane, notice)
        except Exception:
            log.exception("step-up notifications could not be queued")

    def _put(self, lane: _Lane, notice: Notice) -> None:
        endpoint, queue = lane.endpoint, lane.queue
        if self._stopped:
            self.dropped += 1
            log.warning("%s: %s not sent: stopping", endpoint.label, notice.message_id)
            return
        if queue.full():
            oldest = queue.get_nowait()
            queue.task_done()
            self.dropped += 1
            now = asyncio.get_running_loop().time()
            if now - lane.last_drop_log >= DROP_LOG_INTERVAL:
                lane.last_drop_log = now
                log.warning(
                    "%s: queue full (%d notices): dropped %s, the oldest (%d dropped so far)",
                    endpoint.label,
                    queue.maxsize,
                    oldest.message_id,
                    self.dropped,
                )
        queue.put_nowait(notice)

    async def _work(self, lane: _Lane) -> None:
        while True:
            notice = await lane.queue.get()
            lane.under_way += 1
            try:
                await self._deliver(lane.endpoint, notice)
            except Exception as exc:  # its text or traceback may hold the URL: the kind alone
                self.failed += 1
                log.error(
                    "%s: %s not delivered: %s",
                    lane.endpoint.label,
                    notice.message_id,
                    type(exc).__name__,
                )
            finally:
                lane.under_way -= 1
                lane.queue.task_done()

    async def _deliver(self, endpoint: Endpoint, notice: Notice) -> None:
        for attempt in range(1, endpoint.max_attempts + 1):
            outcome, why, retry_after = await self._attempt(endpoint, notice)
            if outcome is _Outcome.DELIVERED:
                self.delivered += 1
                log.debug("%s: %s delivered", endpoint.label, notice.message_id)
                return
            if outcome is _Outcome.FINAL or attempt == endpoint.max_attempts:
                self.failed += 1
                log.warning(
                    "%s: %s not delivered: %s, after %d attempt(s) (%d failed so far)",
                    endpoint.label,
                    notice.message_id,
                    why,
                    attempt,
                    self.failed,
                )
                return
            delay = retry_after if retry_after is not None else backoff(endpoint, attempt)
            log.info(
                "%s: %s attempt %d failed: %s; again in %.1f s",
                endpoint.label,
                notice.message_id,
                attempt,
                why,
                delay,
            )
            await asyncio.sleep(delay)

    async def _attempt(
        self, endpoint: Endpoint, notice: Notice
    ) -> tuple[_Outcome, str, float | None]:
        """One POST: its outcome, why it failed, and the receiver's Retry-After if honoured."""
        assert self._session is not None, "start() first"
        timestamp = int(self._clock.now())
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            "webhook-id": notice.message_id,
            "webhook-timestamp": str(timestamp),
        }
        if endpoint.secret is not None:
            headers["webhook-signature"] = signature(
                endpoint.secret, notice.message_id, timestamp, notice.body
            )
        try:
            async with self._session.post(
                endpoint.url,
                data=notice.body,
                headers=headers,
                allow_redirects=False,
                timeout=aiohttp.ClientTimeout(total=endpoint.timeout),
            ) as response:  # the body is never read: closed unread on the way out
                status, retry_after = response.status, response.headers.get("Retry-After")
        except TimeoutError:
            return _Outcome.RETRY, f"no answer within {endpoint.timeout:g} s", None
        except aiohttp.ClientError as exc:  # its text may hold the URL: the kind alone
            return _Outcome.RETRY, f"cannot reach it ({type(exc).__name__})", None
        if 200 <= status < 300:
            return _Outcome.DELIVERED, "", None
        why = f"HTTP {status}"
        if 300 <= status < 400:
            return _Outcome.FINAL, f"{why} (redirects are not followed: update the URL)", None
        if status in (408, 429) or status >= 500:
            wait = retry_after if status in (429, 503) else None
            honoured = parse_retry_after(wait, self._clock.now())
            return _Outcome.RETRY, why, honoured
        return _Outcome.FINAL, why, None

    async def stop(self, grace: float) -> None:
        """Gives the queued and retrying notices ``grace`` seconds, then drops (and counts) what
        is left, and closes the session."""
        try:
            if self._tasks and grace > 0:
                joined = asyncio.gather(*(lane.queue.join() for lane in self._lanes))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(joined, grace)
            self._stopped = True
            left = self.pending
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if left:
                self.dropped += left
                log.warning(
                    "%d step-up notification(s) not delivered: the shutdown grace ran out", left
                )
        finally:
            self._stopped = True
            if self._session is not None:
                await self._session.close()


def client_session(connections: int, per_host: int) -> aiohttp.ClientSession:
    """The HTTP client of outgoing deliveries (webhooks, Shared Signals): a receiver's cookies
    are not kept, bodies not decompressed, no proxy or netrc taken from the environment."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, limit_per_host=per_host),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        trust_env=False,
    )


def backoff(endpoint: Endpoint, attempt: int) -> float:
    """The wait after an endpoint's failed attempt ``attempt`` (``backoff_delay``)."""
    return backoff_delay(endpoint.retry_delay, attempt)


def backoff_delay(first: float, attempt: int, cap: float = MAX_BACKOFF) -> float:
    """The wait after failed attempt ``attempt``: ``first`` doubled each time (at most ``cap``),
    between half of it and all of it at random, so receivers are not hit by every sender at
    once after an outage."""
    delay = min(first * 2.0 ** (attempt - 1), cap)
    return delay / 2 + random.random() * delay / 2


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds (RFC 9110: delay-seconds or an HTTP-date), at most
    ``RETRY_AFTER_CAP``; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            moment = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if moment.tzinfo is None:
            return None
        seconds = float(moment.timestamp()) - now
    return min(max(seconds, 0.0), RETRY_AFTER_CAP)
