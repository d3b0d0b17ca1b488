"""The baseline of bench/revocation_push: a bare grpc.aio server-stream push, no proto files.

Two methods, bytes in and out (no serializers):

* ``/pushbaseline.Push/Subscribe`` (server-streaming): first an 8-byte zero sequence (the
  counterpart of agentid's snapshot: the subscription is registered once it arrived), then every
  published message;
* ``/pushbaseline.Push/Publish`` (unary): numbers the request with the next sequence (gap-free,
  from 1), puts ``sequence (8 bytes, big-endian) + request[8:]`` in every subscriber's queue, yields
  to the event loop once so every subscriber's stream writes it, then answers the sequence.

The yield makes the order the same as agentid's Revoke: there the commit callback hands the event
to every watcher and only then resolves the Revoke call, so the watchers' stream writes start
before the acknowledgement is sent. Without it this server would acknowledge first.

usage: push_baseline_server.py [--listen 127.0.0.1:0] [--no-yield]
Logs "push baseline serving on HOST (port N)" once it listens; stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator

import grpc

SERVICE = "pushbaseline.Push"
SUBSCRIBE = f"/{SERVICE}/Subscribe"
PUBLISH = f"/{SERVICE}/Publish"
HELLO = bytes(8)  # sequence 0: subscribed


class Broker:
    """Subscribers' queues and the publish sequence."""

    def __init__(self, yield_before_ack: bool) -> None:
        self._queues: set[asyncio.Queue[bytes]] = set()
        self._sequence = 0
        self._yield = yield_before_ack

    async def subscribe(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> AsyncIterator[bytes]:
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._queues.add(queue)
        try:
            yield HELLO
            while True:
                yield await queue.get()
        finally:
            self._queues.discard(queue)

    async def publish(
        self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
    ) -> bytes:
        self._sequence += 1
        sequence = self._sequence.to_bytes(8, "big")
        message = sequence + request[8:]
        for queue in self._queues:
            queue.put_nowait(message)
        if self._yield:
            await asyncio.sleep(0)
        return sequence


async def serve(listen: str, yield_before_ack: bool) -> None:
    broker = Broker(yield_before_ack)
    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Subscribe": grpc.unary_stream_rpc_method_handler(broker.subscribe),
            "Publish": grpc.unary_unary_rpc_method_handler(broker.publish),
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port(listen)
    await server.start()
    host = listen.rsplit(":", 1)[0]
    print(f"push baseline serving on {host} (port {port})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    await server.stop(grace=1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--listen", default="127.0.0.1:0")
    parser.add_argument(
        "--no-yield",
        dest="yield_before_ack",
        action="store_false",
        help="answer Publish without first letting the subscribers' streams write",
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, args.yield_before_ack))
    return 0


if __name__ == "__main__":
    sys.exit(main())
