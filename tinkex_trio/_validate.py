"""Argument checks of the clients: bad input fails before anything is sent.

Each check raises `InvalidInputError` naming the argument and what it should be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tinkex_trio import types as t
from tinkex_trio.errors import InvalidInputError
from tinkex_trio.types._bounds import MAX_TTL_SECONDS


def require_str(name: str, value: object) -> None:
    """`value` must be a non-empty string; the error names the argument `name`."""
    if not isinstance(value, str) or not value:
        raise InvalidInputError(f"{name} must be a non-empty string, got {value!r}")


def require_server_path(name: str, value: str) -> str:
    """`value` must be a well-formed `tinker://` path: the scheme, then a non-empty rest with
    no whitespace or control characters. Returns it unchanged.

    For paths the server interprets (load_state, create_training_client_from_state, a sampling
    client's model_path) this is all the SDK checks, as the official SDK sends any `tinker://`
    path as is: the hosted service writes `tinker://<run>/weights/<name>`, but other
    Tinker-compatible servers name their checkpoints otherwise (SkyRL tx:
    `tinker://<run>/checkpoints/<name>`), and only the server knows its own layout.
    """
    if not isinstance(value, str) or not value.startswith(t.TINKER_SCHEME):
        raise InvalidInputError(
            f"{name} must be a tinker:// path such as tinker://<run>/weights/<name>, got {value!r}"
        )
    rest = value[len(t.TINKER_SCHEME) :]
    if not rest.strip("/") or any(c.isspace() or not c.isprintable() for c in rest):
        raise InvalidInputError(
            f"{name} {value!r} is not a well-formed tinker:// path: it needs a run and a "
            "checkpoint after the scheme, without spaces or control characters"
        )
    return value


def require_training_data(data: Sequence[t.Datum], loss_fn: str) -> None:
    """`data` must be a non-empty list of Datums carrying what `loss_fn` needs, in shape."""
    if not isinstance(data, Sequence) or isinstance(data, str | bytes):
        raise InvalidInputError("data must be a list of Datum")
    if not data:
        raise InvalidInputError("data is empty: pass at least one Datum")
    required = t.LOSS_FN_REQUIRED_INPUTS.get(loss_fn)
    if required is None:
        raise InvalidInputError(
            f"loss_fn {loss_fn!r} is not supported; use one of {sorted(t.LOSS_FN_REQUIRED_INPUTS)}"
        )
    for i, datum in enumerate(data):
        if not isinstance(datum, t.Datum):
            raise InvalidInputError(f"data[{i}] is a {type(datum).__name__}, not a Datum")
        try:
            length = datum.model_input.length
        except ValueError as exc:
            raise InvalidInputError(f"data[{i}].model_input: {exc}") from None
        if length == 0:
            raise InvalidInputError(f"data[{i}].model_input is empty")
        for key in required:
            if key not in datum.loss_fn_inputs:
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs lacks {key!r}, which loss_fn {loss_fn!r} needs "
                    f"(it needs {list(required)})"
                )
            want = t.LOSS_INPUT_DTYPES.get(key)
            got = datum.loss_fn_inputs[key].dtype
            if want is not None and got != want:
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs[{key!r}] has dtype {got}, but loss_fn {loss_fn!r} "
                    f"needs {want}; convert it (e.g. numpy .astype({want}))"
                )
        _require_provenance(datum, i, length, loss_fn)
        for key, tensor in datum.loss_fn_inputs.items():
            shape = tensor.resolved_shape()
            if not shape or shape[0] != length:
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs[{key!r}] has shape {shape}, but the model input "
                    f"has {length} tokens: per-token inputs must have length {length}"
                )
            if not tensor.is_sparse and math.prod(shape) != tensor.size:
                raise InvalidInputError(
                    f"data[{i}].loss_fn_inputs[{key!r}] holds {tensor.size} values but its "
                    f"shape {shape} needs {math.prod(shape)}"
                )


def _require_provenance(datum: t.Datum, index: int, length: int, loss_fn: str) -> None:
    """Spans present when the loss needs them, and tiling their fields (PROTOCOL.md 7.3)."""
    if not datum.has_provenance:
        if loss_fn in t.LOSS_FNS_NEEDING_PROVENANCE:
            raise InvalidInputError(
                f"data[{index}] has no provenance spans, which loss_fn {loss_fn!r} needs: sample "
                "with a client created with record_stability_info=True, then attach the "
                "sequences with Datum.with_provenance(model_input=[...], loss_fn_inputs=[...])"
            )
        return
    assert datum.model_input_spans is not t.UNSET and datum.loss_fn_input_spans is not t.UNSET
    targets = datum.loss_fn_inputs.get("target_tokens")
    try:
        t.check_span_tiling(f"data[{index}].model_input_spans", datum.model_input_spans, length)
        if targets is not None:
            t.check_span_tiling(
                f"data[{index}].loss_fn_input_spans",
                datum.loss_fn_input_spans,
                targets.resolved_shape()[0],
            )
    except ValueError as exc:
        raise InvalidInputError(str(exc)) from None


def require_loss_config(config: dict[str, float] | None) -> dict[str, float] | None:
    """`loss_fn_config`, its values checked to be finite numbers and made floats."""
    if config is None:
        return None
    out: dict[str, float] = {}
    for key, value in config.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise InvalidInputError(
                f"loss_fn_config[{key!r}] must be a finite number, got {value!r}"
            )
        out[str(key)] = float(value)
    return out


def require_checkpoint_name(name: str) -> None:
    """A checkpoint name: the last segment of a tinker path, so no '/' and no outer spaces."""
    if not isinstance(name, str) or not name or "/" in name or name.strip() != name:
        raise InvalidInputError(
            f"checkpoint name must be a non-empty string without '/' or surrounding spaces, got {name!r}"
        )


#: PROTOCOL.md 3.2: at most this many age recipients on save_weights_external.
MAX_AGE_RECIPIENTS = 10
_AGE_RECIPIENT_PREFIXES = ("age1", "ssh-ed25519 ", "ssh-rsa ")


def require_age_recipients(recipients: Sequence[str] | None) -> list[str] | None:
    """`age_encryption_recipients`: None, or 1..10 public keys of the forms age accepts
    (`age1...`, `ssh-ed25519 ...`, `ssh-rsa ...`). Only the form is checked here; the server
    parses the keys themselves."""
    if recipients is None:
        return None
    if isinstance(recipients, str) or not isinstance(recipients, Sequence):
        raise InvalidInputError(
            "age_encryption_recipients must be a list of public keys (age1... or SSH), got "
            f"{type(recipients).__name__}"
        )
    if not 1 <= len(recipients) <= MAX_AGE_RECIPIENTS:
        raise InvalidInputError(
            f"age_encryption_recipients must hold 1..{MAX_AGE_RECIPIENTS} recipients, got "
            f"{len(recipients)}; pass None for unencrypted files"
        )
    for index, recipient in enumerate(recipients):
        if not isinstance(recipient, str) or not recipient.strip().startswith(
            _AGE_RECIPIENT_PREFIXES
        ):
            raise InvalidInputError(
                f"age_encryption_recipients[{index}] must be an age X25519 recipient "
                "('age1...') or an SSH public key ('ssh-ed25519 AAAA...' / 'ssh-rsa AAAA...'), "
                f"got {recipient if not isinstance(recipient, str) else recipient[:16]!r}"
            )
    return [r.strip() for r in recipients]


def require_ttl(ttl_seconds: int | None) -> None:
    """`ttl_seconds`: None (keep forever) or a positive int within the wire bound
    (`types._bounds.MAX_TTL_SECONDS`, 100 years), the range the local backend accepts."""
    if ttl_seconds is not None and (
        isinstance(ttl_seconds, bool)
        or not isinstance(ttl_seconds, int)
        or not 0 < ttl_seconds <= MAX_TTL_SECONDS
    ):
        raise InvalidInputError(
            f"ttl_seconds must be an int in 1..{MAX_TTL_SECONDS} (100 years) or None (no "
            f"expiry), got {ttl_seconds!r}"
        )
