"""A datum's provenance spans checked against the stability recordings (PROTOCOL.md 7.3, 8.7).

`model_input_spans` tile the datum's model input and `loss_fn_input_spans` tile its
`target_tokens`; each span claims that its run of tokens is positions `[offset, offset+length)`
of a recorded sequence's prompt (prompt span) or sampled tokens (sampled span). Every claim is
checked: the sequence must be recorded for the datum's session and still usable, the run must
lie inside what was recorded, and the tokens must be equal. Any failure is an
`EngineUserError` (a 400 with category `user`) naming the datum, the span and the sequence id.

What comes out is the sampler's log-prob of each target token: the recorded log-prob where a
sampled span backs the position, NaN where a prompt span does (a prompt token was not sampled,
so it has no behaviour log-prob). `stable_reinforce` uses it; for other losses the spans are
only checked.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tinkex_trio import types as t

from ._engine_api import DatumArrays, EngineUserError
from ._stability import SequenceUnavailable, StabilityRecordings


def recorded_logprobs(
    datum: t.Datum,
    index: int,
    arrays: DatumArrays,
    recordings: StabilityRecordings,
    session_id: str,
) -> npt.NDArray[np.float32] | None:
    """The behaviour log-probs of `datum`'s target tokens, or None if it has no spans.

    `arrays` is the datum already converted and checked (`_convert.datum_arrays`): its model
    input tokens and `target_tokens`.
    """
    model_spans, target_spans = datum.model_input_spans, datum.loss_fn_input_spans
    if model_spans is t.UNSET and target_spans is t.UNSET:
        return None
    where = f"data[{index}]"
    if model_spans is t.UNSET or target_spans is t.UNSET:
        raise EngineUserError(
            f"{where} has only one of model_input_spans and loss_fn_input_spans; provenance "
            "comes as a pair (Datum.with_provenance sets both)"
        )
    targets = np.asarray(arrays.loss_fn_inputs["target_tokens"], dtype=np.int64).ravel()
    tokens = np.asarray(arrays.tokens, dtype=np.int64)
    _check(f"{where}.model_input_spans", model_spans, tokens, recordings, session_id)
    return _check(f"{where}.loss_fn_input_spans", target_spans, targets, recordings, session_id)


def _check(
    where: str,
    spans: Sequence[t.ProvenanceSpan],
    tokens: npt.NDArray[np.int64],
    recordings: StabilityRecordings,
    session_id: str,
) -> npt.NDArray[np.float32]:
    """Check `spans` tile `tokens` and match the recordings; the sampler log-prob per token."""
    total = sum(span.length for span in spans)
    if total != tokens.size:
        raise EngineUserError(
            f"{where} cover {total} positions, but the field has {tokens.size} tokens; the "
            "spans' lengths must sum to it exactly"
        )
    out = np.full(tokens.size, np.nan, dtype=np.float32)
    position = 0
    for j, span in enumerate(spans):
        name = f"{where}[{j}] (sequence_id {span.sequence_id!r})"
        try:
            recording = recordings.lookup(span.sequence_id, session_id)
        except SequenceUnavailable as exc:
            raise EngineUserError(f"{name} cannot be used: {exc.reason}") from None
        sampled = isinstance(span, t.SampledProvenanceSpan)
        source = recording.tokens if sampled else recording.prompt
        what = "sampled tokens" if sampled else "prompt"
        end = span.offset + span.length
        if end > source.size:
            raise EngineUserError(
                f"{name} claims positions {span.offset}..{end - 1} of the sequence's {what}, "
                f"which has {source.size} tokens"
            )
        claimed = tokens[position : position + span.length]
        mismatch = np.flatnonzero(claimed != source[span.offset : end])
        if mismatch.size:
            k = int(mismatch[0])
            raise EngineUserError(
                f"{name} does not line up with the datum: token {int(claimed[k])} at position "
                f"{position + k} is not the recorded token {int(source[span.offset + k])} "
                f"(position {span.offset + k} of the sequence's {what})"
            )
        if sampled:
            out[position : position + span.length] = recording.logprobs[span.offset : end]
        position += span.length
    return out
