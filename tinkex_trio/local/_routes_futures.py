"""Future endpoints (PROTOCOL.md 3.4, 4): `retrieve_future` (long-poll, metadata-only answers,
410 for deleted payloads), session-wide `retrieve_futures` and `cancel_future`.
"""

from __future__ import annotations

from typing import Final

import trio

from tinkex_trio.types import (
    UNSET,
    CancelFutureRequest,
    CompleteMetadataResponse,
    EmptyResponse,
    FutureCompletion,
    RetrieveFutureRequest,
    RetrieveFuturesRequest,
    RetrieveFuturesResponse,
    decode_request,
)

from ._backend import API, Backend
from ._futures import render_result
from ._http import Handler, HTTPError, Request, Response, json_response

#: PROTOCOL.md 4.8: retrieve_futures long-polls like retrieve_future unless `timeout` says less.
MAX_RETRIEVE_FUTURES_TIMEOUT: Final = 30.0


class FutureRoutes:
    """The future endpoints; futures themselves live in `FutureRegistry`."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [
            ("POST", f"{API}/retrieve_future", self.retrieve_future),
            ("POST", f"{API}/retrieve_futures", self.retrieve_futures),
            ("POST", f"{API}/cancel_future", self.cancel_future),
        ]

    async def retrieve_future(self, request: Request) -> Response:
        """Long-poll one future (PROTOCOL.md 4.2): its result, error, try_again, 410 if its
        payload was retrieved and deleted (4.8), or once `complete_metadata` if large (4.4)."""
        body = decode_request(request.body, RetrieveFutureRequest)
        row = await self.backend.registry.wait_finished(
            body.request_id, self.backend.settings.poll_timeout
        )
        if row is None:
            raise HTTPError(404, f"unknown request_id {body.request_id!r}")
        if row.state == "done" and row.result is None:
            raise HTTPError(
                410,
                f"result already retrieved: request {body.request_id!r} was listed in "
                "retrieved_request_ids and its payload deleted; submit the request again",
            )
        rendered = render_result(row, accept=request.header("accept"))
        threshold = self.backend.settings.metadata_only_threshold
        if (
            body.allow_metadata_only
            and row.state == "done"
            and threshold is not None
            and len(rendered.body) > threshold
            and self.backend.registry.announce_metadata_only(row.request_id)
        ):
            # The exact size of the body the next poll gets (protobuf or JSON), so the client
            # reserves what it will receive; rendering twice is paid once per large result.
            return json_response(CompleteMetadataResponse(response_payload_size=len(rendered.body)))
        self.backend.registry.delivered(row)
        return Response(
            status=rendered.status, body=rendered.body, content_type=rendered.content_type
        )

    async def retrieve_futures(self, request: Request) -> Response:
        """Session-wide completion polling (PROTOCOL.md 4.8): events after `prev_cursor`.

        Long-polls until at least one completion is newer than `prev_cursor` or the window
        (the request's `timeout`, else the server's poll window, at most 30 s) passes; `timeout:
        0` answers at once (ack-only polls). `retrieved_request_ids` are handled first: each
        payload is deleted once also delivered (`FutureRegistry.acknowledge_retrieved`).
        """
        body = decode_request(request.body, RetrieveFuturesRequest)
        target = body.target
        if self.backend.store.get_sampling_session(target.sampling_session_id) is None:
            raise HTTPError(404, f"unknown sampling_session_id {target.sampling_session_id!r}")
        self.backend.registry.acknowledge_retrieved(
            target.sampling_session_id, body.retrieved_request_ids
        )
        log = self.backend.registry.completion_log(
            target.sampling_session_id, target.cloned_sampler_id
        )
        window = self.backend.settings.poll_timeout if body.timeout is UNSET else body.timeout
        window = max(0.0, min(window, MAX_RETRIEVE_FUTURES_TIMEOUT))
        events = log.after(body.prev_cursor)
        if not events and window > 0:
            with trio.move_on_after(window):
                while not events:
                    await log.changed.wait()
                    events = log.after(body.prev_cursor)
        else:
            await trio.lowlevel.checkpoint()
        completions = [
            FutureCompletion(
                state=e.state,
                request_id=e.request_id,
                response_payload_uncompressed_size=e.size if e.state == "finished" else UNSET,
            )
            for e in events
        ]
        cursor = events[-1].cursor if events else max(body.prev_cursor, log.next_cursor - 1)
        return json_response(RetrieveFuturesResponse(completions=completions, cursor=cursor))

    async def cancel_future(self, request: Request) -> Response:
        """An abandoned sample (PROTOCOL.md 4.9): stop it if the engine has not started it.

        * Unknown request id: 404.
        * Already finished (done or failed): 200, nothing changes; the result stays.
        * A sample still waiting for the engine: taken out of the `SampleBatcher` queue (the
          engine never runs it, its `max_queued_samples` slot is free at once) and its future
          fails as cancelled (category `user`).
        * A sample the engine is running: its future fails as cancelled now; the engine's
          result, when it comes, is dropped (a batched engine call cannot be interrupted, and
          the client that cancelled is no longer polling).
        * Any other request (training): 200, nothing changes. Training requests run in seq_id
          order whatever happens (5.2), so failing the future would only hide a step that was
          still applied; clients never cancel them (4.9).
        """
        body = decode_request(request.body, CancelFutureRequest)
        row = self.backend.store.get_future(body.request_id)
        if row is None:
            raise HTTPError(404, f"unknown request_id {body.request_id!r}")
        if row.request_type == "Sample" and row.state not in ("done", "failed"):
            self.backend.batcher.cancel(body.request_id)
            self.backend.registry.cancel(body.request_id)
        await trio.lowlevel.checkpoint()
        return json_response(EmptyResponse())
