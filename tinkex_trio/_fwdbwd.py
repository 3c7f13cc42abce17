"""A forward/forward_backward call as chunks: size estimate, cutting, wire forms, merging.

PROTOCOL.md 9.1 cuts a call's datums greedily, in order, into chunks of at most
`fwdbwd_max_chunk_len` datums and about `fwdbwd_max_chunk_bytes_count` estimated bytes; each
chunk is one request with its own seq_id, sent as JSON (Appendix A.1, on `/forward` or
`/forward_backward`) or protobuf (6.2, always `/forward_backward`), and the chunk results are
merged in input order with the metrics reduced as 9.2 says (`tinkex_trio._metrics`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Final

import httpx

from tinkex_trio import _protobuf, types as t
from tinkex_trio._limits import estimate_model_input_bytes
from tinkex_trio._metrics import reduce_metrics
from tinkex_trio._polling import result_first

FORWARD_PATH: Final = "/api/v1/forward"
FORWARD_BACKWARD_PATH: Final = "/api/v1/forward_backward"

# PROTOCOL.md 9.1: estimated bytes per datum: 4 per token, array sizes, 8 per sparse index.
_BYTES_PER_TOKEN: Final = 4
_BYTES_PER_SPARSE_INDEX: Final = 8
_DTYPE_BYTES: Final = {"int64": 8, "float32": 4}


def estimate_datum_bytes(datum: t.Datum) -> int:
    """PROTOCOL.md 9.1's per-datum size estimate, used to cut chunks."""
    size = estimate_model_input_bytes(datum.model_input, _BYTES_PER_TOKEN)
    for tensor in datum.loss_fn_inputs.values():
        size += _DTYPE_BYTES[tensor.dtype] * tensor.size
        if tensor.sparse_crow_indices is not t.UNSET:
            size += _BYTES_PER_SPARSE_INDEX * len(tensor.sparse_crow_indices)
        if tensor.sparse_col_indices is not t.UNSET:
            size += _BYTES_PER_SPARSE_INDEX * len(tensor.sparse_col_indices)
    return size


def chunk_data(
    data: Sequence[t.Datum], max_len: int, max_bytes: int
) -> list[tuple[list[t.Datum], int]]:
    """Cut `data` greedily, in order, into (chunk, estimated bytes) (PROTOCOL.md 9.1)."""
    chunks: list[tuple[list[t.Datum], int]] = []
    current: list[t.Datum] = []
    current_bytes = 0
    for datum in data:
        size = estimate_datum_bytes(datum)
        if current and (len(current) >= max_len or current_bytes + size > max_bytes):
            chunks.append((current, current_bytes))
            current, current_bytes = [], 0
        current.append(datum)
        current_bytes += size
    if current:
        chunks.append((current, current_bytes))
    return chunks


@dataclasses.dataclass(frozen=True)
class FwdBwdChunk:
    """One forward/forward_backward chunk, encoded when sent: JSON (A.1) or protobuf (6.2)
    depending on the service's wire state at that moment (a 415 can switch it)."""

    model_id: str
    seq_id: int
    data: list[t.Datum]
    loss_fn: str
    config: dict[str, float] | None
    forward_only: bool


def encode_json(chunk: FwdBwdChunk) -> tuple[str, bytes]:
    """(path, body) of a chunk in the JSON form of Appendix A.1."""
    inputs = t.ForwardBackwardInput(
        data=chunk.data,
        loss_fn=chunk.loss_fn,
        loss_fn_config=t.UNSET if chunk.config is None else chunk.config,
    )
    if chunk.forward_only:
        request: t.ForwardRequest | t.ForwardBackwardRequest = t.ForwardRequest(
            forward_input=inputs, model_id=chunk.model_id, seq_id=chunk.seq_id
        )
        return FORWARD_PATH, t.encode(request)
    request = t.ForwardBackwardRequest(
        forward_backward_input=inputs, model_id=chunk.model_id, seq_id=chunk.seq_id
    )
    return FORWARD_BACKWARD_PATH, t.encode(request)


def encode_protobuf(chunk: FwdBwdChunk) -> bytes:
    """The body of a chunk in the protobuf form of PROTOCOL.md 6.2 (on `/forward_backward`)."""
    return _protobuf.encode_forward_backward_request(
        model_id=chunk.model_id,
        seq_id=chunk.seq_id,
        data=chunk.data,
        loss_fn=chunk.loss_fn,
        loss_fn_config=chunk.config,
        forward_only=chunk.forward_only,
    )


def _decode_result(response: httpx.Response) -> t.ForwardBackwardOutput:
    """A forward/forward_backward result in either form (PROTOCOL.md 4.2 rule 1, 6.4)."""
    if _protobuf.PROTOBUF_CONTENT_TYPE in response.headers.get("content-type", ""):
        return _protobuf.decode_forward_backward_output(response.content)
    return t.decode(response.content, t.ForwardBackwardOutput)


# Three required fields, none of them an envelope's: a large body is decoded once.
decode_result: Final = result_first(_decode_result)


def merge_outputs(outputs: Sequence[t.ForwardBackwardOutput]) -> t.ForwardBackwardOutput:
    """The chunk results of one call as one: outputs in order, metrics reduced (9.2)."""
    merged: list[dict[str, t.TensorData]] = []
    for output in outputs:
        merged.extend(output.loss_fn_outputs)
    metrics = reduce_metrics([(o.metrics, len(o.loss_fn_outputs)) for o in outputs])
    return t.ForwardBackwardOutput(
        loss_fn_output_type=outputs[0].loss_fn_output_type,
        loss_fn_outputs=merged,
        metrics=metrics,
    )
