"""The protobuf wire forms (PROTOCOL.md 6): one codec for the SDK and the local backend.

Three messages travel as protobuf (9.12): the `ForwardBackwardRequest` body of
`POST /api/v1/forward_backward` (optionally zstd-compressed, 6.3), and the `retrieve_future`
results `ForwardBackwardOutput` (6.4) and `SampleResponse` (6.5). Every other body is JSON.

The messages come from the maintained protobuf runtime, generated from
`tinkex_trio/_proto/tinker_public.proto` (`scripts/gen_proto.py`). Packed arrays are raw
little-endian bytes, so encoding copies numpy buffers (`tobytes`) and decoding views them
(`numpy.frombuffer`); Python work is per datum and per field, never per element. Tensors and
token chunks built from numpy hold their source array (`_array`, see `TensorData`), which is
what makes "protobuf from numpy" cheap; lists are packed once with `struct` (checked and
converted in C). Decoded arrays stay arrays: `TensorData.data` becomes a list only if read.

Client side: `encode_forward_backward_request`, `compress`, `decode_forward_backward_output`,
`decode_sample_response`. Server side: `decompress`, `decode_forward_backward_request`,
`encode_forward_backward_output`, `encode_sample_response`.

Error handling: malformed input raises `ValueError` naming the field (a server answers 400);
unsupported inputs the SDK could have caught (image pointers, 6.2) raise `InvalidInputError`.
"""

from __future__ import annotations

import functools
import importlib
import io
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import zstandard

from tinkex_trio import types as t
from tinkex_trio.errors import InvalidInputError
from tinkex_trio.types._inputs import held_array

# The generated module has no type information (the protobuf runtime ships none); it is used
# as `Any` here and checked byte for byte against the official SDK's classes in the tests.
_pb: Any = importlib.import_module("tinkex_trio._proto.tinker_public_pb2")

PROTOBUF_CONTENT_TYPE: Final = "application/x-protobuf"
"""Content-Type of protobuf bodies and the Accept value that asks for them (PROTOCOL.md 4.5)."""
ZSTD_ENCODING: Final = "zstd"
"""Content-Encoding of a compressed forward_backward body (PROTOCOL.md 1.7, 6.3)."""
MAX_DECOMPRESSED_BYTES: Final = 1 << 30
"""A server refuses bodies that inflate past 1 GiB (a zstd bomb would exhaust memory)."""

# PROTOCOL.md 6.1 enum values.
DTYPE_FLOAT32: Final = 1
DTYPE_INT64: Final = 2
DTYPE_INT32: Final = 3
DTYPE_BFLOAT16: Final = 4
STOP_REASON_STOP: Final = 0
STOP_REASON_LENGTH: Final = 1
# PROTOCOL.md 6.5: an unused top-k cell.
TOPK_EMPTY_TOKEN: Final = 0
TOPK_EMPTY_LOGPROB: Final = -99999.0

_WIRE_DTYPE: Final[dict[str, int]] = {"float32": DTYPE_FLOAT32, "int64": DTYPE_INT64}
_NUMPY: Final[dict[str, np.dtype[Any]]] = {
    "float32": np.dtype("<f4"),
    "int64": np.dtype("<i8"),
}
_LE_INT32: Final = np.dtype("<i4")
_LE_INT64: Final = np.dtype("<i8")
_LE_FLOAT32: Final = np.dtype("<f4")
_LE_UINT16: Final = np.dtype("<u2")


# ------------------------------------------------------------------------------- helpers


def _array_of(tensor: t.TensorData) -> npt.NDArray[Any]:
    """The tensor's values as a little-endian array of its wire dtype, cheaply if possible."""
    return tensor.values_array().astype(_NUMPY[tensor.dtype], copy=False)


@functools.lru_cache(maxsize=256)
def _packer(code: str, count: int) -> struct.Struct:
    return struct.Struct(f"<{count}{code}")


def _packed(values: Any, code: str, dtype: np.dtype[Any]) -> bytes:
    """`values` (a list) as packed little-endian bytes. `struct` converts and checks each
    Python number in C, about three times faster than `numpy.asarray` of a list; values it
    refuses (floats for an integer code, out of range, strings of digits) go through numpy,
    exactly as before."""
    try:
        return _packer(code, len(values)).pack(*values)
    except (struct.error, TypeError, OverflowError):
        return np.asarray(values, dtype=dtype).tobytes()


def _tensor_bytes(tensor: t.TensorData) -> bytes:
    array = held_array(tensor)
    if array is not None:
        return array.astype(_NUMPY[tensor.dtype], copy=False).tobytes()
    code = "f" if tensor.dtype == "float32" else "q"
    return _packed(tensor.data, code, _NUMPY[tensor.dtype])


def _buffer(array: npt.NDArray[Any], dtype: np.dtype[Any]) -> memoryview:
    """The bytes of `array` as `dtype`, without a copy when it already is that (a view)."""
    contiguous: Any = np.ascontiguousarray(array, dtype=dtype)
    return memoryview(contiguous).cast("B")


def _tensor_buffer(tensor: t.TensorData) -> bytes | memoryview:
    array = held_array(tensor)
    if array is not None:
        return _buffer(array, _NUMPY[tensor.dtype])
    return _tensor_bytes(tensor)


def _tokens_buffer(chunk: t.EncodedTextChunk) -> bytes | memoryview:
    array = held_array(chunk)
    if array is not None:
        return _buffer(array, _LE_INT32)
    return _tokens_bytes(chunk)


def _tokens_bytes(chunk: t.EncodedTextChunk) -> bytes:
    array = held_array(chunk)
    if array is not None:
        return array.astype(_LE_INT32).tobytes()
    return _packed(chunk.tokens, "i", _LE_INT32)


def _frombuffer(raw: bytes, dtype: np.dtype[Any], what: str) -> npt.NDArray[Any]:
    if len(raw) % dtype.itemsize:
        raise ValueError(
            f"{what}: {len(raw)} bytes is not a multiple of {dtype.itemsize} "
            f"({dtype.name} elements, PROTOCOL.md 9.12)"
        )
    return np.frombuffer(raw, dtype=dtype)


def _tensor_data(values: npt.NDArray[Any], dtype: t.TensorDType, shape: list[int]) -> t.TensorData:
    """A tensor holding `values` (a view of the body); `data` becomes a list when read."""
    out = t.TensorData(data=values, dtype=dtype, shape=shape)  # type: ignore[arg-type]
    out._array = values  # type: ignore[attr-defined]  # see TensorData
    return out


def compress(body: bytes) -> bytes:
    """zstd, default level, one frame with the content size (PROTOCOL.md 6.3)."""
    return zstandard.ZstdCompressor().compress(body)


def decompress(body: bytes, limit: int = MAX_DECOMPRESSED_BYTES) -> bytes:
    """Inflate a `Content-Encoding: zstd` body; ValueError if corrupt or larger than `limit`."""
    try:
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(body)) as reader:
            out = reader.read(limit + 1)
    except zstandard.ZstdError as exc:
        raise ValueError(f"the zstd body could not be decompressed: {exc}") from None
    if len(out) > limit:
        raise ValueError(f"the zstd body inflates past {limit} bytes")
    return out


# ------------------------------------------------------------- forward_backward request


def encode_forward_backward_request(
    *,
    model_id: str,
    seq_id: int,
    data: Sequence[t.Datum],
    loss_fn: str,
    loss_fn_config: Mapping[str, float | str] | None,
    forward_only: bool,
) -> bytes:
    """The protobuf body of one forward/forward_backward chunk, filled as PROTOCOL.md 6.2 says.

    Serialized deterministically: map entries (loss_fn_inputs, loss_fn_config) in key order.
    The protobuf runtime (upb) otherwise orders them by a hash seeded per process, so even the
    official SDK's body for the same data differs from run to run; this way ours is
    reproducible and equals the official body serialized deterministically
    (tests/conformance).

    A message's fields are written in field-number order, so the body is the concatenation
    of its parts: the fields before `data` and after it are serialized by the protobuf
    runtime, and each datum is framed here around its array buffers (`_datum_parts`) or, if
    it holds anything but text chunks and dense tensors, serialized by the runtime too. The
    large buffers are copied once, into the body, instead of into messages and then out.

    Raises:
        InvalidInputError: an image-pointer chunk (protobuf carries inline images only).
    """
    head = _pb.ForwardBackwardRequest(model_id=model_id, seq_id=seq_id)
    tail = _pb.ForwardBackwardRequest(loss_fn=loss_fn, forward_only=forward_only)
    for key, value in (loss_fn_config or {}).items():
        if isinstance(value, str):
            tail.loss_fn_config_v2[key].text = value
        else:
            tail.loss_fn_config[key] = float(value)
            tail.loss_fn_config_v2[key].number = float(value)
    parts: list[bytes | memoryview] = [head.SerializeToString()]
    for index, datum in enumerate(data):
        framed = _datum_parts(datum)
        if framed is None:
            message = _pb.Datum()
            _fill_datum(message, datum, index)
            serialized = message.SerializeToString(deterministic=True)
            parts += (_DATA_TAG, _varint(len(serialized)), serialized)
        else:
            parts += (_DATA_TAG, _varint(framed[1]), *framed[0])
    parts.append(tail.SerializeToString(deterministic=True))
    return b"".join(parts)


# Tags (field number << 3 | wire type 2, length-delimited) of the hand-framed messages.
_DATA_TAG: Final = b"\x1a"  # ForwardBackwardRequest.data = 3
_FIRST_TAG: Final = b"\x0a"  # Datum.model_input = 1, Chunk.encoded_text = 1,
#                               EncodedTextChunk.tokens = 1, map entry key = 1, Tensor.dense = 1
_SECOND_TAG: Final = b"\x12"  # Datum.loss_fn_inputs = 2, map entry value = 2
_DTYPE_TAGS: Final = {"float32": b"\x18\x01", "int64": b"\x18\x02"}  # Tensor.dtype = 3
_SHAPE_TAG: Final = b"\x22"  # Tensor.shape = 4, packed varints


_SMALL_VARINTS: Final = tuple(bytes([value]) for value in range(128))


def _varint(value: int) -> bytes:
    """A non-negative int as a protobuf base-128 varint."""
    if value < 128:
        return _SMALL_VARINTS[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _datum_parts(datum: t.Datum) -> tuple[list[bytes | memoryview], int] | None:
    """The serialized `Datum` of text chunks and dense tensors as parts around the array
    buffers, and its size: byte for byte what the runtime writes deterministically. None for
    anything else (images, sparse tensors, provenance, an empty key, a negative dimension).

    Each length-delimited field is tag, varint length, payload; sizes are summed as the
    parts are made, since this runs per datum on every step."""
    if datum.model_input_spans is not t.UNSET:
        return None
    parts: list[bytes | memoryview] = []
    size = 0
    for chunk in datum.model_input.chunks:
        if not isinstance(chunk, t.EncodedTextChunk):
            return None
        tokens = _tokens_buffer(chunk)
        n = len(tokens)
        if n:  # Datum.model_input { Chunk.encoded_text { EncodedTextChunk.tokens } }
            n_len = _varint(n)
            text = 1 + len(n_len) + n
            text_len = _varint(text)
            chunk_size = 1 + len(text_len) + text
            chunk_len = _varint(chunk_size)
            parts += (_FIRST_TAG, chunk_len, _FIRST_TAG, text_len, _FIRST_TAG, n_len, tokens)
        else:  # proto3 omits empty bytes: an empty EncodedTextChunk
            chunk_size, chunk_len = 2, b"\x02"
            parts += (_FIRST_TAG, chunk_len, _FIRST_TAG, b"\x00")
        size += 1 + len(chunk_len) + chunk_size
    for key in sorted(datum.loss_fn_inputs):
        tensor = datum.loss_fn_inputs[key]
        if not key or tensor.sparse_crow_indices is not t.UNSET:
            return None
        shape = tensor.resolved_shape()
        if any(d < 0 for d in shape):
            return None
        values = _tensor_buffer(tensor)
        values_len = _varint(len(values))
        # Tensor { dense, dtype, shape (packed varints, absent when empty) }
        tensor_size = 1 + len(values_len) + len(values) + 2
        dims = b"".join(_varint(d) for d in shape)
        if dims:
            dims_len = _varint(len(dims))
            tensor_size += 1 + len(dims_len) + len(dims)
        key_bytes = key.encode()
        key_len = _varint(len(key_bytes))
        tensor_len = _varint(tensor_size)
        # map entry { key = 1, value = 2 }
        entry_size = 1 + len(key_len) + len(key_bytes) + 1 + len(tensor_len) + tensor_size
        entry_len = _varint(entry_size)
        parts += (
            _SECOND_TAG,
            entry_len,
            _FIRST_TAG,
            key_len,
            key_bytes,
            _SECOND_TAG,
            tensor_len,
            _FIRST_TAG,
            values_len,
            values,
            _DTYPE_TAGS[tensor.dtype],
        )
        if dims:
            parts += (_SHAPE_TAG, dims_len, dims)
        size += 1 + len(entry_len) + entry_size
    return parts, size


def _fill_datum(wire: Any, datum: t.Datum, index: int) -> None:
    """Fill a `Datum` message (the general path, any datum PROTOCOL.md 6.2 allows)."""
    for chunk in datum.model_input.chunks:
        if isinstance(chunk, t.EncodedTextChunk):
            wire.model_input.add().encoded_text.tokens = _tokens_bytes(chunk)
        elif isinstance(chunk, t.ImageChunk):
            image = wire.model_input.add().image
            image.data = chunk.data
            image.format = chunk.format
            if chunk.expected_tokens is not t.UNSET:
                image.expected_tokens = chunk.expected_tokens
        else:
            raise InvalidInputError(
                f"data[{index}] holds an image_asset_pointer chunk, which the protobuf "
                "forward_backward form cannot carry (PROTOCOL.md 6.2); inline the image "
                "(ImageChunk) or use wire_format='json'"
            )
    for key, tensor in datum.loss_fn_inputs.items():
        wire_tensor = wire.loss_fn_inputs[key]
        wire_tensor.dtype = _WIRE_DTYPE[tensor.dtype]
        wire_tensor.shape.extend(tensor.resolved_shape())
        values = _tensor_bytes(tensor)
        if tensor.sparse_crow_indices is t.UNSET:
            wire_tensor.dense = values
        else:
            csr = wire_tensor.sparse_csr
            csr.values = values
            csr.crow_indices = np.asarray(tensor.sparse_crow_indices, _LE_INT64).tobytes()
            cols = tensor.sparse_col_indices
            csr.col_indices = np.asarray([] if cols is t.UNSET else cols, _LE_INT64).tobytes()
    if datum.model_input_spans is not t.UNSET and datum.loss_fn_input_spans is not t.UNSET:
        _encode_spans(datum.model_input_spans, wire.model_input_spans)
        _encode_spans(datum.loss_fn_input_spans, wire.loss_fn_input_spans)


def _encode_spans(spans: Sequence[t.ProvenanceSpan], target: Any) -> None:
    """Provenance spans as `ProvenanceSpan` messages (PROTOCOL.md 6.1-6.2)."""
    for span in spans:
        wire = target.add()
        arm = (
            wire.sampled_tokens if isinstance(span, t.SampledProvenanceSpan) else wire.prompt_tokens
        )
        arm.sequence_id = span.sequence_id
        arm.offset = span.offset
        arm.length = span.length


def _decode_spans(spans: Any, where: str) -> list[t.ProvenanceSpan]:
    out: list[t.ProvenanceSpan] = []
    for j, wire in enumerate(spans):
        kind = wire.WhichOneof("span")
        if kind == "prompt_tokens":
            cls: type[t.PromptProvenanceSpan] | type[t.SampledProvenanceSpan] = (
                t.PromptProvenanceSpan
            )
        elif kind == "sampled_tokens":
            cls = t.SampledProvenanceSpan
        else:
            raise ValueError(
                f"{where}[{j}]: a ProvenanceSpan must set prompt_tokens or sampled_tokens"
            )
        arm = getattr(wire, kind)
        try:
            out.append(cls(sequence_id=arm.sequence_id, offset=arm.offset, length=arm.length))
        except ValueError as exc:
            raise ValueError(f"{where}[{j}]: {exc}") from None
    return out


@dataclass(frozen=True)
class ForwardBackwardProto:
    """A decoded protobuf forward_backward request, in our wire types."""

    model_id: str
    seq_id: int | None
    forward_only: bool
    loss_fn: str
    loss_fn_config: dict[str, float | str]
    data: list[t.Datum]


def _wire_dtype_name(code: int, what: str) -> t.TensorDType:
    if code == DTYPE_FLOAT32:
        return "float32"
    if code == DTYPE_INT64:
        return "int64"
    raise ValueError(f"{what}: dtype {code} is not float32 (1) or int64 (2) (PROTOCOL.md 6.2)")


def decode_forward_backward_request(body: bytes) -> ForwardBackwardProto:
    """Parse a protobuf forward_backward body (already decompressed); ValueError if malformed.

    `loss_fn_config_v2` wins over the legacy numeric map when present (PROTOCOL.md 6.1);
    `seq_id` 0 means "unset" (5.2).
    """
    request = _pb.ForwardBackwardRequest()
    try:
        request.ParseFromString(body)
    except Exception as exc:  # the runtime's DecodeError differs between implementations
        raise ValueError(f"the protobuf ForwardBackwardRequest does not parse: {exc}") from None
    config: dict[str, float | str] = {}
    if request.loss_fn_config_v2:
        for key, value in request.loss_fn_config_v2.items():
            kind = value.WhichOneof("value")
            config[key] = value.text if kind == "text" else float(value.number)
    else:
        config = {key: float(value) for key, value in request.loss_fn_config.items()}
    data: list[t.Datum] = []
    for i, wire in enumerate(request.data):
        chunks: list[t.ModelInputChunk] = []
        for j, chunk in enumerate(wire.model_input):
            kind = chunk.WhichOneof("chunk")
            where = f"data[{i}].model_input[{j}]"
            if kind == "encoded_text":
                tokens = _frombuffer(chunk.encoded_text.tokens, _LE_INT32, where)
                text = t.EncodedTextChunk(tokens=tokens)  # type: ignore[arg-type]  # lazy
                text._array = tokens  # type: ignore[attr-defined]
                chunks.append(text)
            elif kind == "image":
                image = chunk.image
                if image.format not in ("png", "jpeg"):
                    raise ValueError(f"{where}: image format {image.format!r} is not png or jpeg")
                chunks.append(
                    t.ImageChunk(
                        data=image.data,
                        format=image.format,
                        expected_tokens=(
                            image.expected_tokens if image.HasField("expected_tokens") else t.UNSET
                        ),
                    )
                )
            else:
                raise ValueError(f"{where}: chunk kind {kind!r} is not supported")
        inputs: dict[str, t.TensorData] = {}
        for key, tensor in wire.loss_fn_inputs.items():
            where = f"data[{i}].loss_fn_inputs[{key!r}]"
            dtype = _wire_dtype_name(tensor.dtype, where)
            shape = list(tensor.shape)
            if tensor.WhichOneof("encoding") == "sparse_csr":
                csr = tensor.sparse_csr
                values = _frombuffer(csr.values, _NUMPY[dtype], where + ".values")
                inputs[key] = t.TensorData(
                    data=values.tolist(),
                    dtype=dtype,
                    shape=shape or t.UNSET,
                    sparse_crow_indices=_frombuffer(csr.crow_indices, _LE_INT64, where).tolist(),
                    sparse_col_indices=_frombuffer(csr.col_indices, _LE_INT64, where).tolist(),
                )
            else:
                values = _frombuffer(tensor.dense, _NUMPY[dtype], where)
                if shape and math.prod(shape) != values.size:
                    raise ValueError(f"{where}: shape {shape} does not hold {values.size} values")
                inputs[key] = _tensor_data(values, dtype, shape or [values.size])
        datum = t.Datum(model_input=t.ModelInput(chunks=chunks), loss_fn_inputs=inputs)
        # Proto3 repeated fields cannot tell "absent" from "empty": spans are present when
        # either list has an entry (the SDK writes both or neither, 6.2).
        if wire.model_input_spans or wire.loss_fn_input_spans:
            datum.model_input_spans = _decode_spans(
                wire.model_input_spans, f"data[{i}].model_input_spans"
            )
            datum.loss_fn_input_spans = _decode_spans(
                wire.loss_fn_input_spans, f"data[{i}].loss_fn_input_spans"
            )
        data.append(datum)
    return ForwardBackwardProto(
        model_id=request.model_id,
        seq_id=request.seq_id or None,
        forward_only=request.forward_only,
        loss_fn=request.loss_fn,
        loss_fn_config=config,
        data=data,
    )


# -------------------------------------------------------------- ForwardBackwardOutput


def _trailing_shapes(datum: dict[str, t.TensorData]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple((name, tuple(x.resolved_shape()[1:])) for name, x in datum.items())


def encode_forward_backward_output(output: t.ForwardBackwardOutput) -> bytes:
    """The datums' outputs as `ArrayRecord`s (PROTOCOL.md 6.4), usually one.

    Each field's per-datum values are concatenated; offsets are byte offsets; the trailing
    shape is the datum shape after its first axis. A record has one trailing shape per field,
    so a datum whose trailing shapes differ from the previous one's (a custom loss's [N, K]
    logprobs with another K) starts a new record; the client concatenates records in order.
    """
    message = _pb.ForwardBackwardOutput(loss_fn_output_type=output.loss_fn_output_type)
    for key, value in output.metrics.items():
        message.metrics[key] = float(value)
    groups: list[list[dict[str, t.TensorData]]] = []
    for datum in output.loss_fn_outputs:
        if groups and _trailing_shapes(groups[-1][0]) == _trailing_shapes(datum):
            groups[-1].append(datum)
        else:
            groups.append([datum])
    for outputs in groups:
        record = message.loss_fn_outputs.add(num_datums=len(outputs))
        for name in outputs[0]:
            tensors = [datum[name] for datum in outputs]
            arrays = [_array_of(x).ravel() for x in tensors]
            sizes = np.fromiter((a.nbytes for a in arrays), dtype=np.int64, count=len(arrays))
            offsets = np.zeros(len(arrays) + 1, dtype=_LE_INT64)
            np.cumsum(sizes, out=offsets[1:])
            field = record.fields[name]
            field.data = b"".join(a.tobytes() for a in arrays)
            field.offsets = offsets.tobytes()
            field.dtype = _WIRE_DTYPE[tensors[0].dtype]
            field.trailing_shape.extend(tensors[0].resolved_shape()[1:])
    body: bytes = message.SerializeToString()
    return body


def _batched_values(field: Any, name: str) -> tuple[list[npt.NDArray[Any]], t.TensorDType]:
    offsets = _frombuffer(field.offsets, _LE_INT64, f"field {name!r} offsets")
    raw = field.data
    if (
        len(offsets) == 0
        or offsets[0] != 0
        or offsets[-1] != len(raw)
        or np.any(np.diff(offsets) < 0)
    ):
        raise ValueError(f"field {name!r}: offsets do not cover its {len(raw)} data bytes")
    code = field.dtype
    if code == DTYPE_FLOAT32:
        values, label = _frombuffer(raw, _LE_FLOAT32, name), "float32"
        scale = 4
    elif code == DTYPE_INT64:
        values, label = _frombuffer(raw, _LE_INT64, name), "int64"
        scale = 8
    elif code == DTYPE_INT32:
        values, label = _frombuffer(raw, _LE_INT32, name).astype(np.int64), "int64"
        scale = 4
    elif code == DTYPE_BFLOAT16:
        # PROTOCOL.md 6.4: bfloat16 widens to float32 by moving its 16 bits into the high half.
        half = _frombuffer(raw, _LE_UINT16, name)
        values, label = (half.astype(np.uint32) << 16).view(np.float32), "float32"
        scale = 2
    else:
        raise ValueError(f"field {name!r}: unknown dtype {code}")
    bounds = offsets // scale
    if np.any(offsets % scale):
        raise ValueError(f"field {name!r}: offsets are not multiples of its element size")
    return [values[bounds[i] : bounds[i + 1]] for i in range(len(bounds) - 1)], label  # type: ignore[return-value]


def decode_forward_backward_output(body: bytes) -> t.ForwardBackwardOutput:
    """Read a protobuf `ForwardBackwardOutput` the way PROTOCOL.md 6.4 describes."""
    message = _pb.ForwardBackwardOutput()
    message.ParseFromString(body)
    metrics = {key: float(value) for key, value in message.metrics.items()}
    type_name = message.loss_fn_output_type
    if not message.loss_fn_outputs:
        return t.ForwardBackwardOutput(
            loss_fn_output_type=type_name or "ArrayRecord", loss_fn_outputs=[], metrics=metrics
        )
    if ":" in type_name:
        type_name = type_name.rsplit(":", 1)[1]
    outputs: list[dict[str, t.TensorData]] = []
    for record in message.loss_fn_outputs:
        columns: dict[str, tuple[list[npt.NDArray[Any]], t.TensorDType, list[int]]] = {}
        count = record.num_datums
        for name, field in record.fields.items():
            values, label = _batched_values(field, name)
            columns[name] = (values, label, list(field.trailing_shape))
            if count == 0:
                count = len(values)
        for name, (values, _, _) in columns.items():
            if len(values) != count:
                raise ValueError(f"field {name!r} has {len(values)} datums, expected {count}")
        for i in range(count):
            datum: dict[str, t.TensorData] = {}
            for name, (values, label, trailing) in columns.items():
                inner = math.prod(trailing)
                if inner and values[i].size % inner:
                    raise ValueError(f"field {name!r} datum {i}: size does not fit {trailing}")
                rows = values[i].size // inner if inner else 0
                datum[name] = _tensor_data(values[i], label, [rows, *trailing])
            outputs.append(datum)
    return t.ForwardBackwardOutput(
        loss_fn_output_type=type_name, loss_fn_outputs=outputs, metrics=metrics
    )


# -------------------------------------------------------------------- SampleResponse


def _floats_with_none(values: npt.NDArray[Any]) -> list[float | None]:
    """float32 → list, NaN → None (PROTOCOL.md 6.5); Python work only per NaN."""
    out: list[float | None] = values.tolist()
    for index in np.flatnonzero(np.isnan(values)).tolist():
        out[index] = None
    return out


def _encode_topk(rows: Sequence[t.TopkLogprobs | None], target: Any) -> None:
    k = max((len(row) for row in rows if row), default=0)
    length = len(rows)
    token_ids = np.full((length, k), TOPK_EMPTY_TOKEN, dtype=_LE_INT32)
    logprobs = np.full((length, k), TOPK_EMPTY_LOGPROB, dtype=_LE_FLOAT32)
    for i, row in enumerate(rows):
        for j, (token, logprob) in enumerate(row or ()):
            token_ids[i, j] = token
            logprobs[i, j] = logprob
    target.token_ids = token_ids.tobytes()
    target.logprobs = logprobs.tobytes()
    target.k = k
    target.length = length


def _decode_topk(message: Any) -> list[t.TopkLogprobs | None] | None:
    k, length = message.k, message.length
    if k == 0 or length == 0:
        return None
    token_ids = _frombuffer(message.token_ids, _LE_INT32, "topk token_ids")
    logprobs = _frombuffer(message.logprobs, _LE_FLOAT32, "topk logprobs")
    if token_ids.size != k * length or logprobs.size != k * length:
        raise ValueError(f"top-k matrices do not hold {length} x {k} cells")
    ids = token_ids.reshape(length, k).tolist()
    lps = logprobs.reshape(length, k).tolist()
    empty = (token_ids == TOPK_EMPTY_TOKEN) & (logprobs == np.float32(TOPK_EMPTY_LOGPROB))
    filled = (~empty.reshape(length, k)).tolist()
    rows: list[t.TopkLogprobs | None] = []
    for row_ids, row_lps, row_filled in zip(ids, lps, filled, strict=True):
        if not row_filled[0]:
            rows.append(None)
            continue
        width = k
        while width and not row_filled[width - 1]:
            width -= 1
        rows.append(list(zip(row_ids[:width], row_lps[:width], strict=True)))
    return rows


def encode_sample_response(response: t.SampleResponse) -> bytes:
    """A protobuf `SampleResponse` (PROTOCOL.md 6.5); sequence ids travel in the submit answer."""
    message = _pb.SampleResponse(prompt_cache_hit_tokens=response.prompt_cache_hit_tokens)
    for sequence in response.sequences:
        wire = message.sequences.add(
            stop_reason=STOP_REASON_LENGTH
            if sequence.stop_reason == "length"
            else STOP_REASON_STOP,
            tokens=np.asarray(sequence.tokens, dtype=_LE_INT32).tobytes(),
        )
        if sequence.logprobs is not None:
            wire.logprobs = np.asarray(sequence.logprobs, dtype=_LE_FLOAT32).tobytes()
        if sequence.topk_logprobs is not None:
            _encode_topk(sequence.topk_logprobs, wire.topk_sampled_logprobs)
    if response.prompt_logprobs is not None:
        values = np.array(
            [math.nan if v is None else v for v in response.prompt_logprobs], dtype=_LE_FLOAT32
        )
        message.prompt_logprobs = values.tobytes()
    if response.topk_prompt_logprobs is not None:
        _encode_topk(response.topk_prompt_logprobs, message.topk_prompt_logprobs)
    body: bytes = message.SerializeToString()
    return body


def decode_sample_response(
    body: bytes, sequence_ids: Sequence[str] | None = None
) -> t.SampleResponse:
    """Read a protobuf `SampleResponse` (PROTOCOL.md 6.5).

    `sequence_ids` are the submit response's `sample_sequence_ids` (the protobuf result has no
    ids); ValueError if their number differs from the number of sequences.
    """
    message = _pb.SampleResponse()
    message.ParseFromString(body)
    if sequence_ids is not None and len(sequence_ids) != len(message.sequences):
        raise ValueError(
            f"the submit response named {len(sequence_ids)} sample_sequence_ids but the result "
            f"has {len(message.sequences)} sequences"
        )
    sequences: list[t.SampledSequence] = []
    for j, wire in enumerate(message.sequences):
        if wire.stop_reason == STOP_REASON_STOP:
            stop: Any = "stop"
        elif wire.stop_reason == STOP_REASON_LENGTH:
            stop = "length"
        else:
            raise ValueError(f"sequence {j}: unknown stop_reason {wire.stop_reason}")
        logprobs = None
        if wire.HasField("logprobs") and wire.logprobs:
            logprobs = _frombuffer(wire.logprobs, _LE_FLOAT32, f"sequence {j} logprobs").tolist()
        sequences.append(
            t.SampledSequence(
                stop_reason=stop,
                tokens=_frombuffer(wire.tokens, _LE_INT32, f"sequence {j} tokens").tolist(),
                logprobs=logprobs,
                sequence_id=None if sequence_ids is None else sequence_ids[j],
                topk_logprobs=(
                    _decode_topk(wire.topk_sampled_logprobs)
                    if wire.HasField("topk_sampled_logprobs")
                    else None
                ),
            )
        )
    prompt_logprobs = None
    if message.HasField("prompt_logprobs") and message.prompt_logprobs:
        prompt_logprobs = _floats_with_none(
            _frombuffer(message.prompt_logprobs, _LE_FLOAT32, "prompt_logprobs")
        )
    topk = (
        _decode_topk(message.topk_prompt_logprobs)
        if message.HasField("topk_prompt_logprobs")
        else None
    )
    return t.SampleResponse(
        sequences=sequences,
        prompt_logprobs=prompt_logprobs,
        topk_prompt_logprobs=topk,
        prompt_cache_hit_tokens=message.prompt_cache_hit_tokens,
    )


__all__ = [
    "PROTOBUF_CONTENT_TYPE",
    "ZSTD_ENCODING",
    "ForwardBackwardProto",
    "compress",
    "decode_forward_backward_output",
    "decode_forward_backward_request",
    "decode_sample_response",
    "decompress",
    "encode_forward_backward_output",
    "encode_forward_backward_request",
    "encode_sample_response",
]
