"""Call policy: how each kind of call is retried, paused and answered (PROTOCOL.md 1.4-1.6, 4, 9.3-9.6).

One table, :data:`POLICIES`, keyed by the kind of call. `Transport.request(..., policy=...)`
applies it, and nothing above the transport loops on HTTP statuses: futures, sampling,
completions, training, REST and the service pick a policy and handle only what is theirs (a
poll's 2xx envelope: try_again, complete_metadata, error or result).

=======================  ====================  ================================  =======  ========  =======  ========
kind                     used for              retries (rows, tried in order)    billing  throttle  timeout  accept
=======================  ====================  ================================  =======  ========  =======  ========
``call`` (the default)   create_model,         layer A                           -        -         config   json
                         create_session,
                         create_sampling_
                         session, auth/token
``submit``               training submits      layer A, layer B                  pause    -         config   json
                         but saves, get_info,
                         load_weights,
                         client/config
``save``                 save_weights*         layer B (9.3: no layer A)         pause    -         config   json
``rest``                 RestClient            layer A, layer B                  pause    -         config   json
``rest_conflict_final``  publish, unpublish    layer B without 409 (an answer)   pause    -         config   json
``archive_url``          checkpoint archive    layer A, archive rounds (503)     -        -         config   gzip
``download``             streamed downloads    layer A                           -        -         config   any
``poll``                 retrieve_future       4.3's rows (below)                pause    -         45 s     json
``poll_protobuf``        retrieve_future of    4.3's rows                        pause    -         45 s     protobuf
                         fwd/bwd and samples
``long_poll``            retrieve_futures      4.8's row: transient, 1 s         pause    -         45 s     json
``ack_poll``             retrieve_futures      none (the ids go with the next    -        -         5 s      json
                         with timeout 0        poll)
``heartbeat``            session_heartbeat     none (the next beat is the        -        -         10 s     json
                                               retry, 9.7)
``dynamic_config``       client/dynamic_       none (2.1 step 3)                 -        -         10 s     json
                         config
``session_finish``       sessions/{id}/finish  layer A, 2 retries                -        -         config   json
``cancel``               cancel_future         layer B (9.3: no layer A)         pause    -         30 s     json
``sample``               asample               none: a 429 opens the             pause    yes       config   json
                                               RateLimiter window and the same
                                               body is resubmitted (9.5); the
                                               rest is layer D's (below)
``telemetry``            telemetry batches     layer A                           -        -         5 s      json
``one_attempt``          the CLI's preflight   none                              -        -         config   json
=======================  ====================  ================================  =======  ========  =======  ========

"transient" is `TRANSIENT`: no response (a connection error, a timeout, a bare 400), 408, 409,
429 and every status >= 500. "config" is ``Config.timeout``; "any" is ``Accept: */*``.

The rows (PROTOCOL.md section in brackets):

* **layer A** [9.3]: the transient outcomes (a bare 400 while the budget of 1.6 lasts), or
  any status with ``x-should-retry: true`` (never one with ``false``); ``Config.max_retries``
  quick retries of the *same* request (same ``X-Idempotency-Key``, counted in
  ``x-stainless-retry-count``), ``min(0.5 * 2**n, 10) * U(0.75, 1)`` s or the server's
  ``retry-after`` if within (0, 60] s.
* **layer B** [9.3]: the transient outcomes again, once layer A gave up or did not apply; the
  request is rebuilt (new idempotency key, same body, so the same ``seq_id``); ``min(2**k, 30)``
  s for up to 5 minutes from the first attempt, billing pauses not counted.
* **poll** [4.3]: 408 at once (and it resets the 400 count); 5xx at once three times, then
  ``min(2**n, 30)`` s; 429 and connection errors ``min(2**n, 30)`` s (n counts consecutive
  ones); a 400 with a body up to 3 times per future; 410 and other 4xx end the poll.
* **long-poll** [4.8]: the transient outcomes, every 1 s.
* **archive rounds** [A.4.2]: a 503 (the archive is being built) after layer A gave up: 30 s,
  then layer A again, 6 rounds in all.
* **sample retry** (layer D) [9.4] is applied by `Transport.retry` to a whole ``sample()`` (a
  submit and its polls), each attempt with a new ``seq_id``: the transient outcomes and 410,
  ``min(0.5 * 2**k, 10) * U(0.75, 1.25)`` s, without limit.

The billing pause [9.6] is one incident shared by the whole transport: a 402 waits
`BILLING_RETRY_DELAY` s and retries silently until 402s have lasted
``billing_exception_max_pause_duration_sec`` (then `BillingError`); the incident ends after
`BILLING_INCIDENT_RESET` s without a 402. Where PROTOCOL.md differs per call kind, this table
is where the difference is written; 9.3's lists of which calls get which layer are its source.

Cost: a policy is a frozen object the caller passes by reference, so choosing one is an
attribute access; a call that succeeds at once never touches the rows, and retry counts are
allocated only after a first failure.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Final, Literal, Protocol

JSON: Final = "application/json"
PROTOBUF: Final = "application/x-protobuf"

CONNECTION: Final = 0
"""The outcome of a connection error, a timeout, or a bare 400 within its budget (PROTOCOL.md 1.6)."""

SERVER_ERRORS: Final = frozenset(range(500, 1000))
TRANSIENT: Final = frozenset({CONNECTION, 408, 409, 429}) | SERVER_ERRORS
"""The one definition of "worth retrying" (PROTOCOL.md 9.3, 9.4, 4.8): no response, 408, 409,
429 and every status >= 500. The poll (4.3) is the exception and says so in its rows."""

MAX_RETRY_AFTER: Final = 60.0
"""A server's ``retry-after(-ms)`` is obeyed only if 0 < value <= 60 s (PROTOCOL.md 1.4)."""

BILLING_RETRY_DELAY: Final = 5.0
"""PROTOCOL.md 9.6: a 402 is retried after 5 s, silently."""
BILLING_PAUSE_MAX: Final = 3600.0
"""PROTOCOL.md 9.6: ``billing_exception_max_pause_duration_sec``'s default."""
BILLING_INCIDENT_RESET: Final = 300.0
"""PROTOCOL.md 9.6: after this long without a 402 the next one starts a new incident."""
BILLING_WARNING_INTERVAL: Final = 60.0
"""PROTOCOL.md 9.6: the billing warning is logged at most once a minute."""

BARE_400_RETRY_BUDGET: Final = 16
"""PROTOCOL.md 1.6: bare 400s retried as connection errors per transport; each success gives
one back, so a server that really answers bare 400s cannot keep every call retrying."""

# PROTOCOL.md 1.5: read timeouts of the calls that do not use Config.timeout.
RETRIEVE_FUTURE_TIMEOUT: Final = 45.0
RETRIEVE_FUTURES_TIMEOUT: Final = 45.0
ACK_ONLY_TIMEOUT: Final = 5.0
HEARTBEAT_TIMEOUT: Final = 10.0
DYNAMIC_CONFIG_TIMEOUT: Final = 10.0
CANCEL_FUTURE_TIMEOUT: Final = 30.0
TELEMETRY_TIMEOUT: Final = 5.0

LAYER_B_BUDGET: Final = 300.0
"""PROTOCOL.md 9.3: layer B retries for up to 5 minutes from the first attempt."""
POLL_BAD_REQUESTS: Final = 3
"""PROTOCOL.md 4.3: a poll answered 400 is re-polled at most 3 times."""
POLL_IMMEDIATE_5XX: Final = 3
"""PROTOCOL.md 4.3 re-polls 5xx at once, forever; a server failing every poll instantly would
make that a hot loop, so after this many consecutive 5xx a poll backs off like a 429."""
ARCHIVE_ATTEMPTS: Final = 6
ARCHIVE_RETRY_DELAY: Final = 30.0
"""PROTOCOL.md A.4.2: a 503 means the archive is still being built. Layer A retries it quickly;
when that gives up, wait 30 s and start again, 6 rounds in all (the official SDK's numbers:
large checkpoints take minutes to pack)."""
SESSION_FINISH_RETRIES: Final = 2
"""Not in PROTOCOL.md: finishing runs inside a 10 s bound at exit, so a few quick retries."""


@dataclasses.dataclass(frozen=True, slots=True)
class Backoff:
    """Delay before retry n (from 0): ``min(first * 2**n, cap) * uniform(*jitter)`` seconds."""

    first: float
    cap: float
    jitter: tuple[float, float] = (1.0, 1.0)

    def delay(self, n: int, rng: random.Random) -> float:
        # The exponent is capped so that a retry loop running for days cannot overflow.
        delay = min(self.first * 2.0 ** min(n, 64), self.cap)
        low, high = self.jitter
        if low == high == 1.0:
            return delay
        return delay * rng.uniform(low, high)


Counting = Literal["per_request", "consecutive", "per_call"]


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class Retry:
    """One row of a policy: which outcomes it retries, how long it waits, when it gives up.

    ``on`` holds statuses and `CONNECTION`. ``count`` says what n (the retries this row took)
    counts: ``per_request`` the retries of one request (layer A: the request is re-sent as is,
    same idempotency key); ``consecutive`` those since another row, or a success, handled an
    outcome; ``per_call`` all of them (for a poll, all of its future's polls). Every other row
    rebuilds the request (a new idempotency key). ``limit``: at most this many retries
    (`None`: no limit; `FROM_CONFIG`: ``Config.max_retries``). ``budget``: seconds from the
    first attempt, billing pauses excluded. ``immediate``: the first retries that do not
    wait. ``reset_by``: outcomes that set this row's count back to 0. ``server_hints``: obey
    ``retry-after`` and ``x-should-retry`` (layer A only, PROTOCOL.md 1.4).
    """

    label: str
    on: frozenset[int]
    backoff: Backoff
    count: Counting = "per_call"
    limit: int | None = None
    budget: float | None = None
    immediate: int = 0
    reset_by: frozenset[int] = frozenset()
    server_hints: bool = False


FROM_CONFIG: Final = -1
"""`Retry.limit` of layer A: ``Config.max_retries`` (0 turns it off)."""

NO_WAIT: Final = Backoff(0.0, 0.0)

LAYER_A: Final = Retry(
    "",  # unlabelled: its reasons read "status 503", as the transport always logged them
    TRANSIENT,
    Backoff(0.5, 10.0, (0.75, 1.0)),
    count="per_request",
    limit=FROM_CONFIG,
    server_hints=True,
)
LAYER_B: Final = Retry("layer B", TRANSIENT, Backoff(1.0, 30.0), budget=LAYER_B_BUDGET)

_POLL_BAD_REQUEST: Final = Retry("poll", frozenset({400}), NO_WAIT, limit=POLL_BAD_REQUESTS)
_POLL_ROWS: Final = (
    Retry("poll", frozenset({408}), NO_WAIT, count="consecutive"),
    Retry(
        "poll",
        SERVER_ERRORS,
        Backoff(1.0, 30.0),
        count="consecutive",
        immediate=POLL_IMMEDIATE_5XX,
    ),
    Retry("poll", frozenset({CONNECTION, 429}), Backoff(1.0, 30.0), count="consecutive"),
    dataclasses.replace(_POLL_BAD_REQUEST, reset_by=frozenset({408})),
)

SAMPLE_RETRY: Final = Retry(
    "sample retry", TRANSIENT | {410}, Backoff(0.5, 10.0, (0.75, 1.25)), count="per_call"
)
"""Layer D (PROTOCOL.md 9.4), applied by `Transport.retry` to a whole ``sample()``."""


class Throttle(Protocol):
    """What the ``sample`` policy needs of the caller's rate limiter (`RateLimiter`, 9.5)."""

    def dispatch(self, estimated_bytes: int) -> AbstractAsyncContextManager[None]: ...

    def on_rate_limited(self, estimated_bytes: int = 0) -> None: ...

    def on_success(self) -> None: ...


@dataclasses.dataclass(frozen=True, slots=True, eq=False)
class CallPolicy:
    """How one kind of call is sent and retried (one row of the module's table).

    ``retries``: the rows, tried in order. ``billing_pause``: a 402 waits in the transport's
    shared billing incident, then the call is rebuilt and sent again (PROTOCOL.md 9.6).
    ``throttle``: a 429 opens the caller's `Throttle` window and the same body is resubmitted
    once it closes (9.5). ``timeout``: seconds per read (`None`: ``Config.timeout``, 1.5).
    ``accept``: the ``Accept`` header (1.4, 4.5).
    """

    kind: str
    retries: tuple[Retry, ...] = ()
    billing_pause: bool = False
    throttle: bool = False
    timeout: float | None = None
    accept: str = JSON

    def new_state(self) -> RetryState:
        """Retry counts to carry across calls (a future's polls share 4.3's counters)."""
        return RetryState(len(self.retries))


class RetryState:
    """The retry count of each row of a policy, for one call or a series of calls."""

    __slots__ = ("counts",)

    def __init__(self, rows: int) -> None:
        self.counts = [0] * rows


def next_retry(
    policy: CallPolicy,
    counts: list[int],
    outcome: int,
    *,
    max_retries: int,
    should_retry: str | None,
    retry_after: float | None,
    elapsed: float,
    rng: random.Random,
) -> tuple[int, float] | None:
    """The row (index) that retries ``outcome`` and the delay before it, or None: final.

    Updates ``counts``: the chosen row's count goes up; the others follow their ``count`` and
    ``reset_by`` rules. ``should_retry`` is the response's ``x-should-retry`` header,
    ``retry_after`` its ``retry-after`` in seconds, ``elapsed`` the seconds since the first
    attempt with billing pauses taken out.
    """
    rows = policy.retries
    for index, row in enumerate(rows):
        if row.server_hints and should_retry is not None:
            if should_retry == "false":
                continue
            wanted = should_retry == "true" or outcome in row.on
        else:
            wanted = outcome in row.on
        if not wanted:
            continue
        n = counts[index]
        limit = max_retries if row.limit == FROM_CONFIG else row.limit
        if limit is not None and n >= limit:
            continue
        remaining = None if row.budget is None else row.budget - elapsed
        if remaining is not None and remaining <= 0:
            continue
        if row.server_hints and retry_after is not None and 0 < retry_after <= MAX_RETRY_AFTER:
            delay = retry_after
        elif n < row.immediate:
            delay = 0.0
        else:
            delay = row.backoff.delay(n - row.immediate, rng)
        if remaining is not None:
            delay = min(delay, remaining)
        _settle(rows, counts, index, outcome)
        counts[index] = n + 1
        return index, delay
    return None


def rebuilt(policy: CallPolicy, counts: list[int], outcome: int) -> None:
    """Counts after a retry outside the rows (billing pause, throttle): a new request."""
    _settle(policy.retries, counts, -1, outcome)


def succeeded(policy: CallPolicy, counts: list[int]) -> None:
    """Counts after a success: consecutive and per-request counts start again."""
    for index, row in enumerate(policy.retries):
        if row.count != "per_call":
            counts[index] = 0


def _settle(rows: tuple[Retry, ...], counts: list[int], chosen: int, outcome: int) -> None:
    same_request = chosen >= 0 and rows[chosen].count == "per_request"
    for index, row in enumerate(rows):
        if index == chosen:
            continue
        if (
            row.count == "consecutive"
            or (row.count == "per_request" and not same_request)
            or outcome in row.reset_by
        ):
            counts[index] = 0


# -- the table --------------------------------------------------------------------------------

CALL: Final = CallPolicy("call", (LAYER_A,))
SUBMIT: Final = CallPolicy("submit", (LAYER_A, LAYER_B), billing_pause=True)
SAVE: Final = CallPolicy("save", (LAYER_B,), billing_pause=True)
REST: Final = CallPolicy("rest", (LAYER_A, LAYER_B), billing_pause=True)
REST_CONFLICT_FINAL: Final = CallPolicy(
    "rest_conflict_final",
    (dataclasses.replace(LAYER_B, on=TRANSIENT - {409}),),
    billing_pause=True,
)
ARCHIVE_URL: Final = CallPolicy(
    "archive_url",
    (
        LAYER_A,
        Retry(
            "archive",
            frozenset({503}),
            Backoff(ARCHIVE_RETRY_DELAY, ARCHIVE_RETRY_DELAY),
            limit=ARCHIVE_ATTEMPTS - 1,
        ),
    ),
    accept="application/gzip",
)
DOWNLOAD: Final = CallPolicy("download", (LAYER_A,), accept="*/*")
POLL: Final = CallPolicy("poll", _POLL_ROWS, billing_pause=True, timeout=RETRIEVE_FUTURE_TIMEOUT)
POLL_PROTOBUF: Final = dataclasses.replace(POLL, kind="poll_protobuf", accept=PROTOBUF)
LONG_POLL: Final = CallPolicy(
    "long_poll",
    (Retry("long-poll", TRANSIENT, Backoff(1.0, 1.0)),),
    billing_pause=True,
    timeout=RETRIEVE_FUTURES_TIMEOUT,
)
ACK_POLL: Final = CallPolicy("ack_poll", timeout=ACK_ONLY_TIMEOUT)
HEARTBEAT: Final = CallPolicy("heartbeat", timeout=HEARTBEAT_TIMEOUT)
DYNAMIC_CONFIG: Final = CallPolicy("dynamic_config", timeout=DYNAMIC_CONFIG_TIMEOUT)
SESSION_FINISH: Final = CallPolicy(
    "session_finish", (dataclasses.replace(LAYER_A, limit=SESSION_FINISH_RETRIES),)
)
CANCEL: Final = CallPolicy("cancel", (LAYER_B,), billing_pause=True, timeout=CANCEL_FUTURE_TIMEOUT)
SAMPLE: Final = CallPolicy("sample", billing_pause=True, throttle=True)
TELEMETRY: Final = CallPolicy("telemetry", (LAYER_A,), timeout=TELEMETRY_TIMEOUT)
ONE_ATTEMPT: Final = CallPolicy("one_attempt")

POLICIES: Final[Mapping[str, CallPolicy]] = {
    policy.kind: policy
    for policy in (
        CALL,
        SUBMIT,
        SAVE,
        REST,
        REST_CONFLICT_FINAL,
        ARCHIVE_URL,
        DOWNLOAD,
        POLL,
        POLL_PROTOBUF,
        LONG_POLL,
        ACK_POLL,
        HEARTBEAT,
        DYNAMIC_CONFIG,
        SESSION_FINISH,
        CANCEL,
        SAMPLE,
        TELEMETRY,
        ONE_ATTEMPT,
    )
}
"""Every policy by its kind: the module docstring's table, for lookup and inspection."""
