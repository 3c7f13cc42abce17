"""Soak: one `tinkex-trio serve` process (tiny model) through many client life cycles.

    .venv/bin/python benchmarks/bench_soak.py [--cycles 40] [--session-timeout 5]

Starts the real server command in a child process on a fresh data directory, then:

1. Unauthenticated uploads: 4 concurrent 250 MB request bodies with a wrong key; prints the
   server's RSS before and after (the body is never read: the key is checked from the head).
2. Sample bursts: two bursts of 400 concurrent samples, then the server's descriptors each
   second after the client left.
3. Cycles: each opens a service, creates a LoRA training client, runs one forward_backward
   and optim_step, saves weights for a sampler, samples a few sequences, and leaves (the
   session is finished). Every 4th cycle is cancelled midway (after submitting its training
   step); every 5th is a client that vanishes: it creates a session and a model over raw HTTP
   and never heartbeats or finishes, so only `--session-timeout` releases it.
   After each cycle and `--settle` seconds: the server's RSS and open descriptors.
4. 10 s after the last client: the descriptors against the baseline taken before the first
   client; then, once the vanished sessions expired, the RSS.

Nothing is asserted; the numbers are the result (issue 11: RSS growth from cycle 10 to 40
under 30 MB, descriptors back within 5 of the baseline 10 s after the last client leaves).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from tinkex_trio import AdamParams, Datum, ModelInput, SamplingParams, open_service

TINY = "tinkex-trio/SmolLM2-tiny-random"
API_KEY = "tml-soak-benchmark"
MiB = 1024 * 1024


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def start_server(data_dir: Path, session_timeout: float) -> tuple[subprocess.Popen[str], str]:
    command = [
        str(Path(sys.executable).with_name("tinkex-trio")),
        "serve",
        "--port",
        "0",
        "--data-dir",
        str(data_dir),
        "--api-key",
        API_KEY,
        "--session-timeout",
        str(session_timeout),
    ]
    env = {**os.environ, "TINKEX_TRIO_TORCH_THREADS": "1"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert process.stdout is not None
    for line in process.stdout:
        if "listening on" in line:
            return process, line.rsplit(" ", 1)[1].strip()
    raise RuntimeError("the server did not start")


class _Zeros(httpx.AsyncByteStream):
    def __init__(self, size: int) -> None:
        self.size = size

    async def __aiter__(self):  # type: ignore[no-untyped-def]
        chunk = bytes(MiB)
        left = self.size
        while left > 0:
            yield chunk[: min(left, MiB)]
            left -= MiB


async def unauthenticated_uploads(url: str, pid: int) -> None:
    before = rss_mib(pid)
    statuses: list[str] = []

    async def upload() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            try:
                r = await client.post(
                    "/api/v1/create_session",
                    content=_Zeros(250 * MiB),
                    headers={"X-API-Key": "tml-wrong", "content-length": str(250 * MiB)},
                )
                statuses.append(str(r.status_code))
            except httpx.TransportError as exc:
                statuses.append(type(exc).__name__)

    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(upload)
    after = rss_mib(pid)
    print(
        f"4 concurrent unauthenticated 250 MB uploads: answers {sorted(statuses)}; server RSS "
        f"{before:.0f} -> {after:.0f} MiB (+{after - before:.1f} MiB)"
    )


def _datum() -> Datum:
    tokens = list(range(1, 33))
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * 31},
    )


async def cycle(url: str, index: int) -> str:
    async with open_service(base_url=url, api_key=API_KEY) as service:
        training = await service.create_lora_training_client(TINY, rank=8, seed=index)
        fb = await training.forward_backward([_datum()], "cross_entropy")
        step = await training.optim_step(AdamParams(learning_rate=1e-3))
        if index % 4 == 3:
            return "cancelled midway"  # leaves the block with the step still in flight
        await fb
        await step
        sampler = await training.save_weights_and_get_sampling_client()
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=index)
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(sampler.sample, ModelInput.from_ints([1, 2, 3]), 2, params)
    return "completed"


async def sample_bursts(url: str, pid: int, bursts: int = 2, size: int = 400) -> None:
    """`bursts` times `size` concurrent samples from one service, then the client leaves;
    the server's descriptors each second after (idle keep-alive connections are closed by
    the server after its keep-alive timeout)."""
    for _ in range(bursts):
        async with open_service(base_url=url, api_key=API_KEY) as service:
            sampler = await service.create_sampling_client(base_model=TINY)
            params = SamplingParams(max_tokens=4, temperature=1.0)
            async with trio.open_nursery() as nursery:
                for _ in range(size):
                    nursery.start_soon(sampler.sample, ModelInput.from_ints([1, 2, 3]), 1, params)
    timeline = [open_fds(pid)]
    for _ in range(10):
        await trio.sleep(1.0)
        timeline.append(open_fds(pid))
    print(
        f"{bursts} bursts of {size} concurrent samples: server descriptors at the client's "
        f"exit and each second after: {timeline}"
    )


async def vanish(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": API_KEY}) as client:
        session = (
            await client.post("/api/v1/create_session", json={"sdk_version": "soak"})
        ).json()["session_id"]
        await client.post(
            "/api/v1/create_model",
            json={"session_id": session, "model_seq_id": 0, "base_model": TINY},
        )
    return "vanished"


async def soak(url: str, pid: int, cycles: int, session_timeout: float, settle: float) -> None:
    baseline_fds = open_fds(pid)
    print(f"baseline: RSS {rss_mib(pid):.0f} MiB, {baseline_fds} open descriptors")
    await unauthenticated_uploads(url, pid)
    await sample_bursts(url, pid)
    rss: list[float] = []
    started = time.perf_counter()
    print(f"{'cycle':>5} {'kind':<17} {'RSS MiB':>8} {'fds':>5} {'s':>6}")
    for index in range(1, cycles + 1):
        kind = await vanish(url) if index % 5 == 0 else await cycle(url, index)
        # Let the server finish what the client left (a cancelled step, the release of the
        # session's adapters), so the sample is what it keeps, not what is in flight.
        await trio.sleep(settle)
        rss.append(rss_mib(pid))
        elapsed = time.perf_counter() - started
        print(f"{index:>5} {kind:<17} {rss[-1]:>8.1f} {open_fds(pid):>5} {elapsed:>6.1f}")
    if len(rss) >= 40:
        early, late = rss[5:15], rss[30:40]
        print(
            f"RSS growth cycle 10 -> 40: {rss[39] - rss[9]:+.1f} MiB; mean of cycles 6-15 "
            f"{sum(early) / 10:.1f} MiB, of cycles 31-40 {sum(late) / 10:.1f} MiB "
            f"({(sum(late) - sum(early)) / 10:+.1f}); peak {max(rss):.1f} MiB"
        )
    await trio.sleep(10.0)
    fds = open_fds(pid)
    print(
        f"10 s after the last client left: {fds} open descriptors "
        f"({fds - baseline_fds:+d} vs the baseline of {baseline_fds}), RSS {rss_mib(pid):.1f} MiB"
    )
    await trio.sleep(max(0.0, session_timeout - 10.0) + 2.0)
    print(f"after the vanished sessions expired: RSS {rss_mib(pid):.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=40)
    parser.add_argument("--session-timeout", type=float, default=5.0)
    parser.add_argument(
        "--settle", type=float, default=1.0, help="seconds between a cycle and its sample"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        process, url = start_server(Path(tmp) / "data", args.session_timeout)
        try:
            trio.run(soak, url, process.pid, args.cycles, args.session_timeout, args.settle)
        finally:
            process.terminate()
            process.wait(timeout=30)


if __name__ == "__main__":
    main()
