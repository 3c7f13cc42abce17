"""The SDK's exception tree.

Every exception the SDK raises on purpose derives from :class:`TinkexError`::

    TinkexError
     ├── APIError                       something went wrong talking to the server
     │    ├── APIConnectionError        no usable response (connect/read/write failure, protocol error)
     │    │    └── APITimeoutError      ... because a connect/read/write/pool timeout expired
     │    └── APIStatusError            a non-2xx response: .status_code, .body, .request, .response
     │         ├── BadRequestError              400
     │         ├── AuthenticationError          401
     │         ├── BillingError                 402  (paused on, then raised: PROTOCOL.md 9.6)
     │         ├── PermissionDeniedError        403
     │         ├── NotFoundError                404
     │         ├── ConflictError                409
     │         ├── GoneError                    410  (e.g. an expired future, PROTOCOL.md 4.3)
     │         ├── UnprocessableEntityError     422
     │         ├── RateLimitError               429
     │         └── InternalServerError          >= 500
     ├── RequestFailedError             the server ran the request and it failed (PROTOCOL.md 4.7)
     ├── MissingAPIKeyError   (+ValueError)    no credential configured
     ├── InvalidInputError    (+ValueError)    bad input caught before anything was sent
     ├── ResultTimeoutError   (+TimeoutError) a result did not arrive within the caller's timeout
     └── ClientClosedError    (+RuntimeError) a client used after its service was closed

Why one tree: callers write ``except TinkexError`` to catch everything the SDK means to raise,
``except APIStatusError`` for any HTTP status, or a leaf for one status. Status classes follow
PROTOCOL.md 7.10 so code written against the official SDK's names keeps working.

The misuse errors also derive from the builtin they refine (ValueError, TimeoutError,
RuntimeError), so generic ``except ValueError`` code still works.

Secrets: no message, ``repr`` or attribute of these exceptions contains the request headers, so
the API key never appears in a traceback or a log line. ``httpx.Request``'s repr shows only the
method and the URL.
"""

from __future__ import annotations

import json
from typing import Any, Final, Literal, final

import httpx

__all__ = [
    "APIConnectionError",
    "APIError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BillingError",
    "ClientClosedError",
    "ConflictError",
    "ErrorCategory",
    "GoneError",
    "InternalServerError",
    "InvalidInputError",
    "MissingAPIKeyError",
    "NotFoundError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestFailedError",
    "ResultTimeoutError",
    "TinkexError",
    "UnprocessableEntityError",
    "status_error_for",
]

ErrorCategory = Literal["user", "server", "unknown"]
"""PROTOCOL.md 4.7: who is at fault for a failed request."""

# A status error's message embeds the body (PROTOCOL.md 7.10: "Error code: <status> - <body>").
# Huge bodies (an HTML error page from a proxy) would flood logs, so the *message* is cut here;
# the full body stays available as `.body`.
_MAX_BODY_IN_MESSAGE: Final = 2000


class TinkexError(Exception):
    """Base of every exception the SDK raises on purpose."""


class APIError(TinkexError):
    """A failure while talking to the server.

    ``request`` is the httpx request that failed (None if the error was raised before a request
    existed); ``body`` is the decoded response body when there was one.
    """

    message: str
    request: httpx.Request | None
    body: object | None

    def __init__(
        self, message: str, *, request: httpx.Request | None = None, body: object | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructors do not survive pickling by default; rebuild from the message.
        # The request and response are dropped (they hold sockets and are not picklable).
        status = getattr(self, "status_code", None)
        return (_rebuild_api_error, (type(self), self.message, self.body, status))


def _rebuild_api_error(
    cls: type[APIError], message: str, body: object | None, status_code: int | None
) -> APIError:
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.message = message
    err.request = None
    err.body = body
    if isinstance(err, APIStatusError):
        err.status_code = status_code or 0
        err.response = None
    return err


class APIConnectionError(APIError):
    """No usable response arrived: connection refused or reset, protocol error, DNS failure.

    The originating httpx exception is the ``__cause__``. Retried by the transport's layer A and
    layer B (PROTOCOL.md 9.3).
    """

    def __init__(
        self, message: str = "Connection error.", *, request: httpx.Request | None = None
    ) -> None:
        super().__init__(message, request=request)


@final
class APITimeoutError(APIConnectionError):
    """A connect, read, write or pool timeout expired. Retried like APIConnectionError."""

    def __init__(
        self, message: str = "Request timed out.", *, request: httpx.Request | None = None
    ) -> None:
        super().__init__(message, request=request)


class APIStatusError(APIError):
    """The server answered with a non-2xx status.

    ``status_code``; ``body``: the decoded JSON body, or its text when not JSON;
    ``response``: the (already read) httpx response; ``request``: its request.
    Build one with :func:`status_error_for`, which picks the subclass for the status.
    """

    status_code: int
    response: httpx.Response | None

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: object | None = None,
        request: httpx.Request | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message, request=request, body=body)
        self.status_code = status_code
        self.response = response


@final
class BadRequestError(APIStatusError):
    """HTTP 400: the server rejected the request as malformed."""


@final
class AuthenticationError(APIStatusError):
    """HTTP 401: the API key is missing, wrong or expired. Check TINKER_API_KEY / api_key=."""


@final
class BillingError(APIStatusError):
    """HTTP 402: billing is not set up or is exhausted.

    The transport pauses and retries silently for up to an hour before raising this
    (PROTOCOL.md 9.6).
    """


@final
class PermissionDeniedError(APIStatusError):
    """HTTP 403: the key is valid but not allowed to do this."""


@final
class NotFoundError(APIStatusError):
    """HTTP 404: no such resource (session, model, checkpoint, future)."""


@final
class ConflictError(APIStatusError):
    """HTTP 409: conflicts with the server's state; retried by layers A and B."""


@final
class GoneError(APIStatusError):
    """HTTP 410: the resource existed but is gone (an expired future, a finished session)."""


@final
class UnprocessableEntityError(APIStatusError):
    """HTTP 422: the body was well-formed but semantically invalid."""


@final
class RateLimitError(APIStatusError):
    """HTTP 429: too many requests; retried with back-off by layers A and B."""


@final
class InternalServerError(APIStatusError):
    """HTTP >= 500: the server failed; retried by layers A and B."""


_STATUS_CLASSES: Final[dict[int, type[APIStatusError]]] = {
    400: BadRequestError,
    401: AuthenticationError,
    402: BillingError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


def _decode_body(response: httpx.Response) -> object | None:
    """The body as JSON if it parses, else as text; None for an empty body.

    Raises ``httpx.ResponseNotRead`` if the response was streamed and not read.
    """
    raw = response.content
    if not raw:
        return None
    try:
        decoded: object = json.loads(raw)
        return decoded
    except ValueError:
        return response.text


def status_error_for(response: httpx.Response, message: str | None = None) -> APIStatusError:
    """Build the APIStatusError subclass for ``response.status_code`` (PROTOCOL.md 7.10).

    The response must have been read (``await response.aread()``). The message is
    ``"Error code: <status> - <body>"`` unless ``message`` is given.
    """
    status = response.status_code
    body = _decode_body(response)
    if message is None:
        shown = body if isinstance(body, str) else json.dumps(body)
        if len(shown) > _MAX_BODY_IN_MESSAGE:
            shown = shown[:_MAX_BODY_IN_MESSAGE] + "... (truncated)"
        message = f"Error code: {status} - {shown}"
    cls = _STATUS_CLASSES.get(status)
    if cls is None:
        cls = InternalServerError if status >= 500 else APIStatusError
    return cls(message, status_code=status, body=body, request=response.request, response=response)


@final
class RequestFailedError(TinkexError):
    """The server accepted and ran the request, and it failed (PROTOCOL.md 4.7).

    ``category`` says whose fault it was: ``"user"`` (fix the input), ``"server"``, or
    ``"unknown"`` (also used for a missing or unrecognised category). Not retried: running the
    same request again would fail the same way.
    """

    message: str
    request_id: str | None
    category: ErrorCategory

    def __init__(
        self, message: str, request_id: str | None = None, category: str | None = "unknown"
    ) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id
        self.category = _normalise_category(category)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.request_id, self.category))

    def __str__(self) -> str:
        where = f" (request {self.request_id})" if self.request_id else ""
        return f"{self.message}{where} [category: {self.category}]"


def _normalise_category(category: str | None) -> ErrorCategory:
    value = (category or "unknown").lower()
    if value == "user":
        return "user"
    if value == "server":
        return "server"
    return "unknown"


@final
class MissingAPIKeyError(TinkexError, ValueError):
    """No API key was configured.

    Set ``TINKER_API_KEY`` or pass ``api_key=``. The message also explains how to run against the
    local backend, which needs no account.
    """


@final
class InvalidInputError(TinkexError, ValueError):
    """Bad user input caught before anything was sent; the message names the field and the fix."""


@final
class ResultTimeoutError(TinkexError, TimeoutError):
    """A result did not arrive within the ``timeout=`` the caller gave (e.g. ``fut.result``)."""


@final
class ClientClosedError(TinkexError, RuntimeError):
    """A client, future or transport was used after the service that owns it was closed.

    Likely cause: the object escaped the ``async with open_service(...)`` block that created it.
    """
