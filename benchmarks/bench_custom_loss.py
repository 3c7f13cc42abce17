"""What a server-side custom loss costs next to the built-in loss and the client-side path.

Three ways to train on the same batch with the same gradient (a weighted negative
log-likelihood), timed on TorchEngine directly:

- `builtin`: one `forward_backward` with `cross_entropy`;
- `server-side custom`: one `forward_backward_custom` running the uploaded graph
  (PROTOCOL.md 8.8): the model pass plus the graph interpreter, per datum;
- `client-side custom`: what the SDK does when `custom_loss_server_side` is off (9.8): a
  forward-only pass, then a second `forward_backward` with weights = -dloss/dlogprobs (the
  client's own torch work and the HTTP round trips are not counted, so this is a lower bound).

Run: `.venv/bin/python benchmarks/bench_custom_loss.py [--models tiny,real] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import msgspec
import numpy as np

from tinkex_trio.local._custom_graph import compile_custom_loss
from tinkex_trio.local._engine_api import DatumArrays, LoraSpec
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.model_files import SMOLLM2_NAME, TINY_NAME
from tinkex_trio.types._custom_loss import CreateCustomLossRequest

# The neg_ll graph of PROTOCOL.md 3.2, as the official SDK uploads it.
NEG_LL = {
    "session_id": "bench",
    "custom_loss_seq_id": 0,
    "name": "neg_ll",
    "inputs": [{"name": "logprobs", "rank": 1}, {"name": "weights", "rank": 1}],
    "graph": {
        "format": 1,
        "nodes": [
            {"op": "placeholder", "name": "logprobs", "target": "logprobs"},
            {"op": "placeholder", "name": "weights", "target": "weights"},
            {
                "op": "call_function",
                "name": "mul",
                "target": "operator.mul",
                "args": [{"ref": "logprobs"}, {"ref": "weights"}],
            },
            {"op": "call_method", "name": "sum_1", "target": "sum", "args": [{"ref": "mul"}]},
            {
                "op": "call_function",
                "name": "neg",
                "target": "operator.neg",
                "args": [{"ref": "sum_1"}],
            },
            {
                "op": "output",
                "name": "output",
                "target": "output",
                "args": [
                    {"tuple": [{"ref": "neg"}, {"dict": {"custom/neg_ll:sum": {"ref": "neg"}}}]}
                ],
            },
        ],
    },
}


def batch(datums: int, length: int, vocab: int = 49152) -> list[DatumArrays]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(datums):
        seq = rng.integers(0, vocab, size=length + 1)
        out.append(
            DatumArrays(
                tokens=seq[:-1].astype(np.int64),
                loss_fn_inputs={
                    "target_tokens": seq[1:].astype(np.int64),
                    "weights": rng.uniform(0, 1, size=length).astype(np.float32),
                },
            )
        )
    return out


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="tiny,real")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--datums", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    args = parser.parse_args()
    names = {"tiny": TINY_NAME, "real": SMOLLM2_NAME}
    loss = compile_custom_loss(msgspec.convert(NEG_LL, CreateCustomLossRequest), "bench:loss:0")
    data = batch(args.datums, args.length)
    for key in args.models.split(","):
        engine = TorchEngine(models=[names[key]])
        engine.create_adapter("a", names[key], LoraSpec(rank=32, seed=0))

        def builtin(engine: TorchEngine = engine) -> object:
            return engine.forward_backward("a", data, "cross_entropy", {}, False)

        def server_side(engine: TorchEngine = engine) -> object:
            return engine.forward_backward_custom("a", data, loss, False)

        def client_side(engine: TorchEngine = engine) -> object:
            engine.forward_backward("a", data, "cross_entropy", {}, True)
            return engine.forward_backward("a", data, "cross_entropy", {}, False)

        tokens = args.datums * args.length
        print(f"{key}: {args.datums} datums x {args.length} tokens, LoRA rank 32")
        for label, fn in (
            ("builtin cross_entropy", builtin),
            ("server-side custom", server_side),
            ("client-side custom (2 passes)", client_side),
        ):
            seconds = timed(fn, args.repeats)
            print(f"  {label:32s} {seconds * 1000:8.1f} ms  {tokens / seconds:8.0f} tokens/s")


if __name__ == "__main__":
    main()
