"""What every client of one service shares: the state `open_service` owns."""

from __future__ import annotations

import dataclasses
import itertools

import trio

from tinkex_trio import types as t
from tinkex_trio._dispatch import RateLimiter
from tinkex_trio._dynamic import DynamicConfig, SampleCanceller
from tinkex_trio._limits import ByteBudget
from tinkex_trio._polling import FuturePoller
from tinkex_trio._transport import Transport
from tinkex_trio.config import Config
from tinkex_trio.errors import ClientClosedError
from tinkex_trio.telemetry import Telemetry


@dataclasses.dataclass(eq=False)
class ServiceContext:
    """Owned by `open_service`; clients hold a reference and check `closed` before each use.

    `nursery` runs every background task (training senders, future polls, heartbeat,
    dynamic-config refresh, sample cancels). The counters are the per-session counters of
    PROTOCOL.md 5.1.
    """

    config: Config
    transport: Transport
    telemetry: Telemetry
    poller: FuturePoller
    nursery: trio.Nursery
    session_id: str
    client_config: t.ClientConfigResponse
    rate_limiter: RateLimiter
    fwdbwd_budget: ByteBudget
    # PROTOCOL.md 2.1 step 3 and 4.9: refreshed flags, and where abandoned samples go.
    dynamic_config: DynamicConfig
    sample_canceller: SampleCanceller
    model_seq_ids: itertools.count[int] = dataclasses.field(default_factory=itertools.count)
    sampling_session_seq_ids: itertools.count[int] = dataclasses.field(
        default_factory=itertools.count
    )
    closed: bool = False
    # Set when a server answered a JSON forward_backward with 415 (it only takes protobuf,
    # PROTOCOL.md 6): every later forward_backward of the service goes as protobuf.
    fwdbwd_protobuf_forced: bool = False

    def fwdbwd_protobuf(self) -> bool:
        """Whether forward/forward_backward go as protobuf (PROTOCOL.md 6.2).

        Yes if the config asks (`wire_format="protobuf"`), the server's client/config asks
        (`proto_fwdbwd`, or `proto_compress_fwdbwd`, which only makes sense for protobuf), or a
        server refused a JSON body with 415. JSON (Appendix A.1) otherwise.
        """
        flags = self.client_config
        return (
            self.config.wire_format == "protobuf"
            or flags.proto_fwdbwd
            or flags.proto_compress_fwdbwd
            or self.fwdbwd_protobuf_forced
        )

    def check_open(self, what: str) -> None:
        if self.closed:
            raise ClientClosedError(
                f"{what} was used after its service closed; use clients only inside the "
                "`async with open_service(...)` block that created them"
            )
