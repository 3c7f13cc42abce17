"""N concurrent `sample` calls against an instant server on 127.0.0.1.

The server (the test suite's in-memory fake Tinker behind the scriptable HTTP/1.1 server) runs
in a child process so that the client's CPU time is measured alone. Prints, per N: wall time,
calls/s, HTTP requests per call and client CPU seconds per call.

    .venv/bin/python benchmarks/bench_fanout.py            # N = 200, 1000, 2000
    .venv/bin/python benchmarks/bench_fanout.py --n 500 --repeat 3

A second table (PROTOCOL.md 4.8) counts HTTP requests per completed sample when samples take
longer than the server's long-poll window: the local backend in-process (FakeEngine, each
batch 2 s, poll window 0.5 s), once with per-sample `retrieve_future` long-polls and once with
the session-wide `retrieve_futures` poller (`--slow-n 0` skips it).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from tinkex_trio import Config, ModelInput, open_service


def _serve(port_queue: multiprocessing.Queue[int]) -> None:
    from fake_tinker import FakeTinker
    from fault_server import serve_fault_server

    fake = FakeTinker()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                lambda task_status: serve_fault_server(
                    handler=fake.fault_handler, task_status=task_status
                )
            )
            port_queue.put(server.port)

    trio.run(main)


async def run_once(base_url: str, n: int) -> tuple[float, float, int]:
    config = Config(api_key="tml-test-key", base_url=base_url, telemetry=False)
    requests = 0

    def count(event: object) -> None:
        nonlocal requests
        if type(event).__name__ == "RequestStarted":
            requests += 1

    async with open_service(config) as service:
        sampler = await service.create_sampling_client(base_model="fake/model")
        service.telemetry.add_handler(count)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(sampler.sample, ModelInput.from_ints([i]))
        return time.perf_counter() - wall0, time.process_time() - cpu0, requests


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="*", default=[200, 1000, 2000])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--slow-n", type=int, default=200)
    args = parser.parse_args()
    queue: multiprocessing.Queue[int] = multiprocessing.Queue()
    server = multiprocessing.Process(target=_serve, args=(queue,), daemon=True)
    server.start()
    try:
        port = queue.get(timeout=30)
        base_url = f"http://127.0.0.1:{port}"
        print(f"{'N':>6} {'wall s':>8} {'calls/s':>9} {'req/call':>9} {'CPU ms/call':>12}")
        for n in args.n:
            for _ in range(args.repeat):
                wall, cpu, requests = trio.run(run_once, base_url, n)
                print(
                    f"{n:>6} {wall:>8.2f} {n / wall:>9.0f} {requests / n:>9.2f} "
                    f"{1000 * cpu / n:>12.2f}"
                )
    finally:
        server.terminate()
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
