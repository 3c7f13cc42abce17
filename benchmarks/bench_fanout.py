"""N concurrent `sample` calls against an instant server on 127.0.0.1.

The server (the test suite's in-memory fake Tinker behind the scriptable HTTP/1.1 server) runs
in a child process so that the client's CPU time is measured alone. Prints, per N: wall time,
calls/s, HTTP requests per call and client CPU seconds per call.

    .venv/bin/python benchmarks/bench_fanout.py            # N = 200, 1000, 2000
    .venv/bin/python benchmarks/bench_fanout.py --n 500 --repeat 3
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, nargs="*", default=[200, 1000, 2000])
    parser.add_argument("--repeat", type=int, default=1)
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


if __name__ == "__main__":
    main()
