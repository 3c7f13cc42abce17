"""The batch data path: encoding one forward_backward chunk, and whole calls side by side.

Table 1, in this process (CPU time, median of --repeat): the batch is 128 datums x 4096
tokens, loss inputs `target_tokens` (int64) and `weights` (float32). Each row times the path
from the user's data to the request body, so "from lists" / "from numpy" rows include building
the `Datum`s:

* JSON from lists      Datum from Python lists, then the SDK's JSON body (Appendix A.1)
* JSON from numpy      Datum from numpy arrays, then the SDK's JSON body
* msgspec dict         bare `msgspec.json.encode` of the same data as a prebuilt dict: the floor
* protobuf from lists  Datum from Python lists, then the SDK's protobuf body (6.2)
* protobuf from numpy  Datum from numpy arrays, then the SDK's protobuf body
* protobuf+zstd        the same, compressed as `proto_compress_fwdbwd` asks (6.3)
* official from lists  the official tinker 0.38 SDK, lists to protobuf body bytes (its venv)
* ... encode, lists/numpy  the codec alone, on Datums built once from lists / from numpy

Table 2, side by side against the stub server (`_side_by_side.py`: pinned cores, interleaved
rounds, medians of client CPU): one forward_backward of 128 x 4096 tokens built from Python
lists (build, send, receive the result), and 50 pipelined forward_backward + optim_step pairs
of 16 x 512; tinkex_trio with JSON and with protobuf bodies, and the official SDK.

    .venv/bin/python benchmarks/bench_encode.py [--repeat 7] [--rounds 5] [--no-calls]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _side_by_side import Client, interleave, official, ours, stub_server

from tinkex_trio import _protobuf, types as t
from tinkex_trio._fwdbwd import FwdBwdChunk, encode_json


def _chunk(data: list[t.Datum]) -> FwdBwdChunk:
    return FwdBwdChunk("bench:train:0", 1, data, "cross_entropy", None, False)


def _official_encode(datums: int, tokens: int, repeat: int) -> float | None:
    command = official("encode", "-", str(datums), str(tokens), str(repeat))
    if command is None:
        return None
    client = Client("official", command)
    client.run()
    return client.median("cpu")


def encode_table(args: argparse.Namespace) -> None:
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

    built_from_lists, built_from_numpy = from_lists(), from_numpy()
    rows: list[tuple[str, Callable[[], bytes]]] = [
        ("JSON from lists", lambda: encode_json(_chunk(from_lists()))[1]),
        ("JSON from numpy", lambda: encode_json(_chunk(from_numpy()))[1]),
        ("msgspec dict (floor)", lambda: msgspec.json.encode(plain)),
        ("protobuf from lists", lambda: proto(from_lists())),
        ("protobuf from numpy", lambda: proto(from_numpy())),
        ("protobuf+zstd", lambda: _protobuf.compress(proto(from_numpy()))),
        # The codecs alone, on Datums built once (what building them costs above). Datums
        # built from numpy hold arrays, so their JSON encoding includes the arrays' `tolist`;
        # the codec's own overhead is the "lists" row against the floor.
        ("JSON encode, lists", lambda: encode_json(_chunk(built_from_lists))[1]),
        ("JSON encode, numpy", lambda: encode_json(_chunk(built_from_numpy))[1]),
        ("protobuf encode, lists", lambda: proto(built_from_lists)),
        ("protobuf encode, numpy", lambda: proto(built_from_numpy)),
    ]
    print(f"{args.datums} datums x {args.tokens} tokens, CPU median of {args.repeat}")
    print(f"{'form':<22} {'median ms':>10} {'body MB':>9} {'MB/s':>8}")
    medians: dict[str, float] = {}
    for name, fn in rows:
        body = fn()  # warm-up
        times = []
        for _ in range(args.repeat):
            started = time.process_time()
            body = fn()
            times.append(time.process_time() - started)
        median = medians[name] = statistics.median(times)
        mb = len(body) / 1e6
        print(f"{name:<22} {median * 1e3:>10.1f} {mb:>9.2f} {mb / median:>8.1f}")
    print(
        f"JSON from lists / msgspec floor: {medians['JSON from lists'] / medians['msgspec dict (floor)']:.2f}x"
        f"; JSON encode, lists / floor: "
        f"{medians['JSON encode, lists'] / medians['msgspec dict (floor)']:.2f}x"
    )
    official_cpu = (
        None if args.no_official else _official_encode(args.datums, args.tokens, args.repeat)
    )
    if official_cpu is not None:
        print(f"{'official from lists':<22} {official_cpu * 1e3:>10.1f}")
        print(
            f"protobuf from lists / official: "
            f"{medians['protobuf from lists'] / official_cpu:.2f}x; "
            f"JSON from lists / official: {medians['JSON from lists'] / official_cpu:.2f}x"
        )


def calls_table(args: argparse.Namespace) -> None:
    jobs = [
        ("one forward_backward 128 x 4096 from lists", ("fwdbwd", "128", "4096")),
        ("50 pipelined fwd_bwd + optim_step, 16 x 512", ("pipelined", "50", "16", "512")),
    ]
    with stub_server() as stub:
        for title, job in jobs:
            mode, *numbers = job
            clients = [
                Client("tinkex_trio json", ours(mode, stub.httpx_url, *numbers, "json")),
                Client("tinkex_trio protobuf", ours(mode, stub.httpx_url, *numbers, "protobuf")),
            ]
            command = None if args.no_official else official(mode, stub.pyqwest_url, *numbers)
            if command is not None:
                clients.append(Client("official", command))
            interleave(clients, args.rounds)
            print(f"{title}: client CPU, median of {args.rounds} interleaved rounds")
            print(f"{'client':<22} {'CPU ms':>8} {'of it sys':>10} {'noise':>7}")
            for c in clients:
                print(
                    f"{c.label:<22} {1000 * c.median('cpu'):>8.1f} "
                    f"{1000 * c.median('sys'):>10.1f} {c.spread('cpu'):>6.1f}x"
                )
            if command is not None:
                ref = clients[-1].median("cpu")
                print(
                    "ratio to official: "
                    + ", ".join(f"{c.label} {c.median('cpu') / ref:.2f}x" for c in clients[:2])
                )
            print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--datums", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--no-official", action="store_true")
    parser.add_argument("--no-calls", action="store_true")
    args = parser.parse_args()
    encode_table(args)
    print()
    if not args.no_calls:
        calls_table(args)


if __name__ == "__main__":
    main()
