"""Model inputs: chunks, `ModelInput`, `TensorData` and `Datum` (PROTOCOL.md 7.1-7.3)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol, Union, cast

import msgspec
import numpy as np
import numpy.typing as npt

from tinkex_trio.types._base import UNSET, UnsetType

if TYPE_CHECKING:
    from typing import Self


class _Chunk(msgspec.Struct, kw_only=True, tag_field="type"):
    pass


class EncodedTextChunk(_Chunk, tag="encoded_text", dict=True):
    """A run of token ids.

    Built from numpy (or torch), the chunk holds the array (attribute `_array`, `dict=True`)
    and makes the `tokens` list only when someone reads it: the protobuf encoder copies the
    buffer and the JSON encoder converts it in C (`enc_hook`), so a chunk that is only sent
    never becomes a list of Python ints. Treat `tokens` as immutable once built.
    """

    tokens: list[int]

    @property
    def length(self) -> int:
        return len(_TOKENS_SLOT.__get__(self))

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self.tokens == other.tokens

    def __repr__(self) -> str:
        self.tokens  # noqa: B018  # the list, not the held array
        return msgspec.Struct.__repr__(self)


class ImageChunk(_Chunk, tag="image"):
    """An inline PNG/JPEG image; `data` travels as standard base64 in JSON."""

    data: bytes
    format: Literal["png", "jpeg"]
    expected_tokens: int | UnsetType = UNSET

    @property
    def length(self) -> int:
        if self.expected_tokens is UNSET:
            raise ValueError(
                "ImageChunk.expected_tokens is not set, so its length in tokens is unknown; "
                "pass expected_tokens=<count>"
            )
        return self.expected_tokens


class ImageAssetPointerChunk(_Chunk, tag="image_asset_pointer"):
    """An image referenced by path or URL."""

    format: Literal["png", "jpeg"]
    location: str
    expected_tokens: int | UnsetType = UNSET

    @property
    def length(self) -> int:
        if self.expected_tokens is UNSET:
            raise ValueError(
                "ImageAssetPointerChunk.expected_tokens is not set, so its length in tokens is "
                "unknown; pass expected_tokens=<count>"
            )
        return self.expected_tokens


ModelInputChunk = Union[EncodedTextChunk, ImageChunk, ImageAssetPointerChunk]  # noqa: UP007


class _Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


class ModelInput(msgspec.Struct, kw_only=True):
    """A sequence of chunks: what the model reads. Immutable in spirit: `append*` return new inputs."""

    chunks: list[ModelInputChunk] = []

    @classmethod
    def empty(cls) -> Self:
        return cls(chunks=[])

    @classmethod
    def from_ints(cls, tokens: Iterable[int] | npt.NDArray[np.integer[Any]]) -> Self:
        """One text chunk of `tokens`: a list, any iterable of ints, a numpy array or a
        torch tensor. Converted once, in C (see `_token_list`)."""
        values, array = _token_list(tokens)
        chunk = EncodedTextChunk(tokens=values)  # type: ignore[arg-type]  # an array: lazy
        if array is not None:
            chunk._array = array  # type: ignore[attr-defined]  # see EncodedTextChunk
        return cls(chunks=[chunk])

    @classmethod
    def from_text(cls, text: str, tokenizer: _Encoder) -> Self:
        """Tokenize `text` (no special tokens added) with a tokenizer from `get_tokenizer`."""
        return cls.from_ints(tokenizer.encode(text))

    def append(self, chunk: ModelInputChunk) -> ModelInput:
        return ModelInput(chunks=[*self.chunks, chunk])

    def append_int(self, token: int) -> ModelInput:
        """Append one token, extending the last text chunk when there is one."""
        if self.chunks and isinstance(self.chunks[-1], EncodedTextChunk):
            last = self.chunks[-1]
            return ModelInput(
                chunks=[*self.chunks[:-1], EncodedTextChunk(tokens=[*last.tokens, token])]
            )
        return self.append(EncodedTextChunk(tokens=[token]))

    @property
    def length(self) -> int:
        """Length in tokens (images count `expected_tokens`)."""
        return sum(chunk.length for chunk in self.chunks)

    def to_ints(self) -> list[int]:
        """All token ids; raises ValueError if the input holds an image."""
        out: list[int] = []
        for chunk in self.chunks:
            if not isinstance(chunk, EncodedTextChunk):
                raise ValueError(
                    f"ModelInput.to_ints() needs text-only input, but it holds a {chunk.__class__.__name__}"
                )
            out.extend(chunk.tokens)
        return out


# ------------------------------------------------------------------ conversions, once, in C

_INT_LIST: Final = list[int]
_FLOAT_LIST: Final = list[float]
_EXACT_TYPES: Final[dict[str, Any]] = {"int64": _INT_LIST, "float32": _FLOAT_LIST}


def _exact_list(values: object, list_type: Any) -> list[Any] | None:
    """A copy of `values` if it is a list or tuple of Python numbers of the right kind
    (ints; or ints and floats for a float list), checked and copied in C by msgspec; None if
    it holds anything else (numpy scalars, bools, strings, nested lists), so the caller takes
    the general path. No per-element Python work either way."""
    if not isinstance(values, list | tuple):
        return None
    try:
        result: list[Any] = msgspec.convert(values, list_type)
    except msgspec.ValidationError:
        return None
    return result


def _token_list(
    tokens: object,
) -> tuple[list[int] | npt.NDArray[np.int64], npt.NDArray[np.int64] | None]:
    """(tokens, the numpy array they came from or None) for `ModelInput.from_ints`.

    * a list/tuple of Python ints: checked and copied by msgspec in C (the common case);
    * a numpy array: kept as the (int64, flat) array; the list is made when it is read;
    * a torch tensor: its numpy view, then as numpy;
    * a list of numpy integer scalars or bools: one `numpy.asarray`, then as numpy;
    * anything else (a generator, numpy scalars, bools): `int()` of each element, as before.
    """
    exact = _exact_list(tokens, _INT_LIST)
    if exact is not None:
        return exact, None
    if type(tokens).__module__.startswith("torch"):
        tokens = tokens.detach().cpu().numpy()  # type: ignore[attr-defined]
    if isinstance(tokens, list | tuple):
        as_array = np.asarray(tokens)  # numpy integer scalars, bools: one pass in C
        if as_array.ndim == 1 and as_array.dtype.kind in "iub":
            tokens = as_array
    if isinstance(tokens, np.ndarray):
        array = tokens.astype(np.int64, copy=False).ravel()
        return array, array
    return [int(t) for t in cast(Iterable[Any], tokens)], None


TensorDType = Literal["int64", "float32"]

_NUMPY_DTYPES: dict[str, npt.DTypeLike] = {"int64": np.int64, "float32": np.float32}

# PROTOCOL.md 7.2: plain lists get a dtype by key; any other key must come typed.
LOSS_INPUT_DTYPES: dict[str, TensorDType] = {
    "target_tokens": "int64",
    "weights": "float32",
    "advantages": "float32",
    "logprobs": "float32",
    "clip_low_threshold": "float32",
    "clip_high_threshold": "float32",
    "sequence_ratio_mask": "float32",
}


class TensorData(msgspec.Struct, kw_only=True, dict=True):
    """A flat tensor on the wire: dense, or sparse CSR (PROTOCOL.md 7.2).

    Build it with `from_numpy` / `from_list` / `from_torch`; read it back with `to_numpy`.
    Conversion uses C loops (`msgspec.convert`, `struct`, numpy), never a Python loop per
    element. A tensor built from numpy, or decoded from a protobuf result, holds the flat
    array (`dict=True`, attribute `_array`) and makes the `data` list only when `data` is
    read: the protobuf encoder sends the buffer as is (PROTOCOL.md 6.2), the JSON encoder
    converts it in C (`enc_hook`), `to_numpy` copies it, `size` counts it. Treat `data` as
    immutable once built.
    """

    data: list[int | float]
    dtype: TensorDType
    shape: list[int] | UnsetType = UNSET
    sparse_crow_indices: list[int] | UnsetType = UNSET
    sparse_col_indices: list[int] | UnsetType = UNSET

    @classmethod
    def from_numpy(cls, array: npt.NDArray[Any]) -> TensorData:
        flat: npt.NDArray[Any]
        if array.dtype.kind == "f":
            dtype: TensorDType = "float32"
            flat = array.astype(np.float32, copy=False).ravel()
        elif array.dtype.kind in "iub":
            dtype = "int64"
            flat = array.astype(np.int64, copy=False).ravel()
        else:
            raise TypeError(f"TensorData cannot hold numpy dtype {array.dtype}; use a number dtype")
        out = cls(data=flat, dtype=dtype, shape=list(array.shape))  # type: ignore[arg-type]
        out._array = flat  # type: ignore[attr-defined]  # see the class docstring
        return out

    @classmethod
    def from_list(cls, values: Sequence[int | float], dtype: TensorDType) -> TensorData:
        """A flat tensor from a list. A list of Python numbers of the dtype's kind is checked
        and copied in C (`msgspec.convert`) and kept as the JSON data; the protobuf encoder
        converts it to a buffer once, when it is sent. Anything else (numpy scalars, bools,
        numbers as strings) goes through `numpy.asarray` once."""
        values_list = _exact_list(values, _EXACT_TYPES[dtype])
        if values_list is None:
            array = np.asarray(values, dtype=_NUMPY_DTYPES[dtype])
            if array.ndim != 1:
                raise ValueError(
                    "TensorData.from_list takes a flat list; use from_numpy for N-d data"
                )
            values_list = array.tolist()
        return cls(data=values_list, dtype=dtype, shape=[len(values_list)])

    @classmethod
    def from_torch(cls, tensor: Any) -> TensorData:
        """From a torch tensor (bfloat16 becomes float32); torch is imported by the caller."""
        detached = tensor.detach().cpu()
        if str(detached.dtype) == "torch.bfloat16":
            detached = detached.float()
        return cls.from_numpy(detached.numpy())

    @property
    def is_sparse(self) -> bool:
        return self.sparse_crow_indices is not UNSET

    @property
    def size(self) -> int:
        """How many values `data` holds, without making the list."""
        return len(_DATA_SLOT.__get__(self))

    def resolved_shape(self) -> list[int]:
        if self.shape is not UNSET:
            return list(self.shape)
        return [self.size]

    def values_array(self) -> npt.NDArray[Any]:
        """The values as a flat array of the dtype: the held array itself when there is one
        (read-only use; `to_numpy` gives a copy), else converted from the list once."""
        np_dtype = _NUMPY_DTYPES[self.dtype]
        cached = held_array(self)
        if cached is not None:
            return cached.astype(np_dtype, copy=False)
        return np.asarray(_DATA_SLOT.__get__(self), dtype=np_dtype)

    def to_numpy(self, pad_value: float = 0) -> npt.NDArray[Any]:
        """A dense numpy array of this tensor; sparse cells not stored take `pad_value`."""
        np_dtype = _NUMPY_DTYPES[self.dtype]
        cached = held_array(self)
        if cached is not None:
            values = cached.astype(np_dtype)  # a copy: the caller may write to it
        else:
            values = np.asarray(_DATA_SLOT.__get__(self), dtype=np_dtype)
        shape = self.resolved_shape()
        if self.sparse_crow_indices is UNSET:
            return values.reshape(shape)
        if self.sparse_col_indices is UNSET or len(shape) != 2:
            raise ValueError("sparse TensorData needs sparse_col_indices and a 2-D shape")
        crow = np.asarray(self.sparse_crow_indices, dtype=np.int64)
        cols = np.asarray(self.sparse_col_indices, dtype=np.int64)
        dense = np.full(shape, pad_value, dtype=np_dtype)
        rows = np.repeat(np.arange(shape[0]), np.diff(crow))
        dense[rows, cols] = values
        return dense

    def to_torch(self) -> Any:
        import torch

        return torch.from_numpy(self.to_numpy())

    def tolist(self) -> list[int | float]:
        return list(self.data)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self.__struct_fields__)

    def __repr__(self) -> str:
        self.data  # noqa: B018  # the list, not the held array
        return msgspec.Struct.__repr__(self)


# ------------------------------------------------------- lists made when they are read
#
# `TensorData.data` and `EncodedTextChunk.tokens` are msgspec fields, stored in slots that
# msgspec reads and writes directly (init, encode, decode, replace). The slot may hold the
# numpy array the value was built from; the class attribute is replaced by a property that
# turns the array into a list on first read and keeps that list, so readers always see a list
# while code that only sends the value never makes one. `held_array` gives the array back.

_DATA_SLOT: Final[Any] = TensorData.__dict__["data"]
_TOKENS_SLOT: Final[Any] = EncodedTextChunk.__dict__["tokens"]


def _lazy_list(slot: Any) -> property:
    def read(self: Any) -> list[Any]:
        value = slot.__get__(self)
        if isinstance(value, np.ndarray):
            value = value.tolist()
            slot.__set__(self, value)
            # The list goes to a caller who may change it in place: from now on it, not the
            # array, is the value (else protobuf would send the array, JSON the list).
            self.__dict__.pop("_array", None)
        return value  # type: ignore[no-any-return]

    def write(self: Any, value: Any) -> None:
        slot.__set__(self, value)
        self.__dict__.pop("_array", None)  # the new value replaces the held array

    return property(read, write, doc=slot.__doc__)


TensorData.data = _lazy_list(_DATA_SLOT)  # type: ignore[assignment]
EncodedTextChunk.tokens = _lazy_list(_TOKENS_SLOT)  # type: ignore[assignment]


def held_array(value: TensorData | EncodedTextChunk) -> npt.NDArray[Any] | None:
    """The numpy array `value` was built from or decoded into, or None (built from a list,
    or its list was read or assigned since: then the list is the value)."""
    cached = value.__dict__.get("_array")
    slot = _DATA_SLOT if isinstance(value, TensorData) else _TOKENS_SLOT
    if isinstance(cached, np.ndarray) and cached.size == len(slot.__get__(value)):
        return cached
    return None


def to_tensor_data(key: str, value: Any) -> TensorData:
    """Coerce one loss input by the dtype-by-key rules of PROTOCOL.md 7.2."""
    if isinstance(value, TensorData):
        return value
    if isinstance(value, np.ndarray):
        return TensorData.from_numpy(value)
    if type(value).__module__.startswith("torch"):
        return TensorData.from_torch(value)
    if isinstance(value, list | tuple):
        dtype = LOSS_INPUT_DTYPES.get(key)
        if dtype is None:
            raise ValueError(
                f"loss_fn_inputs[{key!r}] is a plain list, but only "
                f"{sorted(LOSS_INPUT_DTYPES)} may be; pass a numpy array or TensorData instead"
            )
        if value and isinstance(value[0], list | tuple):
            return TensorData.from_numpy(np.asarray(value, dtype=_NUMPY_DTYPES[dtype]))
        return TensorData.from_list(value, dtype)
    raise TypeError(
        f"loss_fn_inputs[{key!r}] has type {type(value).__name__}; "
        "use a list, numpy array, torch tensor or TensorData"
    )


class _ProvenanceSpan(msgspec.Struct, kw_only=True, frozen=True, tag_field="type"):
    """A run of a datum's tokens that reproduces tokens of a sampled sequence's request.

    `sequence_id` is a `SampledSequence.sequence_id`; `offset` the run's start within that
    sequence's prompt (prompt span) or sampled tokens (sampled span); `length` its token count.
    Runs tile the field they annotate, in order (PROTOCOL.md 7.3).
    """

    sequence_id: str
    offset: int = 0
    length: int

    def __post_init__(self) -> None:
        kind = type(self).__name__
        if not isinstance(self.sequence_id, str) or not self.sequence_id:
            raise ValueError(
                f"{kind}.sequence_id must be a non-empty string (a SampledSequence.sequence_id)"
            )
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"{kind}.offset must be an int >= 0, got {self.offset!r}")
        if isinstance(self.length, bool) or not isinstance(self.length, int) or self.length < 0:
            raise ValueError(f"{kind}.length must be an int >= 0, got {self.length!r}")


class PromptProvenanceSpan(_ProvenanceSpan, frozen=True, tag="prompt_tokens"):
    """Tokens that were positions `[offset, offset + length)` of the named sequence's prompt."""


class SampledProvenanceSpan(_ProvenanceSpan, frozen=True, tag="sampled_tokens"):
    """Tokens that were positions `[offset, offset + length)` of the named sequence's sampled
    tokens (two sequences back to back are two spans)."""


ProvenanceSpan = PromptProvenanceSpan | SampledProvenanceSpan


def check_span_tiling(field: str, spans: Sequence[ProvenanceSpan], expected: int) -> None:
    """`spans` must be provenance spans whose lengths sum to `expected`; ValueError naming
    `field` otherwise."""
    if isinstance(spans, str | bytes) or not isinstance(spans, Sequence):
        raise ValueError(f"{field} must be a list of PromptProvenanceSpan/SampledProvenanceSpan")
    for j, span in enumerate(spans):
        if not isinstance(span, PromptProvenanceSpan | SampledProvenanceSpan):
            raise ValueError(
                f"{field}[{j}] is a {type(span).__name__}; use PromptProvenanceSpan or "
                "SampledProvenanceSpan"
            )
    total = sum(span.length for span in spans)
    if total != expected:
        raise ValueError(
            f"{field} cover {total} positions but the field has {expected}; the spans' lengths "
            "must sum to it exactly (they tile it in order)"
        )


class Datum(msgspec.Struct, kw_only=True):
    """One training example: the model input and its per-token loss inputs.

    `loss_fn_inputs` values may be given as lists, numpy arrays, torch tensors or TensorData;
    they are converted on construction (PROTOCOL.md 7.2 dtype-by-key rules).

    Provenance (PROTOCOL.md 7.3, needed by `stable_reinforce`): `model_input_spans` tile the
    model input's tokens and `loss_fn_input_spans` tile `target_tokens`, each naming the sampled
    sequences the tokens came from. Both or neither; attach them with `with_provenance`, which
    checks the tiling.
    """

    model_input: ModelInput
    loss_fn_inputs: dict[str, TensorData]
    model_input_spans: list[ProvenanceSpan] | UnsetType = UNSET
    loss_fn_input_spans: list[ProvenanceSpan] | UnsetType = UNSET

    def __post_init__(self) -> None:
        inputs: Mapping[str, Any] = self.loss_fn_inputs
        if any(not isinstance(v, TensorData) for v in inputs.values()):
            self.loss_fn_inputs = {k: to_tensor_data(k, v) for k, v in inputs.items()}
        if (self.model_input_spans is UNSET) != (self.loss_fn_input_spans is UNSET):
            raise ValueError(
                "Datum provenance comes as a pair: set both model_input_spans and "
                "loss_fn_input_spans, or neither (Datum.with_provenance sets both)"
            )

    @property
    def has_provenance(self) -> bool:
        return self.model_input_spans is not UNSET

    def with_provenance(
        self,
        model_input: Sequence[ProvenanceSpan],
        loss_fn_inputs: Sequence[ProvenanceSpan],
    ) -> Datum:
        """A copy carrying provenance: `model_input` spans tile the model input's tokens,
        `loss_fn_inputs` spans tile `loss_fn_inputs["target_tokens"]`.

        Raises:
            ValueError: a span list that does not tile its field (the message names it).
        """
        check_span_tiling("model_input spans", model_input, self.model_input.length)
        targets = self.loss_fn_inputs.get("target_tokens")
        if targets is None:
            raise ValueError(
                "with_provenance needs loss_fn_inputs['target_tokens'], which the "
                "loss_fn_inputs spans tile"
            )
        check_span_tiling("loss_fn_inputs spans", loss_fn_inputs, targets.resolved_shape()[0])
        return msgspec.structs.replace(
            self, model_input_spans=list(model_input), loss_fn_input_spans=list(loss_fn_inputs)
        )
