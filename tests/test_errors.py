"""The exception tree and status_error_for."""

from __future__ import annotations

import pickle

import httpx
import pytest

from tinkex_trio import errors
from tinkex_trio.errors import (
    APIConnectionError,
    APIError,
    APIStatusError,
    APITimeoutError,
    RequestFailedError,
    status_error_for,
)

KEY = "tml-secret-key-0123456789abcdef"


def _response(status: int, content: bytes) -> httpx.Response:
    request = httpx.Request("POST", "http://h/api/v1/x", headers={"X-API-Key": KEY})
    return httpx.Response(status, content=content, request=request)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, errors.BadRequestError),
        (401, errors.AuthenticationError),
        (402, errors.BillingError),
        (403, errors.PermissionDeniedError),
        (404, errors.NotFoundError),
        (409, errors.ConflictError),
        (410, errors.GoneError),
        (422, errors.UnprocessableEntityError),
        (429, errors.RateLimitError),
        (500, errors.InternalServerError),
        (503, errors.InternalServerError),
        (599, errors.InternalServerError),
        (418, APIStatusError),
        (302, APIStatusError),
    ],
)
def test_status_error_class(status: int, cls: type[APIStatusError]) -> None:
    err = status_error_for(_response(status, b'{"detail": "nope"}'))
    assert type(err) is cls
    assert err.status_code == status
    assert err.body == {"detail": "nope"}
    assert err.message == f'Error code: {status} - {{"detail": "nope"}}'
    assert str(err) == err.message
    assert err.request is not None and err.response is not None
    assert isinstance(err, APIError) and isinstance(err, errors.TinkexError)


def test_text_and_empty_bodies() -> None:
    err = status_error_for(_response(502, b"<html>bad gateway</html>"))
    assert err.body == "<html>bad gateway</html>"
    assert str(err) == "Error code: 502 - <html>bad gateway</html>"
    assert status_error_for(_response(500, b"")).body is None


def test_long_body_truncated_in_message_only() -> None:
    body = b"x" * 10_000
    err = status_error_for(_response(500, body))
    assert len(str(err)) < 2100 and err.body == body.decode()


def test_no_key_in_messages_or_reprs() -> None:
    err = status_error_for(_response(401, b'{"detail": "bad key"}'))
    for text in (str(err), repr(err), repr(err.request), repr(err.response)):
        assert KEY not in text
    conn = APIConnectionError(request=err.request)
    assert KEY not in repr(conn) + str(conn)


def test_connection_error_hierarchy() -> None:
    assert issubclass(APITimeoutError, APIConnectionError)
    assert str(APITimeoutError()) == "Request timed out."
    assert not issubclass(APIConnectionError, APIStatusError)


@pytest.mark.parametrize(
    ("given", "expected"),
    [("user", "user"), ("SERVER", "server"), ("weird", "unknown"), (None, "unknown")],
)
def test_request_failed_category(given: str | None, expected: str) -> None:
    err = RequestFailedError("too long", "req-1", given)
    assert err.category == expected
    assert err.request_id == "req-1"
    assert "too long" in str(err)


def test_builtin_bases() -> None:
    assert issubclass(errors.MissingAPIKeyError, ValueError)
    assert issubclass(errors.InvalidInputError, ValueError)
    assert issubclass(errors.ResultTimeoutError, TimeoutError)
    assert issubclass(errors.ClientClosedError, RuntimeError)


def test_pickle_round_trip() -> None:
    err = status_error_for(_response(404, b"{}"))
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is errors.NotFoundError and str(again) == str(err)
    assert again.status_code == 404 and again.body == {}
    rf = pickle.loads(pickle.dumps(RequestFailedError("m", "r", "user")))
    assert (rf.message, rf.request_id, rf.category) == ("m", "r", "user")


def test_all_is_sorted_and_complete() -> None:
    assert errors.__all__ == sorted(errors.__all__)
    public = {
        n for n in vars(errors) if not n.startswith("_") and isinstance(getattr(errors, n), type)
    }
    public |= {"status_error_for"}
    assert public - {"Any", "Final", "Literal", "ErrorCategory"} <= set(errors.__all__)
