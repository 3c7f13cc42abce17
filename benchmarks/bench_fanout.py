"""N concurrent `sample` calls: tinkex_trio, its floor and the official SDK, side by side.

Against one instant stub server (`_stub_server.py`, pinned to core 0), each client a fresh
process pinned to core 1, rounds interleaved (`_side_by_side.py`), medians reported:

* ``tinkex_trio``: `SamplingClient.sample` (submit + one result poll per call);
* ``h11 floor``: the same two requests per call with bare h11 on trio, nothing else;
* ``official pyqwest`` / ``official httpx``: the official `tinker` 0.38 SDK's
  `sample_async` with its Rust transport and with httpx (the stub's `client/config` picks).

Prints, per N: calls/s and client CPU ms per call (median), the noise (max/min over rounds),
and our ratios to the official SDK's faster transport and to the floor.

    .venv/bin/python benchmarks/bench_fanout.py                  # N = 200, 2000; 5 rounds
    .venv/bin/python benchmarks/bench_fanout.py --n 2000 --rounds 7 --no-official

A second table (PROTOCOL.md 4.8) counts HTTP requests per completed sample when samples take
longer than the server's long-poll window: the local backend in-process (FakeEngine, each
batch 2 s, poll window 0.5 s), once with per-sample `retrieve_future` long-polls and once with
the session-wide `retrieve_futures` poller (`--slow-n 0` skips it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _side_by_side import Client, interleave, official, ours, stub_server

from tinkex_trio import Config, ModelInput, open_service


async def slow_samples(n: int, session_wide: bool) -> tuple[int, dict[str, int]]:
    """(completed samples, requests by endpoint) for n concurrent slow samples."""
    import tempfile

    import httpx

    from tinkex_trio import SamplingParams
    from tinkex_trio.local import LocalBackendSettings
    from tinkex_trio.local._app import open_backend_app
    from tinkex_trio.local.testing import FAKE_MODEL_NAME, FakeEngine

    counts: dict[str, int] = {}

    class Counting(httpx.AsyncBaseTransport):
        def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
            self.inner = inner

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            name = request.url.path.rsplit("/", 1)[1]
            counts[name] = counts.get(name, 0) + 1
            return await self.inner.handle_async_request(request)

    done = 0
    with tempfile.TemporaryDirectory() as data_dir:
        async with open_backend_app(
            LocalBackendSettings(
                data_dir=Path(data_dir),
                api_key="tml-bench",
                poll_timeout=0.5,
                client_flags={"sample_use_retrieve_futures": session_wide},
            ),
            FakeEngine(delay=2.0),
        ) as app:
            config = Config(api_key="tml-bench", base_url="http://bench", telemetry=False)
            transport = Counting(httpx.ASGITransport(app=app))
            async with open_service(config, transport=transport) as service:
                sampler = await service.create_sampling_client(base_model=FAKE_MODEL_NAME)
                counts.clear()

                async def one(i: int) -> None:
                    nonlocal done
                    params = SamplingParams(max_tokens=2)
                    await sampler.sample(ModelInput.from_ints([i + 1]), 1, params)
                    done += 1

                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(one, i)
    return done, counts


def side_by_side(ns: list[int], rounds: int, with_official: bool, transports: list[str]) -> None:
    with stub_server() as stub:
        for n in ns:
            clients = [
                Client("tinkex_trio", ours("fanout", stub.httpx_url, str(n))),
                Client("h11 floor", ours("h11", stub.httpx_url, str(n))),
            ]
            if with_official:
                urls = {"pyqwest": stub.pyqwest_url, "httpx": stub.httpx_url}
                for label in transports:
                    url = urls[label]
                    command = official("fanout", url, str(n))
                    if command is not None:
                        clients.append(Client(f"official {label}", command))
            interleave(clients, rounds)
            print(f"N = {n}, {rounds} interleaved rounds, medians")
            print(f"{'client':<18} {'calls/s':>9} {'CPU ms/call':>12} {'noise':>7}")
            rate = {c.label: n / c.median("wall") for c in clients}
            cpu = {c.label: 1000 * c.median("cpu") / n for c in clients}
            for c in clients:
                print(
                    f"{c.label:<18} {rate[c.label]:>9.0f} {cpu[c.label]:>12.2f} "
                    f"{c.spread('wall'):>6.1f}x"
                )
            ref = max(
                (c for c in clients if c.label.startswith("official")),
                default=None,
                key=lambda c: rate[c.label],
            )
            ours_rate, ours_cpu = rate["tinkex_trio"], cpu["tinkex_trio"]
            line = (
                f"tinkex_trio / h11 floor: calls/s {ours_rate / rate['h11 floor']:.2f}x, "
                f"CPU {ours_cpu / cpu['h11 floor']:.2f}x"
            )
            if ref is not None:
                line += (
                    f"; / {ref.label}: calls/s {ours_rate / rate[ref.label]:.1f}x, "
                    f"CPU {ours_cpu / cpu[ref.label]:.2f}x"
                )
            print(line)
            print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[200, 2000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-official", action="store_true")
    parser.add_argument(
        "--official-transports",
        nargs="*",
        choices=["pyqwest", "httpx"],
        default=["pyqwest", "httpx"],
    )
    parser.add_argument("--slow-n", type=int, default=200)
    args = parser.parse_args()
    if args.n:
        side_by_side(args.n, args.rounds, not args.no_official, args.official_transports)
    if args.slow_n:
        print()
        print(f"slow samples (N={args.slow_n}, 2 s batches, 0.5 s poll window): requests/sample")
        print(
            f"{'polling':<18} {'total':>7} {'asample':>8} {'retrieve_future':>16} "
            f"{'retrieve_futures':>17}"
        )
        for label, session_wide in (("per-sample", False), ("retrieve_futures", True)):
            done, counts = trio.run(slow_samples, args.slow_n, session_wide)
            total = sum(counts.values())
            print(
                f"{label:<18} {total / done:>7.2f} {counts.get('asample', 0) / done:>8.2f} "
                f"{counts.get('retrieve_future', 0) / done:>16.2f} "
                f"{counts.get('retrieve_futures', 0) / done:>17.3f}"
            )


if __name__ == "__main__":
    main()
