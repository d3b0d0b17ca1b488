"""A real browser for tests: Debian's `chromium`, headless, driven by `playwright-core` in a
long-lived node process (tests/browser/driver.mjs) that takes one command per JSON line.

Why a helper process rather than one node script per scenario: a test interleaves the browser
with gRPC calls and the server's own state ("the page is open; now the agent asks for a
step-up; the row must appear without a reload"; "approve; now the agent's Check is ALLOW
once"). With the steps in Python the scenario reads top to bottom in one place, assertions use
the harness as every other test does, and the node side stays a thin, generic page driver.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DRIVER = REPO / "tests/browser/driver.mjs"
REQUIRE_BROWSER = "AGENTID_REQUIRE_BROWSER"  # .ci/run sets it: the browser tests never skip there
COMMAND_SLACK = 5.0  # seconds beyond a command's own browser-side timeout
DEFAULT_TIMEOUT = 10.0
MAX_ANSWER_BYTES = 4 * 1024 * 1024  # one answer line (a page's text, its cookies)


class BrowserError(AssertionError):
    """A browser command failed (a selector that never appeared, a navigation error, ...)."""


def chromium_path() -> str | None:
    """The Chromium to drive: $AGENTID_CHROMIUM, else `chromium` on the PATH."""
    return shutil.which(os.environ.get("AGENTID_CHROMIUM") or "chromium")


def missing_for_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if shutil.which("node") is None:
        return "node is not installed"
    for package in ("playwright-core", "oidc-provider"):
        if not (REPO / "node_modules" / package).is_dir():
            return f"{package} is not installed: run npm ci"
    if chromium_path() is None:
        if os.environ.get("AGENTID_CHROMIUM"):
            return f"AGENTID_CHROMIUM={os.environ['AGENTID_CHROMIUM']} is not an executable"
        return "chromium is not installed (apt-get install chromium; .ci/run installs it)"
    return None


class Browser:
    """One page in a fresh browser profile (its own cookies). Selectors are Playwright's (CSS,
    plus e.g. ``text=...``); ``within``: how many seconds the browser waits for the element,
    the page or the URL before the command fails."""

    def __init__(self, process: asyncio.subprocess.Process, log_path: Path) -> None:
        self._process = process
        self.log_path = log_path  # the node process's stderr
        self._next_id = 0

    async def call(self, op: str, *, within: float = DEFAULT_TIMEOUT, **fields: Any) -> Any:
        """Runs one command; its value, or BrowserError with the browser's message."""
        assert self._process.stdin is not None
        assert self._process.stdout is not None
        self._next_id += 1
        command = {"id": self._next_id, "op": op, "timeout_ms": int(within * 1000), **fields}
        self._process.stdin.write(json.dumps(command).encode() + b"\n")
        await self._process.stdin.drain()
        line = await asyncio.wait_for(self._process.stdout.readline(), within + COMMAND_SLACK)
        if not line:
            raise BrowserError(f"the browser driver exited; its log: {self.log_path}")
        answer = json.loads(line)
        assert answer["id"] == command["id"], answer
        if not answer["ok"]:
            raise BrowserError(f"{op} {fields}: {answer['error']}")
        return answer["value"]

    async def goto(self, url: str, within: float = DEFAULT_TIMEOUT) -> int:
        """Loads ``url`` (following redirects); the final response's status."""
        result = await self.call("goto", url=url, within=within)
        return int(result["status"])

    async def reload(self) -> int:
        return int((await self.call("reload"))["status"])

    async def url(self) -> str:
        return str(await self.call("url"))

    async def wait_for_url(self, prefix: str, within: float = DEFAULT_TIMEOUT) -> str:
        """Waits until the page's URL begins with ``prefix``; that URL."""
        return str(await self.call("wait_for_url", prefix=prefix, within=within))

    async def fill(self, selector: str, value: str) -> None:
        await self.call("fill", selector=selector, value=value)

    async def click(
        self, selector: str, *, navigates: bool = False, within: float = DEFAULT_TIMEOUT
    ) -> str:
        """Clicks the element; with ``navigates`` (a link, a form's button) waits until the page
        it leads to, after any redirects, has loaded. The page's URL then."""
        return str(await self.call("click", selector=selector, navigates=navigates, within=within))

    async def wait_for(
        self, selector: str, state: str = "visible", within: float = DEFAULT_TIMEOUT
    ) -> None:
        """Waits until an element matching ``selector`` is in ``state`` (visible, hidden,
        attached, detached)."""
        await self.call("wait_for", selector=selector, state=state, within=within)

    async def count(self, selector: str) -> int:
        return int(await self.call("count", selector=selector))

    async def text(self, selector: str) -> str:
        """The rendered text of the first element matching ``selector``."""
        return str(await self.call("text", selector=selector))

    async def attribute(self, selector: str, name: str) -> str | None:
        value = await self.call("attribute", selector=selector, name=name)
        return None if value is None else str(value)

    async def evaluate(self, expression: str) -> Any:
        """Evaluates a JavaScript expression in the page; its JSON value."""
        return await self.call("evaluate", expression=expression)

    async def cookies(self) -> list[dict[str, Any]]:
        return list(await self.call("cookies"))

    async def screenshot(self, path: Path) -> Path:
        await self.call("screenshot", path=str(path), within=30)
        return path

    async def page_log(self) -> list[str]:
        """The page's console errors, uncaught exceptions and failed requests since last asked."""
        return [str(line) for line in await self.call("log")]

    async def close(self) -> None:
        if self._process.stdin is not None and not self._process.stdin.is_closing():
            self._process.stdin.close()
        try:
            await asyncio.wait_for(self._process.wait(), 15)
        except TimeoutError:
            self._process.kill()
            await self._process.wait()


@contextlib.asynccontextmanager
async def launched_browser(directory: Path, name: str = "browser") -> AsyncIterator[Browser]:
    """A headless Chromium with a fresh profile; its driver's stderr in ``directory``/name.log."""
    chromium = chromium_path()
    assert chromium is not None, missing_for_browser()
    log_path = directory / f"{name}.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            "node", str(DRIVER), cwd=REPO, env={**os.environ, "AGENTID_CHROMIUM": chromium},
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log,
            limit=MAX_ANSWER_BYTES,
        )  # fmt: skip
    browser = Browser(process, log_path)
    try:
        await browser.call("url", within=30)  # the browser has started
        yield browser
    finally:
        await browser.close()
