"""Encode a forward_backward request with the official SDK, from plain Python lists.

Run with the python of the tinker 0.38 venv: `python encode_with_official.py SPEC.json OUT.pb`;
writes OUT.pb as the SDK sends it and OUT.pb.det serialized deterministically (map entries in
key order: upb orders them by a per-process hash seed otherwise, so the SDK's own bytes for the
same data vary from run to run).
SPEC holds `model_id`, `seq_id`, `loss_fn`, `loss_fn_config`, `forward_only` and `data`: a list
of `{"tokens": [...], "loss_fn_inputs": {name: [...]}}`. The datums are built the way a user of
the official SDK builds them (`ModelInput.from_ints`, lists for the loss inputs) and encoded by
the SDK's own request path (`forward_backward_request_to_proto`, then `forward_only` as its
training resource sets it), so the byte-level test can compare our body with its body.
"""

from __future__ import annotations

import json
import sys

from tinker import types
from tinker.proto.request_conv import forward_backward_request_to_proto


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(datum["tokens"]),
            loss_fn_inputs=datum["loss_fn_inputs"],
        )
        for datum in spec["data"]
    ]
    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(
            data=data, loss_fn=spec["loss_fn"], loss_fn_config=spec["loss_fn_config"]
        ),
        model_id=spec["model_id"],
        seq_id=spec["seq_id"],
    )
    message = forward_backward_request_to_proto(request)
    message.forward_only = spec["forward_only"]
    with open(sys.argv[2], "wb") as f:
        f.write(message.SerializeToString())
    with open(sys.argv[2] + ".det", "wb") as f:
        f.write(message.SerializeToString(deterministic=True))


if __name__ == "__main__":
    main()
