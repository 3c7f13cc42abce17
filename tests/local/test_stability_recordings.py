"""Stability recordings (`_stability.py`): ownership, expiry after a day without use, the
memory cap. Time comes from an injected clock, so expiry is exact without waiting."""

from __future__ import annotations

import numpy as np
import pytest

from tinkex_trio.local._stability import (
    ENTRY_OVERHEAD_BYTES,
    RECORDING_TTL,
    SequenceUnavailable,
    StabilityRecordings,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lookup_returns_what_was_recorded_and_checks_the_session() -> None:
    clock = Clock()
    rec = StabilityRecordings(clock)
    rec.record("s1", [7, 8, 9], [("a", [1, 2], [-0.5, -1.5]), ("b", [3], [-0.25])])
    got = rec.lookup("a", "s1")
    assert got.prompt.tolist() == [7, 8, 9] and got.tokens.tolist() == [1, 2]
    np.testing.assert_array_equal(got.logprobs, np.array([-0.5, -1.5], np.float32))
    assert rec.lookup("b", "s1").tokens.tolist() == [3]
    with pytest.raises(SequenceUnavailable, match="another session"):
        rec.lookup("a", "s2")
    with pytest.raises(SequenceUnavailable, match="no stability recording has this id"):
        rec.lookup("zzz", "s1")


def test_expires_a_day_after_last_use_and_use_renews_it() -> None:
    clock = Clock()
    rec = StabilityRecordings(clock)
    rec.record("s", [1], [("a", [2], [-1.0]), ("b", [3], [-1.0])])
    clock.now += RECORDING_TTL - 1
    rec.lookup("a", "s")  # a use: "a" now lives until (now + TTL)
    clock.now += 1  # exactly one day since "b" was recorded
    with pytest.raises(SequenceUnavailable, match="expired"):
        rec.lookup("b", "s")
    clock.now += RECORDING_TTL - 2
    assert rec.lookup("a", "s").tokens.tolist() == [2]
    clock.now += RECORDING_TTL
    with pytest.raises(SequenceUnavailable, match="expired"):
        rec.lookup("a", "s")
    stats = rec.statistics()
    assert (stats.sequences, stats.bytes, stats.expired) == (0, 0, 2)


def test_memory_cap_evicts_least_recently_used() -> None:
    clock = Clock()
    one = 4 * 1 + 4 * 2 + 4 * 2 + ENTRY_OVERHEAD_BYTES  # prompt, tokens, logprobs, overhead
    rec = StabilityRecordings(clock, max_bytes=3 * one)
    rec.record("s", [1], [("a", [1, 2], [-1.0, -1.0]), ("b", [1, 2], [-1.0, -1.0])])
    rec.record("s", [1], [("c", [1, 2], [-1.0, -1.0])])
    assert rec.statistics().bytes == 3 * one
    rec.lookup("a", "s")  # "b" is now the least recently used
    rec.record("s", [1], [("d", [1, 2], [-1.0, -1.0])])
    with pytest.raises(SequenceUnavailable, match="evicted"):
        rec.lookup("b", "s")
    for kept in ("a", "c", "d"):
        rec.lookup(kept, "s")
    assert rec.statistics().sequences == 3 and rec.statistics().evicted == 1


def test_forgotten_ids_are_bounded() -> None:
    clock = Clock()
    rec = StabilityRecordings(clock, max_forgotten=2)
    rec.record("s", [1], [(f"x{i}", [1], [-1.0]) for i in range(3)])
    clock.now += RECORDING_TTL
    with pytest.raises(SequenceUnavailable, match="expired"):
        rec.lookup("x2", "s")
    # Only the two most recently forgotten ids are remembered; the first is plain unknown.
    with pytest.raises(SequenceUnavailable, match="no stability recording"):
        rec.lookup("x0", "s")


def test_mismatched_lengths_are_a_bug() -> None:
    rec = StabilityRecordings(Clock())
    with pytest.raises(ValueError, match="2 tokens but 1 log-probs"):
        rec.record("s", [1], [("a", [1, 2], [-1.0])])
