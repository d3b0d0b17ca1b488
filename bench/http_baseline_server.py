"""The comparison server of bench/http_front_door: uvicorn + Starlette serving one static document.

Answers ``GET /.well-known/openid-configuration`` with the bytes of a file (agentid's discovery
document, fetched from the server under test) and the headers agentid's door sends with it, so
the two servers differ only in their HTTP stack. It runs from a throwaway venv
(bench/out/venv-starlette): uvicorn and Starlette are no dependency of agentid.

Settings chosen to match agentid's door, not to win: the standard asyncio event loop (agentid
runs under asyncio unless its `perf` extra's uvloop is installed) and uvicorn's httptools parser
(a C parser, as aiohttp's llhttp is), no access log. The socket is bound here and handed to
uvicorn, so port 0 works and the port is known before the log line that names it.

usage: http_baseline_server.py --document FILE [--listen 127.0.0.1:0] [--max-age N]
Logs "starlette baseline serving on HOST (port N)" once it listens; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from pathlib import Path
from typing import Any

import uvicorn  # type: ignore[import-not-found, unused-ignore]
from starlette.applications import Starlette  # type: ignore[import-not-found, unused-ignore]
from starlette.responses import Response  # type: ignore[import-not-found, unused-ignore]
from starlette.routing import Route  # type: ignore[import-not-found, unused-ignore]

DISCOVERY_PATH = "/.well-known/openid-configuration"


def application(document: bytes, max_age: int) -> Any:
    """One route, building its response per request from precomputed bytes, as agentid's
    door builds a web.Response per request from its precomputed string."""
    headers = {"Cache-Control": f"public, max-age={max_age}"}

    async def discovery(request: Any) -> Any:
        return Response(document, media_type="application/json", headers=headers)

    return Starlette(routes=[Route(DISCOVERY_PATH, discovery, methods=["GET"])])


async def serve(listen: str, document: bytes, max_age: int) -> None:
    host, _, port = listen.rpartition(":")
    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP
    # (and accepted ones inherit it); without it Nagle and delayed ACKs add 40 ms to each answer
    # that uvicorn writes in two parts (headers, body).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    config = uvicorn.Config(
        application(document, max_age),
        loop="asyncio",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        backlog=1024,
    )
    server = uvicorn.Server(config)
    bound = sock.getsockname()[1]
    print(f"starlette baseline serving on {host} (port {bound})", flush=True)
    await server.serve(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--document", type=Path, required=True)
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument("--max-age", type=int, default=300)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.listen, args.document.read_bytes(), args.max_age))
    return 0


if __name__ == "__main__":
    sys.exit(main())
