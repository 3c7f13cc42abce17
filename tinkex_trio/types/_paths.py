"""`tinker://` paths (PROTOCOL.md 5.4)."""

from __future__ import annotations

from typing import Literal

import msgspec

TINKER_SCHEME = "tinker://"

_KIND_BY_SEGMENT: dict[str, Literal["training", "sampler", "external"]] = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
_SEGMENT_BY_KIND = {kind: segment for segment, kind in _KIND_BY_SEGMENT.items()}


class ParsedTinkerPath(msgspec.Struct, frozen=True, kw_only=True):
    """`tinker://<training_run_id>/<segment>/<name>`, e.g. `tinker://s:train:0/weights/step-1`."""

    training_run_id: str
    kind: Literal["training", "sampler", "external"]
    name: str

    @classmethod
    def parse(cls, path: str) -> ParsedTinkerPath:
        """Parse a checkpoint path; raises ValueError naming what is wrong."""
        if not isinstance(path, str) or not path.startswith(TINKER_SCHEME):
            raise ValueError(f"tinker path must start with {TINKER_SCHEME!r}, got {path!r}")
        parts = path[len(TINKER_SCHEME) :].split("/")
        if len(parts) != 3 or not all(parts):
            raise ValueError(
                f"tinker path must look like tinker://<run_id>/weights/<name>, got {path!r}"
            )
        run_id, segment, name = parts
        kind = _KIND_BY_SEGMENT.get(segment)
        if kind is None:
            raise ValueError(
                f"tinker path segment must be one of {sorted(_KIND_BY_SEGMENT)}, got {segment!r}"
            )
        return cls(training_run_id=run_id, kind=kind, name=name)

    @property
    def segment(self) -> str:
        return _SEGMENT_BY_KIND[self.kind]

    @property
    def checkpoint_id(self) -> str:
        """`<segment>/<name>`, the id used in REST paths."""
        return f"{self.segment}/{self.name}"

    def __str__(self) -> str:
        return f"{TINKER_SCHEME}{self.training_run_id}/{self.checkpoint_id}"


def make_tinker_path(training_run_id: str, checkpoint_id: str) -> str:
    return f"{TINKER_SCHEME}{training_run_id}/{checkpoint_id}"
