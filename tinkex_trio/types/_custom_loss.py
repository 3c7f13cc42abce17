"""Wire types of server-side custom losses (PROTOCOL.md 3.2 `create_custom_loss`, 8.8, 9.8).

The official SDK 0.38 traces a custom loss with torch.fx and, when the server's
`custom_loss_server_side` flag is on, uploads the graph as plain data. Nothing in a graph is
executable: the local backend rebuilds it from its own allowlist (`local/_custom_graph.py`).
Decoded strictly (no lenient null-dropping: `None` is a meaningful argument value here).
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from tinkex_trio.types._base import Request, Response
from tinkex_trio.types._bounds import Id, SeqId, Text

CustomLossNodeOp = Literal[
    "placeholder", "get_attr", "call_function", "call_method", "call_module", "output"
]


class CustomLossInput(Request, kw_only=True):
    """One graph input: `logprobs` first, then the `loss_fn_inputs` keys the loss reads."""

    name: str
    rank: Literal[0, 1, 2]


class CustomLossNode(Request, kw_only=True):
    """One torch.fx node; `args`/`kwargs` use the encoding of PROTOCOL.md 3.2."""

    op: CustomLossNodeOp
    name: str
    target: str
    args: list[Any] = msgspec.field(default_factory=list)
    kwargs: dict[str, Any] = msgspec.field(default_factory=dict)


class CustomLossGraph(Request, kw_only=True):
    format: Literal[1] = 1
    nodes: list[CustomLossNode]


class CreateCustomLossRequest(Request, kw_only=True):
    """Body of `POST /api/v1/create_custom_loss`."""

    session_id: Id
    custom_loss_seq_id: SeqId
    name: Text
    inputs: list[CustomLossInput]
    graph: CustomLossGraph
    type: Literal["create_custom_loss"] = "create_custom_loss"


class CreateCustomLossResponse(Response, kw_only=True):
    """Result of the `create_custom_loss` future: the id `forward_backward` names it by."""

    loss_id: str
    type: Literal["create_custom_loss"] = "create_custom_loss"
