"""Revocation push: Revoke ack -> watcher receipt on agentid vs a bare grpc.aio server-stream push.

Two servers, each in its own process, both running for the whole benchmark:

* agentid (`agentid serve`, a service key with role `admin`, which may Revoke and watch), with
  sessions minted through Delegate beforehand;
* the baseline, bench/push_baseline_server.py: a unary Publish that puts a message in every
  subscriber's queue and lets their server-streams write it before it answers, and a
  server-streaming Subscribe.

For each server and each number of watchers N (1 and 100), a watcher process (this script,
`_watch`) opens N streams, one connection each (WatchRevocations with after_sequence=0 and its
snapshot consumed, or Subscribe and its first message), and stamps every message it receives with
CLOCK_MONOTONIC. This process, otherwise idle, is the publisher: one call at a time (Revoke of a
distinct session, or Publish), stamped when it returns (the ack); it waits until every watcher
received that call's sequence, pauses briefly, and calls again. Latency = receipt - ack per
(call, watcher); it is negative when a watcher had the event before the publisher had its answer
(both servers hand the event to the streams before answering). Both sides use the same client code:
raw bytes over generic stubs, the same metadata, one connection per stream.

The two servers alternate in rounds (the order flips every round); every round has its own watcher
process and warm-up calls that are not counted. Percentiles pool the rounds' samples; the ratios are
agentid / baseline at p99 (bar: <= 1.5 at 100 watchers). Figures go to stdout and
bench/out/revocation_push.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import random
import re
import resource
import signal
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import harness
from harness import ServerProcess, log

HERE = Path(__file__).resolve().parent
SCRIPT = Path(__file__).resolve()
BASELINE_SERVER = HERE / "push_baseline_server.py"
BASELINE_PORT_LINE = re.compile(r"push baseline serving on \S+ \(port (\d+)\)")
BAR_P99_RATIO = 1.5
BAR_WATCHERS = 100
KINDS = ("agentid", "baseline")

AGENTID_SERVICE = "/agentid.v1.AgentIdentityService"
METHODS = {
    # kind: (watch method, publish method)
    "agentid": (f"{AGENTID_SERVICE}/WatchRevocations", f"{AGENTID_SERVICE}/Revoke"),
    "baseline": ("/pushbaseline.Push/Subscribe", "/pushbaseline.Push/Publish"),
}
# Every stream on its own connection, as separate watching services would have.
CHANNEL_OPTIONS = (("grpc.use_local_subchannel_pool", 1),)


def now_ns() -> int:
    """CLOCK_MONOTONIC: one clock for every process on the machine."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# -- the wire: what each kind sends and how its sequence is read -----------------------------------


def watch_request(kind: str) -> bytes:
    if kind == "agentid":
        from agentid.v1 import agentid_pb2 as pb

        return pb.WatchRevocationsRequest(after_sequence=0).SerializeToString()
    return b""


def watch_message(kind: str, message: bytes) -> tuple[bool, int]:
    """(is the snapshot / subscription confirmation, sequence) of one streamed message."""
    if kind == "agentid":
        from agentid.v1 import agentid_pb2 as pb

        response = pb.WatchRevocationsResponse.FromString(message)
        if response.HasField("snapshot"):
            return True, response.snapshot.sequence
        return False, response.event.sequence
    sequence = int.from_bytes(message[:8], "big")
    return sequence == 0, sequence


def revoke_request(session_id: str) -> bytes:
    from agentid.v1 import agentid_pb2 as pb

    return pb.RevokeRequest(session_id=session_id, reason="benchmark").SerializeToString()


def ack_sequence(kind: str, response: bytes) -> int:
    if kind == "agentid":
        from agentid.v1 import agentid_pb2 as pb

        answer = pb.RevokeResponse.FromString(response)
        if len(answer.session_ids) != 1:
            raise RuntimeError(f"Revoke revoked {len(answer.session_ids)} sessions, not 1")
        return answer.revocation_sequence
    return int.from_bytes(response[:8], "big")


def typical_event_bytes() -> int:
    """The size of a WatchRevocations event like the ones this benchmark causes, so the baseline
    pushes messages of the same size."""
    from agentid.v1 import agentid_pb2 as pb

    event = pb.RevocationEvent(
        sequence=1000, session_id="ses_" + "0" * 26, serial=1000, user_id="bench-user",
        reason="benchmark",
    )  # fmt: skip
    event.revoked_at.FromNanoseconds(time.time_ns())
    event.expires_at.FromSeconds(int(time.time()) + 3600)
    return pb.WatchRevocationsResponse(event=event).ByteSize()


def read_metadata(path: Path) -> tuple[tuple[str, str], ...]:
    return tuple(json.loads(path.read_text()).items())


# -- the watcher process ---------------------------------------------------------------------------


async def watch_many(kind: str, port: int, watchers: int, metadata_file: Path, out: Path) -> int:
    """N streams; prints `ready` once every stream had its snapshot, `got S` once every stream
    received sequence S; on SIGTERM writes the receipt times to ``out``."""
    method, _ = METHODS[kind]
    request = watch_request(kind)
    metadata = read_metadata(metadata_file)
    receipts: dict[int, list[int]] = {}
    sizes: list[int] = []
    snapshots = 0

    def say(line: str) -> None:
        os.write(sys.stdout.fileno(), f"{line}\n".encode())

    async def watch(channel: grpc.aio.Channel) -> None:
        nonlocal snapshots
        stream = channel.unary_stream(method, request_serializer=None, response_deserializer=None)
        call = stream(request, metadata=metadata)
        async for message in call:
            received = now_ns()
            snapshot, sequence = watch_message(kind, message)
            if snapshot:
                snapshots += 1
                if snapshots == watchers:
                    say("ready")
                continue
            times = receipts.setdefault(sequence, [])
            times.append(received)
            sizes.append(len(message))
            if len(times) == watchers:
                say(f"got {sequence}")
        raise RuntimeError("a stream ended")

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=CHANNEL_OPTIONS)
        for _ in range(watchers)
    ]
    gc.collect()
    gc.disable()  # a collection in this process would delay receipts: client noise, not server
    tasks = [asyncio.create_task(watch(channel)) for channel in channels]
    everything: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait()), *tasks]
    try:
        await asyncio.wait(everything, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done() and task.exception() is not None:
                say(f"error {task.exception()!r}")
                return 1
    finally:
        for task in everything:
            task.cancel()
        await asyncio.gather(*everything, return_exceptions=True)
        for channel in channels:
            await channel.close(None)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    harness.write_json_file(
        out,
        {
            "receipts": {str(sequence): times for sequence, times in receipts.items()},
            "mean_message_bytes": statistics.fmean(sizes) if sizes else 0,
            "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "messages": len(sizes),
        },
    )
    return 0


# -- the publisher ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    kind: str
    server: ServerProcess
    metadata_file: Path


@dataclass
class Block:
    """One round of one kind at one N: the counted calls and their watchers' receipts."""

    kind: str
    watchers: int
    sent: list[int]  # ns, per counted call
    acked: list[int]
    receipts: list[list[int]]  # ns, per counted call, one per watcher
    server_cpu_s: float
    watcher_cpu_s: float
    mean_message_bytes: float

    def latencies_ms(self) -> list[float]:
        return [
            (r - a) / 1e6 for a, times in zip(self.acked, self.receipts, strict=True) for r in times
        ]


class LineReader:
    """The watcher process's status lines, with a deadline."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        self._stdout = process.stdout

    async def expect(self, prefix: str, within: float) -> str:
        async with asyncio.timeout(within):
            raw = await self._stdout.readline()
        line = raw.decode().strip()
        if not line.startswith(prefix):
            raise RuntimeError(f"the watcher process said {line or 'nothing (it ended)'!r}")
        return line[len(prefix) :]


async def measure_block(
    target: Target,
    watchers: int,
    requests: Sequence[bytes],
    *,
    warmup: int,
    gap: float,
    directory: Path,
    rng: random.Random,
) -> Block:
    out = directory / f"receipts-{target.kind}-{watchers}.json"
    out.unlink(missing_ok=True)
    _, publish_method = METHODS[target.kind]
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(SCRIPT), "_watch", "--kind", target.kind,
        "--port", str(target.server.port), "--watchers", str(watchers),
        "--metadata-file", str(target.metadata_file), "--out", str(out),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        lines = LineReader(process)
        await lines.expect("ready", within=120)
        metadata = read_metadata(target.metadata_file)
        sent: list[int] = []
        acked: list[int] = []
        sequences: list[int] = []
        cpu_before = 0.0
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{target.server.port}", options=CHANNEL_OPTIONS
        ) as channel:
            publish = channel.unary_unary(
                publish_method, request_serializer=None, response_deserializer=None
            )
            for index, request in enumerate(requests):
                if index == warmup:
                    cpu_before = target.server.cpu_seconds()
                started = now_ns()
                response = await publish(request, metadata=metadata, timeout=30)
                answered = now_ns()
                sequence = ack_sequence(target.kind, response)
                got = int(await lines.expect("got ", within=30))
                if got != sequence:
                    raise RuntimeError(f"published sequence {sequence}, the watchers got {got}")
                if index >= warmup:
                    sent.append(started)
                    acked.append(answered)
                    sequences.append(sequence)
                await asyncio.sleep(gap * rng.uniform(0.5, 1.5))
        server_cpu = target.server.cpu_seconds() - cpu_before
        process.send_signal(signal.SIGTERM)
        if await asyncio.wait_for(process.wait(), 30) != 0:
            raise RuntimeError(f"the watcher process failed ({process.returncode})")
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    data = json.loads(out.read_text())
    receipts = [sorted(data["receipts"][str(sequence)]) for sequence in sequences]
    return Block(
        kind=target.kind,
        watchers=watchers,
        sent=sent,
        acked=acked,
        receipts=receipts,
        server_cpu_s=server_cpu,
        watcher_cpu_s=float(data["cpu_seconds"]),
        mean_message_bytes=float(data["mean_message_bytes"]),
    )


# -- figures ---------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _ms(value: float) -> float:
    return round(value, 4)


def summarize(blocks: Sequence[Block]) -> dict[str, Any]:
    """Pooled figures of one kind at one N, in milliseconds."""
    signed = [x for block in blocks for x in block.latencies_ms()]
    clamped = [max(0.0, x) for x in signed]
    last = [
        (max(times) - a) / 1e6
        for block in blocks
        for a, times in zip(block.acked, block.receipts, strict=True)
    ]
    call = [(a - s) / 1e6 for block in blocks for s, a in zip(block.sent, block.acked, strict=True)]
    sent_to_receipt = [
        (r - s) / 1e6
        for block in blocks
        for s, times in zip(block.sent, block.receipts, strict=True)
        for r in times
    ]
    calls = sum(len(block.acked) for block in blocks)
    return {
        "calls": calls,
        "samples": len(signed),
        "ack_to_receipt_ms": {
            "p50": _ms(percentile(signed, 50)),
            "p90": _ms(percentile(signed, 90)),
            "p99": _ms(percentile(signed, 99)),
            "min": _ms(min(signed)),
            "max": _ms(max(signed)),
            "negative_share": round(sum(x < 0 for x in signed) / len(signed), 3),
        },
        "ack_to_receipt_clamped_ms": {
            "p50": _ms(percentile(clamped, 50)),
            "p99": _ms(percentile(clamped, 99)),
        },
        "ack_to_last_watcher_ms": {
            "p50": _ms(percentile(last, 50)),
            "p99": _ms(percentile(last, 99)),
        },
        "call_ms": {"p50": _ms(percentile(call, 50)), "p99": _ms(percentile(call, 99))},
        "call_start_to_receipt_ms": {
            "p50": _ms(percentile(sent_to_receipt, 50)),
            "p99": _ms(percentile(sent_to_receipt, 99)),
        },
        "server_cpu_us_per_call": round(sum(b.server_cpu_s for b in blocks) / calls * 1e6, 1),
        "watcher_process_cpu_s": round(sum(b.watcher_cpu_s for b in blocks), 3),
        "mean_message_bytes": round(statistics.fmean(b.mean_message_bytes for b in blocks), 1),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    if denominator <= 0:
        return None  # the baseline's figure is zero or negative: no meaningful ratio
    return round(numerator / denominator, 3)


def ratios(agentid: dict[str, Any], baseline: dict[str, Any], watchers: int) -> dict[str, Any]:
    signed = _ratio(agentid["ack_to_receipt_ms"]["p99"], baseline["ack_to_receipt_ms"]["p99"])
    clamped = _ratio(
        agentid["ack_to_receipt_clamped_ms"]["p99"], baseline["ack_to_receipt_clamped_ms"]["p99"]
    )
    result: dict[str, Any] = {
        "p99_signed": signed,
        "p99_clamped": clamped,
        "p50_signed": _ratio(
            agentid["ack_to_receipt_ms"]["p50"], baseline["ack_to_receipt_ms"]["p50"]
        ),
        "last_watcher_p99": _ratio(
            agentid["ack_to_last_watcher_ms"]["p99"], baseline["ack_to_last_watcher_ms"]["p99"]
        ),
        "call_start_to_receipt_p99": _ratio(
            agentid["call_start_to_receipt_ms"]["p99"], baseline["call_start_to_receipt_ms"]["p99"]
        ),
    }
    if watchers == BAR_WATCHERS:
        headline = signed if signed is not None else clamped
        result["bar"] = {
            "ratio": headline,
            "bar": f"<= {BAR_P99_RATIO}",
            "met": headline is not None and headline <= BAR_P99_RATIO,
        }
    return result


def per_round_p99_ratios(blocks: dict[str, list[Block]]) -> list[float | None]:
    pairs = zip(blocks["agentid"], blocks["baseline"], strict=True)
    return [
        _ratio(percentile(a.latencies_ms(), 99), percentile(b.latencies_ms(), 99)) for a, b in pairs
    ]


# -- the run ---------------------------------------------------------------------------------------


async def measure_all(
    targets: dict[str, Target], session_ids: list[str], args: argparse.Namespace
) -> dict[int, dict[str, list[Block]]]:
    rng = random.Random(7)
    per_block = args.warmup + args.calls
    payload = bytes(max(0, typical_event_bytes() - 8))
    baseline_requests = [bytes(8) + payload] * per_block
    sessions = iter(session_ids)
    results: dict[int, dict[str, list[Block]]] = {}
    for watchers in args.watchers:
        results[watchers] = {kind: [] for kind in KINDS}
        for round_no in range(args.rounds):
            order = KINDS if round_no % 2 == 0 else KINDS[::-1]
            for kind in order:
                if kind == "agentid":
                    requests = [revoke_request(next(sessions)) for _ in range(per_block)]
                else:
                    requests = baseline_requests
                block = await measure_block(
                    targets[kind], watchers, requests, warmup=args.warmup, gap=args.gap,
                    directory=args.directory, rng=rng,
                )  # fmt: skip
                results[watchers][kind].append(block)
                p = [percentile(block.latencies_ms(), q) for q in (50, 99)]
                log(
                    f"  N={watchers:<3} round {round_no + 1}/{args.rounds} {kind:8} "
                    f"ack->receipt p50 {p[0]:7.3f} ms  p99 {p[1]:7.3f} ms  "
                    f"server CPU {block.server_cpu_s / len(block.acked) * 1e6:6.0f} us/call"
                )
    return results


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of process ``pid`` on ``cpus`` (threads started later inherit it)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(task.name), cpus)


def run(args: argparse.Namespace) -> dict[str, Any]:
    machine = harness.machine_info()
    code = harness.code_under_test(args.commit)
    per_block = args.warmup + args.calls
    needed = per_block * args.rounds * len(args.watchers)
    with harness.temporary_directory("agentid-bench-push-") as directory:
        args.directory = directory
        source = harness.export_commit(args.commit, directory / "src") if args.commit else None
        deployment = harness.create_deployment(
            directory / "agentid", token_cache_size=1024, roles=["admin"]
        )
        agentid_argv = harness.serve_argv(args.venv, deployment.config)
        baseline_argv = [str(args.venv / "bin" / "python"), str(BASELINE_SERVER)]
        if args.baseline_no_yield:
            baseline_argv.append("--no-yield")
        with (
            harness.running_server(agentid_argv, directory / "agentid.log", source) as server,
            harness.running_server(
                baseline_argv, directory / "baseline.log", port_line=BASELINE_PORT_LINE
            ) as baseline,
        ):
            log(f"agentid pid {server.pid} on 127.0.0.1:{server.port}")
            log(f"baseline pid {baseline.pid} on 127.0.0.1:{baseline.port}")
            if args.pin:
                pin(server.pid, {0})
                pin(baseline.pid, {0})
                pin(os.getpid(), {1})  # the watcher processes inherit it
            session_ids = harness.delegate_sessions(server.port, deployment.user_token(), needed)
            log(f"minted {len(session_ids)} sessions through Delegate")
            targets = {
                "agentid": Target("agentid", server, deployment.metadata_file),
                "baseline": Target("baseline", baseline, deployment.metadata_file),
            }
            gc.collect()
            gc.disable()  # nor in the publisher (a few MB of garbage at most)
            try:
                blocks = asyncio.run(measure_all(targets, session_ids, args))
            finally:
                gc.enable()
        harness.check_server_log(directory / "agentid.log", "agentid")
        harness.check_server_log(directory / "baseline.log", "baseline")

    by_watchers: dict[str, Any] = {}
    for watchers, kinds in blocks.items():
        figures = {kind: summarize(kinds[kind]) for kind in KINDS}
        by_watchers[str(watchers)] = {
            **figures,
            "ratios": ratios(figures["agentid"], figures["baseline"], watchers),
            "per_round_p99_ratios": per_round_p99_ratios(kinds),
        }
    report: dict[str, Any] = {
        "benchmark": "revocation_push",
        "machine": machine,
        "code": code,
        "server": {
            "venv": str(args.venv),
            "packages": harness.python_packages(
                args.venv / "bin" / "python", ["grpcio", "protobuf", "SQLAlchemy"]
            ),
            "event_loop": "asyncio",
            "baseline_yields_before_ack": not args.baseline_no_yield,
        },
        "client": {
            "watcher_process": "one asyncio process, one connection per stream",
            "publisher": "this process, one call at a time",
            "rounds": args.rounds,
            "calls_per_round": args.calls,
            "warmup_calls_per_round": args.warmup,
            "gap_ms": args.gap * 1000,
            "clock": "CLOCK_MONOTONIC",
        },
        "watchers": by_watchers,
    }
    few, many = min(blocks), max(blocks)
    if many > few:  # what one more watcher costs the server per call
        report["server_cpu_us_per_extra_watcher"] = {
            kind: round(
                (
                    by_watchers[str(many)][kind]["server_cpu_us_per_call"]
                    - by_watchers[str(few)][kind]["server_cpu_us_per_call"]
                )
                / (many - few),
                1,
            )
            for kind in KINDS
        }
    return report


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def print_summary(report: dict[str, Any]) -> None:
    client = report["client"]
    print(
        f"Revoke/Publish ack -> watcher receipt, ms (signed; negative: received before the ack); "
        f"{client['rounds']} rounds x {client['calls_per_round']} calls per kind and N"
    )
    columns = "p50   p99  p50+  p99+  last p99  call p50  call p99  CPU us/call"
    print(f"{'':14}{columns:>72}")
    for watchers, by_kind in report["watchers"].items():
        for kind in KINDS:
            f = by_kind[kind]
            a, c = f["ack_to_receipt_ms"], f["ack_to_receipt_clamped_ms"]
            print(
                f"N={watchers:<3} {kind:9}{a['p50']:>9.3f}{a['p99']:>9.3f}{c['p50']:>7.3f}"
                f"{c['p99']:>7.3f}{f['ack_to_last_watcher_ms']['p99']:>10.3f}"
                f"{f['call_ms']['p50']:>10.3f}{f['call_ms']['p99']:>10.3f}"
                f"{f['server_cpu_us_per_call']:>13.0f}"
            )
        r = by_kind["ratios"]
        line = (
            f"N={watchers:<3} agentid / baseline p99: {_fmt(r['p99_signed'])} "
            f"(clamped {_fmt(r['p99_clamped'])}, per round "
            f"{', '.join(_fmt(x) for x in by_kind['per_round_p99_ratios'])})"
        )
        if "bar" in r:
            verdict = "met" if r["bar"]["met"] else "NOT MET"
            line += f"; bar {r['bar']['bar']}: {verdict}"
        print(line)
    if "server_cpu_us_per_extra_watcher" in report:
        extra = report["server_cpu_us_per_extra_watcher"]
        print(
            "server CPU per extra watcher per call: "
            + ", ".join(f"{kind} {extra[kind]:.0f} us" for kind in KINDS)
        )
    print("(p50+/p99+: of max(0, latency); last: the last of the N watchers; call: the call's own")
    print(" round trip; CPU: the server process's, per counted call)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_watch"]:
        child = argparse.ArgumentParser(prog="revocation_push.py _watch")
        child.add_argument("--kind", choices=KINDS, required=True)
        child.add_argument("--port", type=int, required=True)
        child.add_argument("--watchers", type=int, required=True)
        child.add_argument("--metadata-file", type=Path, required=True)
        child.add_argument("--out", type=Path, required=True)
        a = child.parse_args(argv[1:])
        return asyncio.run(watch_many(a.kind, a.port, a.watchers, a.metadata_file, a.out))
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--venv", type=Path, default=harness.MAIN_VENV, help="servers' venv")
    parser.add_argument(
        "--commit", help="measure this revision's server/ (git archive), not the work tree"
    )
    parser.add_argument("--watchers", type=int, nargs="+", default=[1, 100])
    parser.add_argument(
        "--baseline-no-yield",
        action="store_true",
        help="the baseline answers Publish before its subscribers' streams write (diagnostic)",
    )
    parser.add_argument(
        "--pin", action="store_true", help="servers on CPU 0, publisher and watchers on CPU 1"
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=100, help="counted calls per round")
    parser.add_argument("--warmup", type=int, default=15, help="uncounted calls per round")
    parser.add_argument("--gap", type=float, default=0.003, help="mean pause between calls, s")
    parser.add_argument("--out", type=Path, default=harness.OUT / "revocation_push.json")
    args = parser.parse_args(argv)
    harness.exit_on_signals()
    return harness.finish(run(args), args.out, print_summary)


if __name__ == "__main__":
    sys.exit(main())
