"""What the sampler saw, per sampled sequence, for `stable_reinforce` (PROTOCOL.md 3.3, 8.7).

A sampling request sent with `record_stability_info: true` makes the server keep, for each
sequence it returns, the prompt, the sampled tokens and the sampler's own log-prob of each
sampled token, keyed by the sequence's `sequence_id` (the `sample_sequence_ids` of the submit
answer). A later `stable_reinforce` datum names those sequences in its provenance spans and the
server takes the behaviour log-probs from here, never from the request (`_provenance.py`).

Ownership and bounds: a recording belongs to the session of the sampling session that made it
(a datum of another session cannot use it) and is forgotten after `ttl` seconds without use (a
day, as the public docs say); reading it for training counts as use. Memory is bounded by
`max_bytes` (an estimate: the arrays plus a fixed overhead per entry); past it the least
recently used recordings are evicted first. Ids that were forgotten are remembered (a bounded
number of them) so that an error can say "expired" or "evicted" rather than "unknown".
Recordings live in memory only: a restarted backend has none.

Time comes from an injected clock (the app passes `trio.current_time`), so expiry is tested in
virtual time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt

RECORDING_TTL: Final = 24 * 3600.0
"""Seconds a recording stays usable after its last use (PROTOCOL.md 8.7: one day)."""
DEFAULT_MAX_BYTES: Final = 256 * 1024 * 1024
"""Memory for recordings: ~30 million sampled tokens (int32 id + float32 log-prob each), fewer
with long prompts (a request's prompt is stored once but counted once per sequence, to keep the
accounting simple and conservative); far more than one RL step of the local models produces."""
ENTRY_OVERHEAD_BYTES: Final = 512
"""What one entry costs besides its arrays (dict slot, dataclass, numpy headers, the id)."""
MAX_FORGOTTEN_IDS: Final = 100_000
"""How many forgotten ids are remembered for the error message (~10 MB at most)."""

ForgetReason = Literal["expired", "evicted"]


@dataclass(frozen=True)
class Recording:
    """One sampled sequence as the sampler saw it."""

    session_id: str
    prompt: npt.NDArray[np.int32]  # shared by the sequences of one request
    tokens: npt.NDArray[np.int32]
    logprobs: npt.NDArray[np.float32]  # the sampler's log-prob of each of `tokens`

    def nbytes(self) -> int:
        return self.prompt.nbytes + self.tokens.nbytes + self.logprobs.nbytes


class SequenceUnavailable(LookupError):
    """A sequence id that cannot be used; `reason` is one line saying why."""

    def __init__(self, sequence_id: str, reason: str) -> None:
        super().__init__(reason)
        self.sequence_id = sequence_id
        self.reason = reason


@dataclass(frozen=True)
class RecordingStatistics:
    sequences: int
    bytes: int
    expired: int
    evicted: int


@dataclass
class _Entry:
    recording: Recording
    last_used: float
    size: int


class StabilityRecordings:
    """The recordings of one backend (see the module docstring); not thread-safe (trio only)."""

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        ttl: float = RECORDING_TTL,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_forgotten: int = MAX_FORGOTTEN_IDS,
    ) -> None:
        if ttl <= 0 or max_bytes <= 0 or max_forgotten < 0:
            raise ValueError("ttl and max_bytes must be positive, max_forgotten >= 0")
        self._clock = clock
        self._ttl = ttl
        self._max_bytes = max_bytes
        self._max_forgotten = max_forgotten
        # Least recently used first: expiry and eviction both take from the front.
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._forgotten: OrderedDict[str, ForgetReason] = OrderedDict()
        self._bytes = 0
        self._expired = 0
        self._evicted = 0

    def record(
        self,
        session_id: str,
        prompt: Sequence[int],
        sequences: Sequence[tuple[str, Sequence[int], Sequence[float]]],
    ) -> None:
        """Keep `(sequence_id, tokens, logprobs)` of each sequence sampled from `prompt`."""
        now = self._clock()
        self._expire(now)
        prompt_array = np.asarray(prompt, dtype=np.int32)
        for sequence_id, tokens, logprobs in sequences:
            recording = Recording(
                session_id=session_id,
                prompt=prompt_array,
                tokens=np.asarray(tokens, dtype=np.int32),
                logprobs=np.asarray(logprobs, dtype=np.float32),
            )
            if recording.tokens.shape != recording.logprobs.shape:
                raise ValueError(
                    f"sequence {sequence_id!r}: {recording.tokens.size} tokens but "
                    f"{recording.logprobs.size} log-probs"
                )
            self._drop(sequence_id)
            size = recording.nbytes() + ENTRY_OVERHEAD_BYTES
            self._entries[sequence_id] = _Entry(recording, now, size)
            self._forgotten.pop(sequence_id, None)
            self._bytes += size
        while self._bytes > self._max_bytes and self._entries:
            oldest = next(iter(self._entries))
            self._forget(oldest, "evicted")

    def lookup(self, sequence_id: str, session_id: str) -> Recording:
        """The recording of `sequence_id` for a datum of `session_id`; counts as a use.

        Raises:
            SequenceUnavailable: unknown, expired, evicted, or of another session.
        """
        now = self._clock()
        self._expire(now)
        entry = self._entries.get(sequence_id)
        if entry is None:
            reason = self._forgotten.get(sequence_id)
            if reason == "expired":
                raise SequenceUnavailable(
                    sequence_id,
                    f"its stability recording expired ({self._ttl:g} s without use); "
                    "sample again and train on the new sequence",
                )
            if reason == "evicted":
                raise SequenceUnavailable(
                    sequence_id,
                    "its stability recording was evicted to bound the server's memory; "
                    "train on sequences sooner after sampling them",
                )
            raise SequenceUnavailable(
                sequence_id,
                "no stability recording has this id; sample with record_stability_info=True "
                "and use the sequence_id of a returned SampledSequence",
            )
        if entry.recording.session_id != session_id:
            raise SequenceUnavailable(
                sequence_id,
                "it was recorded by another session; recordings belong to the session that "
                "sampled them",
            )
        entry.last_used = now
        self._entries.move_to_end(sequence_id)
        return entry.recording

    def statistics(self) -> RecordingStatistics:
        return RecordingStatistics(
            sequences=len(self._entries),
            bytes=self._bytes,
            expired=self._expired,
            evicted=self._evicted,
        )

    def _expire(self, now: float) -> None:
        while self._entries:
            sequence_id, entry = next(iter(self._entries.items()))
            if now - entry.last_used < self._ttl:
                return
            self._forget(sequence_id, "expired")

    def _drop(self, sequence_id: str) -> None:
        entry = self._entries.pop(sequence_id, None)
        if entry is not None:
            self._bytes -= entry.size

    def _forget(self, sequence_id: str, reason: ForgetReason) -> None:
        self._drop(sequence_id)
        if reason == "expired":
            self._expired += 1
        else:
            self._evicted += 1
        if self._max_forgotten:
            self._forgotten[sequence_id] = reason
            self._forgotten.move_to_end(sequence_id)
            while len(self._forgotten) > self._max_forgotten:
                self._forgotten.popitem(last=False)
