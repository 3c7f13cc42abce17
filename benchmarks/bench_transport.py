"""Benchmark: H11Pool vs httpx's default AsyncHTTPTransport (httpcore) on trio.

Each "call" is what a sample costs on the wire: POST submit, then POST one result poll, against a
bare h11 server that answers at once. N calls run concurrently (one task each). The server runs in
a separate process, so the client's CPU time (``time.process_time()``) is the client's alone.

    .venv/bin/python benchmarks/bench_transport.py               # N = 200 and 2000
    .venv/bin/python benchmarks/bench_transport.py --calls 500 --repeat 3

Printed per configuration: wall time, calls/s, and client CPU milliseconds per call. Rows:

- ``httpx + H11Pool``: ``httpx.AsyncClient(transport=H11Pool())``.
- ``httpx + AsyncHTTPTransport``: httpx's default transport with max_connections=1000 and
  max_keepalive_connections=1000 (so neither side churns connections).
- ``Transport (SDK) + H11Pool``: the SDK's Transport (headers, retry loop, error mapping) over
  H11Pool: the cost the SDK really pays per call.

The machine is shared (2 cores here), so compare rows of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

import h11
import httpx
import trio

BODY = b'{"request_id": "req-1", "type": "try_again"}'


# -- the server (child process) --------------------------------------------------------------------


async def _serve_connection(stream: trio.SocketStream) -> None:
    h = h11.Connection(h11.SERVER)
    try:
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                h.receive_data(await stream.receive_some(65536))
                continue
            if isinstance(event, h11.ConnectionClosed):
                return
            if isinstance(event, h11.EndOfMessage):
                await stream.send_all(
                    h.send(
                        h11.Response(
                            status_code=200,
                            headers=[
                                (b"Content-Type", b"application/json"),
                                (b"Content-Length", str(len(BODY)).encode()),
                            ],
                        )
                    )
                    + h.send(h11.Data(data=BODY))
                    + h.send(h11.EndOfMessage())
                )
                if h.our_state is not h11.DONE:
                    return
                h.start_next_cycle()
    except (trio.BrokenResourceError, h11.ProtocolError):
        pass
    finally:
        await trio.aclose_forcefully(stream)


async def _serve() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1", backlog=4096)
    print(listeners[0].socket.getsockname()[1], flush=True)
    await trio.serve_listeners(_serve_connection, listeners)


# -- the client ------------------------------------------------------------------------------------


async def _run_calls(call: Callable[[], Awaitable[None]], n: int) -> tuple[float, float, int]:
    """Run n calls at once; returns (wall seconds, client CPU seconds, failed calls)."""
    failed = 0

    async def one() -> None:
        nonlocal failed
        try:
            await call()
        except Exception:  # counted and reported, not fatal: the row shows the failure count
            failed += 1

    wall0, cpu0 = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return time.perf_counter() - wall0, time.process_time() - cpu0, failed


async def _bench(kind: str, base_url: str, n: int, repeat: int) -> list[tuple[float, float, int]]:
    from tinkex_trio._pool import H11Pool
    from tinkex_trio._transport import Transport
    from tinkex_trio.config import Config

    submit = json.dumps({"prompt": [1, 2, 3], "num_samples": 1}).encode()
    poll = json.dumps({"request_id": "req-1"}).encode()
    results = []
    if kind == "sdk":
        transport = Transport(Config(api_key="tml-bench", base_url=base_url, max_retries=0))

        async def call() -> None:
            await transport.request("POST", "/api/v1/asample", content=submit)
            await transport.request("POST", "/api/v1/retrieve_future", content=poll)

        await _run_calls(call, min(n, 200))  # warm-up: opens connections
        for _ in range(repeat):
            results.append(await _run_calls(call, n))
        await transport.aclose()
        return results

    if kind == "h11pool":
        pool: httpx.AsyncBaseTransport = H11Pool()
    else:
        limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
        pool = httpx.AsyncHTTPTransport(limits=limits)
    headers = {"Content-Type": "application/json"}
    async with httpx.AsyncClient(transport=pool, base_url=base_url, timeout=60) as client:

        async def call() -> None:
            (
                await client.post("/api/v1/asample", content=submit, headers=headers)
            ).raise_for_status()
            (
                await client.post("/api/v1/retrieve_future", content=poll, headers=headers)
            ).raise_for_status()

        await _run_calls(call, min(n, 200))
        for _ in range(repeat):
            results.append(await _run_calls(call, n))
    return results


LABELS = {
    "h11pool": "httpx + H11Pool",
    "httpx": "httpx + AsyncHTTPTransport",
    "sdk": "Transport (SDK) + H11Pool",
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, nargs="*", default=[200, 2000])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument(
        "--kinds", nargs="*", default=["h11pool", "httpx", "sdk"], choices=list(LABELS)
    )
    args = parser.parse_args()
    if args.serve:
        trio.run(_serve)
        return

    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--serve"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        base_url = f"http://127.0.0.1:{port}"
        print(
            f"server pid {server.pid} on {base_url}; client pid {os.getpid()}; {os.cpu_count()} CPUs"
        )
        print(
            f"{'transport':<28} {'N':>6} {'wall s':>8} {'calls/s':>9} {'CPU ms/call':>12} {'failed':>7}"
        )
        for n in args.calls:
            for kind in args.kinds:
                for wall, cpu, failed in trio.run(_bench, kind, base_url, n, args.repeat):
                    print(
                        f"{LABELS[kind]:<28} {n:>6} {wall:>8.2f} {n / wall:>9.0f} "
                        f"{1000 * cpu / n:>12.2f} {failed:>7}"
                    )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
