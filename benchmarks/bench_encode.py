"""Encoding one forward_backward chunk: JSON (Appendix A.1) vs protobuf (PROTOCOL.md 6.2).

The batch: 128 datums x 4096 tokens; loss inputs `target_tokens` (int64) and `weights`
(float32). Each row times the whole path from the user's data to the request body, so the
"from numpy" rows include building the `Datum`s (where numpy arrays become TensorData):

* JSON from lists      Datum from Python lists, then the SDK's JSON body
* JSON from numpy      Datum from numpy arrays, then the SDK's JSON body
* msgspec dict         bare `msgspec.json.encode` of the equivalent prebuilt dict (a floor)
* protobuf from numpy  Datum from numpy arrays, then the SDK's protobuf body
* protobuf+zstd        the same, compressed as `proto_compress_fwdbwd` asks (6.3)
* ... encode only      the codec alone, on Datums built once from numpy

Prints the median time, the body size and MB/s of body produced.

    .venv/bin/python benchmarks/bench_encode.py [--repeat 7] [--datums 128] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import msgspec
import numpy as np

from tinkex_trio import _protobuf, types as t
from tinkex_trio._fwdbwd import FwdBwdChunk, encode_json


def _chunk(data: list[t.Datum]) -> FwdBwdChunk:
    return FwdBwdChunk("bench:train:0", 1, data, "cross_entropy", None, False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--datums", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 49_152, size=(args.datums, args.tokens + 1), dtype=np.int64)
    weights = rng.random((args.datums, args.tokens)).astype(np.float32)
    token_lists = [row[:-1].tolist() for row in tokens]
    target_lists = [row[1:].tolist() for row in tokens]
    weight_lists = [row.tolist() for row in weights]

    def from_lists() -> list[t.Datum]:
        return [
            t.Datum(
                model_input=t.ModelInput.from_ints(token_lists[i]),
                loss_fn_inputs={"target_tokens": target_lists[i], "weights": weight_lists[i]},
            )
            for i in range(args.datums)
        ]

    def from_numpy() -> list[t.Datum]:
        return [
            t.Datum(
                model_input=t.ModelInput.from_ints(tokens[i, :-1]),
                loss_fn_inputs={"target_tokens": tokens[i, 1:], "weights": weights[i]},
            )
            for i in range(args.datums)
        ]

    plain = {
        "forward_backward_input": {
            "data": [
                {
                    "model_input": {"chunks": [{"tokens": token_lists[i], "type": "encoded_text"}]},
                    "loss_fn_inputs": {
                        "target_tokens": {
                            "data": target_lists[i],
                            "dtype": "int64",
                            "shape": [args.tokens],
                        },
                        "weights": {
                            "data": weight_lists[i],
                            "dtype": "float32",
                            "shape": [args.tokens],
                        },
                    },
                }
                for i in range(args.datums)
            ],
            "loss_fn": "cross_entropy",
        },
        "model_id": "bench:train:0",
        "seq_id": 1,
    }

    def proto(data: list[t.Datum]) -> bytes:
        return _protobuf.encode_forward_backward_request(
            model_id="bench:train:0",
            seq_id=1,
            data=data,
            loss_fn="cross_entropy",
            loss_fn_config=None,
            forward_only=False,
        )

    prebuilt = from_numpy()
    rows: list[tuple[str, Callable[[], bytes]]] = [
        ("JSON from lists", lambda: encode_json(_chunk(from_lists()))[1]),
        ("JSON from numpy", lambda: encode_json(_chunk(from_numpy()))[1]),
        ("msgspec dict (floor)", lambda: msgspec.json.encode(plain)),
        ("protobuf from numpy", lambda: proto(from_numpy())),
        ("protobuf+zstd", lambda: _protobuf.compress(proto(from_numpy()))),
        # The codecs alone, on Datums built once from numpy (what building them costs above).
        ("JSON encode only", lambda: encode_json(_chunk(prebuilt))[1]),
        ("protobuf encode only", lambda: proto(prebuilt)),
    ]
    print(f"{args.datums} datums x {args.tokens} tokens, median of {args.repeat}")
    print(f"{'form':<22} {'median ms':>10} {'body MB':>9} {'MB/s':>8}")
    for name, fn in rows:
        body = fn()  # warm-up
        times = []
        for _ in range(args.repeat):
            started = time.perf_counter()
            body = fn()
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        mb = len(body) / 1e6
        print(f"{name:<22} {median * 1e3:>10.1f} {mb:>9.2f} {mb / median:>8.1f}")


if __name__ == "__main__":
    main()
