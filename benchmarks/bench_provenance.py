"""Cost of stable_reinforce's bookkeeping on the local backend: recording sampled sequences and
checking datums' provenance spans against the recordings (`_stability.py`, `_provenance.py`).

    python benchmarks/bench_provenance.py [--sequences 128] [--prompt 512] [--sampled 512]

Records `--sequences` sequences (8 per sampling request, one shared prompt), builds one datum
per sequence (prompt + sampled tokens, spans as `Datum.with_provenance` makes them) and checks
them all, as a forward_backward's submit does. Prints the time of each phase and the bytes the
recordings account for. Nothing is asserted: this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tinkex_trio import types as t
from tinkex_trio.local._engine_api import DatumArrays
from tinkex_trio.local._provenance import recorded_logprobs
from tinkex_trio.local._stability import StabilityRecordings

PER_REQUEST = 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--sampled", type=int, default=512)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    recordings = StabilityRecordings(time.monotonic)
    prompt = rng.integers(0, 49152, size=args.prompt).tolist()
    sequences: list[tuple[str, list[int], list[float]]] = []
    started = time.perf_counter()
    for request in range(0, args.sequences, PER_REQUEST):
        batch = [
            (
                f"r{request}:{i}",
                rng.integers(0, 49152, size=args.sampled).tolist(),
                rng.uniform(-3.0, 0.0, size=args.sampled).tolist(),
            )
            for i in range(min(PER_REQUEST, args.sequences - request))
        ]
        recordings.record("session", prompt, batch)
        sequences.extend(batch)
    recorded = time.perf_counter()

    data = []
    n_prompt, n_sampled = args.prompt, args.sampled
    for sid, tokens, _ in sequences:
        full = prompt + tokens
        targets = np.array(full[1:], np.int64)
        datum = t.Datum(
            model_input=t.ModelInput.from_ints(full[:-1]),
            loss_fn_inputs={"target_tokens": targets},
        ).with_provenance(
            [
                t.PromptProvenanceSpan(sequence_id=sid, length=n_prompt),
                t.SampledProvenanceSpan(sequence_id=sid, length=n_sampled - 1),
            ],
            [
                t.PromptProvenanceSpan(sequence_id=sid, offset=1, length=n_prompt - 1),
                t.SampledProvenanceSpan(sequence_id=sid, length=n_sampled),
            ],
        )
        arrays = DatumArrays(np.array(full[:-1], np.int64), {"target_tokens": targets})
        data.append((datum, arrays))
    checking = time.perf_counter()
    for index, (datum, arrays) in enumerate(data):
        recorded_logprobs(datum, index, arrays, recordings, "session")
    checked = time.perf_counter()

    stats = recordings.statistics()
    tokens_per_datum = n_prompt + n_sampled - 1
    print(
        f"record {args.sequences} sequences ({n_prompt} prompt + {n_sampled} sampled tokens): "
        f"{(recorded - started) * 1e3:.1f} ms"
    )
    print(
        f"check {len(data)} datums of {tokens_per_datum} tokens (4 spans each): "
        f"{(checked - checking) * 1e3:.1f} ms"
    )
    print(f"recordings: {stats.sequences} sequences, {stats.bytes / 1e6:.2f} MB accounted")


if __name__ == "__main__":
    main()
