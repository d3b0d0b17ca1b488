"""The MCP tool server of bench/mcp_guard: one tool, `add`, on the official SDK's MCPServer over
streamable HTTP (uvicorn), either protected by agentid_client.mcp.McpGuard (every call a Check
at the agentid server under test) or plain (no authentication at all: the baseline).

usage: mcp_tool_server.py --mode guarded|plain --url URL
                          [--agentid HOST:PORT --key-file FILE --issuer URL]  (guarded)
Logs "mcp tool server serving on HOST (port N)" once it listens; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvicorn
from agentid_client import AgentIdClient
from agentid_client.mcp import McpGuard
from mcp.server.mcpserver import MCPServer


def add(a: int, b: int) -> int:
    return a + b


async def serve(args: argparse.Namespace) -> None:
    host, port = "127.0.0.1", urlsplit(args.url).port or 0
    sock = socket.socket()
    sock.bind((host, port))
    async with contextlib.AsyncExitStack() as stack:
        server: MCPServer[Any]
        if args.mode == "guarded":
            checker = await stack.enter_async_context(AgentIdClient(args.agentid, args.key))
            guard = McpGuard(
                resource_url=args.url, server_name="bench", issuer=args.issuer, client=checker,
                keys=checker,
            )  # fmt: skip
            guard.declare("add", action="tickets.read", resource="ticket/{a}")
            server = guard.mcp_server()
        else:
            server = MCPServer("bench")
        server.add_tool(add)
        # Stateless 2026-07-28 requests answered as JSON: one POST, one answer, as wrk sends.
        app = server.streamable_http_app(json_response=True, stateless_http=True)
        config = uvicorn.Config(app, log_level="warning", access_log=False)
        print(f"mcp tool server serving on {host} (port {sock.getsockname()[1]})", flush=True)
        await uvicorn.Server(config).serve(sockets=[sock])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--mode", choices=("guarded", "plain"), required=True)
    parser.add_argument("--agentid", help="agentid's gRPC address")
    parser.add_argument("--key-file", help="the checker service's API key, in a file")
    parser.add_argument("--issuer", default="")
    parser.add_argument("--url", required=True, help="the server's resource URL (its port)")
    args = parser.parse_args()
    args.key = Path(args.key_file).read_text().strip() if args.key_file else ""
    asyncio.run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
