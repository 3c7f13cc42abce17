"""Range and size bounds of request fields, declared once on the wire types.

msgspec checks `Meta` constraints whenever a body is decoded or converted into a Struct (the
local backend's `decode_request`), never when the SDK builds a Struct itself, so these bounds
cost the SDK nothing and give the server one place that says what each field may hold. A
violation is a `msgspec.ValidationError` naming the field's JSON path (`- at $.seq_id`), which
the backend answers with a 400 of category `user`.

The ranges are the real ones, not guesses at sensible use:

* ids counted by the client (`seq_id`, `model_seq_id`, `sampling_session_seq_id`) are stored
  in SQLite INTEGER columns, which hold signed 64-bit values, together with the id after them;
* `ttl_seconds` must give an expiry a `datetime` can hold (year 9999); 100 years is plenty;
* counts and lengths (`max_tokens`, `num_samples`, `top_k`, `rank`, ...) fit a signed 32-bit
  int, as they do in the official protobuf forms (PROTOCOL.md 6); tighter, model-dependent
  limits (context length, vocabulary, the backend's `MAX_NUM_SAMPLES`) are checked by the
  server, which knows the model;
* seeds are signed 64-bit (`torch.Generator.manual_seed` takes them; the sampler folds
  them into [0, 2**63 - 1), PROTOCOL.md 7.4);
* free text (versions, names, tags, metadata) is capped so a request cannot store megabytes in
  the database or have them echoed back in every listing.
"""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

__all__ = [
    "MAX_ID_LENGTH",
    "MAX_ID_LIST",
    "MAX_INT64",
    "MAX_METADATA_ENTRIES",
    "MAX_METADATA_VALUE_LENGTH",
    "MAX_SEQ_ID",
    "MAX_TAGS",
    "MAX_TEXT_LENGTH",
    "MAX_TTL_SECONDS",
    "Count",
    "Id",
    "IdList",
    "Metadata",
    "Seed",
    "SeqId",
    "Tags",
    "Text",
    "TtlSeconds",
]

MAX_INT64: Final = 2**63 - 1
MAX_INT32: Final = 2**31 - 1
#: The largest client-counted id: the server stores the id after it (`next_seq_id`) in the
#: same signed 64-bit column, and clone ids times 1e9 (PROTOCOL.md 5.3) stay far below it.
MAX_SEQ_ID: Final = 2**62
#: Ids the server hands out (session, run, sampler and request ids) are well under this; a
#: longer one cannot name anything, and would only be echoed back in the 404's message.
MAX_ID_LENGTH: Final = 512
#: Free text: SDK versions, project ids, display names, checkpoint names, tags, base models.
MAX_TEXT_LENGTH: Final = 1024
MAX_TAGS: Final = 64
#: Request ids acknowledged in one `retrieve_futures` poll (the SDK sends what finished since
#: its last poll: at most its number of samples in flight, 2,000 by default, PROTOCOL.md 2.1).
MAX_ID_LIST: Final = 100_000
MAX_METADATA_ENTRIES: Final = 64
MAX_METADATA_VALUE_LENGTH: Final = 4096
#: 100 years: far beyond any use, and `now + ttl` stays inside `datetime`'s range.
MAX_TTL_SECONDS: Final = 100 * 365 * 24 * 3600

SeqId = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ_ID)]
"""A client-counted id: `seq_id`, `model_seq_id`, `sampling_session_seq_id`."""
Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_INT32)]
"""A count or length (`max_tokens`, `topk_prompt_logprobs`); the server checks the model's."""
Seed = Annotated[int, msgspec.Meta(ge=-(2**63), le=MAX_INT64)]
TtlSeconds = Annotated[int, msgspec.Meta(ge=1, le=MAX_TTL_SECONDS)]
Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]
Text = Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)]
Tags = Annotated[
    list[Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)]],
    msgspec.Meta(max_length=MAX_TAGS),
]
IdList = Annotated[list[Id], msgspec.Meta(max_length=MAX_ID_LIST)]
"""A list of request ids (`retrieved_request_ids`)."""
Metadata = Annotated[
    dict[
        Annotated[str, msgspec.Meta(max_length=MAX_TEXT_LENGTH)],
        Annotated[str, msgspec.Meta(max_length=MAX_METADATA_VALUE_LENGTH)],
    ],
    msgspec.Meta(max_length=MAX_METADATA_ENTRIES),
]
"""`user_metadata`: at most 64 pairs, keys up to 1 KiB, values up to 4 KiB."""
