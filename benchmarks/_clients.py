"""Our side and the floors of the side-by-side benchmarks (run in our venv, one per process).

    .venv/bin/python benchmarks/_clients.py MODE BASE_URL [ARGS...]

Modes, mirroring `_official_client.py` (one JSON line: ``wall`` and ``cpu`` of the measured
part; session setup excluded):

* ``fanout BASE_URL N``: N concurrent `SamplingClient.sample` calls;
* ``h11 BASE_URL N``: the floor of the fan-out: the same two requests per call (asample, then
  retrieve_future) with bare h11 on trio streams, one keep-alive connection per task in
  flight, msgspec for the bodies; no retries, no policy, no telemetry;
* ``fwdbwd BASE_URL DATUMS TOKENS [json|protobuf]``: one forward_backward from Python lists;
* ``pipelined BASE_URL STEPS DATUMS TOKENS [json|protobuf]``: STEPS pipelined pairs.

Data: ``numpy.random.default_rng(0)``, as `_official_client.py` makes them.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import h11
import msgspec
import numpy as np
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinkex_trio import AdamParams, Config, ModelInput, SamplingParams, open_service, types as t

API_KEY = "tml-bench-key"


def _system_time() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def lists(datums: int, tokens: int) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
    rng = np.random.default_rng(0)
    all_tokens = rng.integers(0, 49_152, size=(datums, tokens + 1), dtype=np.int64)
    weights = rng.random((datums, tokens)).astype(np.float32)
    return (
        [row[:-1].tolist() for row in all_tokens],
        [row[1:].tolist() for row in all_tokens],
        [row.tolist() for row in weights],
    )


def build(token_lists: Any, target_lists: Any, weight_lists: Any) -> list[t.Datum]:
    return [
        t.Datum(
            model_input=ModelInput.from_ints(token_lists[i]),
            loss_fn_inputs={"target_tokens": target_lists[i], "weights": weight_lists[i]},
        )
        for i in range(len(token_lists))
    ]


async def measure(fn: Callable[[], Awaitable[object]]) -> dict[str, float]:
    cpu0, sys0, wall0 = time.process_time(), _system_time(), time.perf_counter()
    await fn()
    return {
        "wall": time.perf_counter() - wall0,
        "cpu": time.process_time() - cpu0,  # user + system, every thread of the process
        "sys": _system_time() - sys0,
    }


async def ours(mode: str, base_url: str, args: list[str]) -> dict[str, float]:
    wire = args[-1] if args and args[-1] in ("json", "protobuf") else "json"
    numbers = [int(a) for a in args if a not in ("json", "protobuf")]
    config = Config(api_key=API_KEY, base_url=base_url, telemetry=False, wire_format=wire)  # type: ignore[arg-type]
    async with open_service(config) as service:
        if mode == "fanout":
            (n,) = numbers
            sampler = await service.create_sampling_client(base_model="stub/model")
            params = SamplingParams(max_tokens=2)

            async def fan_out() -> None:
                async with trio.open_nursery() as nursery:
                    for i in range(n):
                        nursery.start_soon(sampler.sample, ModelInput.from_ints([i]), 1, params)

            return await measure(fan_out)
        training = await service.create_lora_training_client("stub/model", rank=8)
        if mode == "fwdbwd":
            datums, tokens = numbers
            data = lists(datums, tokens)

            async def one() -> None:
                await (await training.forward_backward(build(*data), "cross_entropy"))

            return await measure(one)
        steps, datums, tokens = numbers
        data = lists(datums, tokens)

        async def loop() -> None:
            futures: list[Any] = []
            for _ in range(steps):
                futures.append(await training.forward_backward(build(*data), "cross_entropy"))
                futures.append(await training.optim_step(AdamParams(learning_rate=1e-4)))
            for future in futures:
                await future

        return await measure(loop)


async def h11_floor(base_url: str, n: int) -> dict[str, float]:
    """The fan-out's floor: two bare h11 requests per call, nothing else."""
    host, port = base_url.removeprefix("http://").split(":")
    idle: list[tuple[trio.SocketStream, h11.Connection]] = []
    common = [("Host", f"{host}:{port}"), ("Content-Type", "application/json")]
    sample_encoder = msgspec.json.Encoder()
    future_decoder = msgspec.json.Decoder(t.UntypedAPIFuture)
    result_decoder = msgspec.json.Decoder(t.SampleResponse)

    async def post(path: str, body: bytes) -> bytes:
        if idle:
            stream, conn = idle.pop()
        else:
            stream = await trio.open_tcp_stream(host, int(port))
            conn = h11.Connection(h11.CLIENT)
        headers = [*common, ("Content-Length", str(len(body)))]
        await stream.send_all(
            conn.send(h11.Request(method="POST", target=path, headers=headers))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        chunks = []
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Data):
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                break
        conn.start_next_cycle()
        idle.append((stream, conn))
        return b"".join(chunks)

    async def one(i: int) -> None:
        request = {
            "num_samples": 1,
            "prompt": {"chunks": [{"tokens": [i], "type": "encoded_text"}]},
            "sampling_params": {"max_tokens": 2},
            "sampling_session_id": "stub-sampler",
            "seq_id": i,
        }
        submitted = future_decoder.decode(
            await post("/api/v1/asample", sample_encoder.encode(request))
        )
        poll = {"request_id": submitted.request_id, "allow_metadata_only": True}
        result_decoder.decode(await post("/api/v1/retrieve_future", sample_encoder.encode(poll)))

    async def fan_out() -> None:
        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)

    try:
        return await measure(fan_out)
    finally:
        for stream, _ in idle:
            await stream.aclose()


def main() -> None:
    mode, base_url, *args = sys.argv[1:]
    if mode == "h11":
        result = trio.run(h11_floor, base_url, int(args[0]))
    else:
        result = trio.run(ours, mode, base_url, args)
    print(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
