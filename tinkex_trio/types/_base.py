"""Base classes and the JSON codec shared by every wire type.

Conventions (DESIGN.md "Wire types", PROTOCOL.md 1.8 and A.0):

* Requests are `kw_only` and never `omit_defaults`: fields with real defaults are always sent,
  optional fields default to `UNSET` and are omitted, exactly as the official SDK 0.38 does
  ("defaults sent, nulls dropped").
* Responses ignore unknown fields (a newer server must not break this SDK) and emit every
  field, defaults and `type` tags included, as an official server does: re-encoding an official
  body loses nothing (`public`, `corrupted`, `type`, ...), and the local backend, which encodes
  every answer from these Structs, sends what an official server sends. Optional fields that an
  official server sends as `null` default to `None`. Other servers send `null` in optional
  fields that have a real default; `decode` then gives the default (see there). A strict client (the official SDKs validate
  direct responses with pydantic, PROTOCOL.md 1.8) never sees `null` where it expects a value,
  because such fields have real defaults (`public: bool = False`), never `None`. The few fields
  an official server leaves out when it has no value are `X | UnsetType | None = UNSET`, so both
  absence and `null` decode, and each re-encodes as it came.
* The local backend decodes requests with `decode_request`, which accepts both JSON conventions
  of Appendix A.0: `type` present or absent (chunk kinds inferred from their keys) and `null`
  wherever omission is accepted.
"""

from __future__ import annotations

import functools
from typing import Any, TypeVar

import msgspec
import msgspec.inspect
import numpy as np

T = TypeVar("T")

UNSET = msgspec.UNSET
UnsetType = msgspec.UnsetType


class Request(msgspec.Struct, kw_only=True):
    """Base of every request body the SDK sends."""


class Response(msgspec.Struct, kw_only=True):
    """Base of every response or result body: unknown fields are ignored when decoding, and
    every field is emitted when encoding (see the module docstring)."""


class EmptyResponse(Response, kw_only=True):
    """`{}`: the answer of calls typed as "nothing" (finish session, delete, publish, set TTL,
    assign project, cancel_future); clients ignore the body of any 2xx (PROTOCOL.md 1.8)."""


def enc_hook(obj: object) -> object:
    """msgspec `enc_hook`: a numpy array a `TensorData` or `EncodedTextChunk` holds (see
    `types._inputs`) encodes as its list, converted once in C."""
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise NotImplementedError(f"cannot encode objects of type {type(obj).__name__}")


_encoder = msgspec.json.Encoder(enc_hook=enc_hook)


def encode(obj: object) -> bytes:
    """Encode a wire object (or plain builtins) as JSON bytes."""
    return _encoder.encode(obj)


@functools.cache
def _decoder(type_: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(type_)


def decode(body: bytes | str, type_: type[T]) -> T:
    """Decode a response body into `type_` (one cached Decoder per type).

    Lenient about `null` in optional fields: other Tinker-compatible servers (SkyRL tx,
    hatchery-core) send `null` where an official server sends a default or nothing
    (`"public": null`, `"corrupted": null`). A field that has a default but whose type has no
    `None` then decodes to its default. The strict decode runs first, so well-formed bodies
    pay nothing; only a body that fails it is walked once to drop such nulls and decoded
    again; if that fails too, its error (naming what is really wrong) is raised.
    """
    decoder: msgspec.json.Decoder[T] = _decoder(type_)  # type: ignore[arg-type]
    try:
        result: T = decoder.decode(body)
    except msgspec.ValidationError:
        lenient = _without_defaulted_nulls(body, type_)
        if lenient is None:
            raise
        # Still invalid: the error now names what is really wrong, not a tolerated null.
        result = decoder.decode(lenient)
    return result


@functools.cache
def _type_info(type_: Any) -> msgspec.inspect.Type:
    return msgspec.inspect.type_info(type_)


def _without_defaulted_nulls(body: bytes | str, type_: Any) -> bytes | None:
    """`body` re-encoded without the nulls of optional fields that do not accept None, or None
    if it has none (or is not JSON)."""
    try:
        raw = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    if not _drop_defaulted_nulls(raw, _type_info(type_)):
        return None
    return _encoder.encode(raw)


_SEQUENCE_TYPES = (
    msgspec.inspect.ListType,
    msgspec.inspect.VarTupleType,
    msgspec.inspect.SetType,
    msgspec.inspect.FrozenSetType,
)


def _accepts_none(info: msgspec.inspect.Type) -> bool:
    if isinstance(info, msgspec.inspect.NoneType | msgspec.inspect.AnyType):
        return True
    return isinstance(info, msgspec.inspect.UnionType) and any(
        _accepts_none(member) for member in info.types
    )


def _struct_for(
    value: dict[str, Any], info: msgspec.inspect.UnionType
) -> msgspec.inspect.Type | None:
    """The struct member of a union that `value` (an object) decodes as, if one is clear."""
    structs = [m for m in info.types if isinstance(m, msgspec.inspect.StructType)]
    for member in structs:
        if member.tag_field is not None and value.get(member.tag_field) == member.tag:
            return member
    if len(structs) == 1:
        return structs[0]
    return next((m for m in info.types if isinstance(m, msgspec.inspect.DictType)), None)


def _drop_defaulted_nulls(value: Any, info: msgspec.inspect.Type) -> bool:
    """Delete, in place, every `null` of an optional field whose type has no None, so that the
    field takes its default; True if anything was deleted."""
    if isinstance(info, msgspec.inspect.UnionType):
        member: msgspec.inspect.Type | None
        if isinstance(value, dict):
            member = _struct_for(value, info)
        elif isinstance(value, list):
            member = next((m for m in info.types if isinstance(m, _SEQUENCE_TYPES)), None)
        else:
            member = None
        return member is not None and _drop_defaulted_nulls(value, member)
    changed = False
    if isinstance(info, msgspec.inspect.StructType) and isinstance(value, dict):
        for field in info.fields:
            name = field.encode_name
            if name not in value:
                continue
            if value[name] is None:
                if not field.required and not _accepts_none(field.type):
                    del value[name]
                    changed = True
            elif _drop_defaulted_nulls(value[name], field.type):
                changed = True
    elif isinstance(info, _SEQUENCE_TYPES) and isinstance(value, list):
        for item in value:
            changed = _drop_defaulted_nulls(item, info.item_type) or changed
    elif isinstance(info, msgspec.inspect.DictType) and isinstance(value, dict):
        for item in value.values():
            changed = _drop_defaulted_nulls(item, info.value_type) or changed
    return changed


# Chunk kinds by the keys that identify them when `type` is absent (PROTOCOL.md A.0 point 2).
def _infer_chunk_type(chunk: dict[str, Any]) -> str | None:
    if "tokens" in chunk:
        return "encoded_text"
    if "location" in chunk:
        return "image_asset_pointer"
    if "data" in chunk:
        return "image"
    return None


def _normalize(value: Any, key: str | None = None) -> Any:
    """Drop null-valued keys and fill in missing chunk `type`s, recursively."""
    if isinstance(value, dict):
        out = {k: _normalize(v, k) for k, v in value.items() if v is not None}
        return out
    if isinstance(value, list):
        if key == "chunks":
            chunks = []
            for item in value:
                if isinstance(item, dict) and "type" not in item:
                    kind = _infer_chunk_type(item)
                    if kind is not None:
                        item = {**item, "type": kind}
                chunks.append(_normalize(item))
            return chunks
        # Lists of numbers (tensor data, tokens) are by far the largest: skip them quickly.
        if value and not isinstance(value[0], dict | list):
            return value
        return [_normalize(v) for v in value]
    return value


def decode_request(body: bytes | str, type_: type[T]) -> T:
    """Decode a request body leniently, as a server must (PROTOCOL.md A.0).

    Accepts bodies written by the official SDK 0.38 (`type` discriminators, nulls dropped) and
    0.15 (`exclude_unset`: no `type`, explicit nulls). Raises `msgspec.ValidationError` or
    `msgspec.DecodeError` with a JSON path (e.g. `at $.prompt.chunks[0]`) on bad input,
    including a value outside the field's bounds (`_bounds.py`).
    """
    try:
        raw = msgspec.json.decode(body)
        return msgspec.convert(_normalize(raw), type_)
    except RecursionError:
        # msgspec and `_normalize` both recurse per nesting level; a body nested thousands
        # deep is malformed input, not a server fault.
        raise msgspec.DecodeError("JSON nested too deeply") from None
