"""Decode a protobuf ForwardBackwardRequest with the official SDK's generated classes.

Run with the python of the tinker 0.38 venv: `python decode_with_official.py BODY_FILE`.
Prints the request's content as JSON in the shape of our JSON form (PROTOCOL.md A.1), so the
byte-level test can compare the two forms field by field.
"""

from __future__ import annotations

import json
import sys

import numpy as np
from tinker.proto import tinker_public_pb2 as public_pb

DTYPES = {
    public_pb.DTYPE_FLOAT32: ("float32", np.float32),
    public_pb.DTYPE_INT64: ("int64", np.int64),
}


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        message = public_pb.ForwardBackwardRequest.FromString(f.read())
    data = []
    for datum in message.data:
        chunks = []
        for chunk in datum.model_input:
            assert chunk.WhichOneof("chunk") == "encoded_text"
            tokens = np.frombuffer(chunk.encoded_text.tokens, dtype=np.int32).tolist()
            chunks.append({"tokens": tokens, "type": "encoded_text"})
        inputs = {}
        for name, tensor in datum.loss_fn_inputs.items():
            label, dtype = DTYPES[tensor.dtype]
            inputs[name] = {
                "data": np.frombuffer(tensor.dense, dtype=dtype).tolist(),
                "dtype": label,
                "shape": list(tensor.shape),
            }
        data.append({"model_input": {"chunks": chunks}, "loss_fn_inputs": inputs})
    print(
        json.dumps(
            {
                "model_id": message.model_id,
                "seq_id": message.seq_id,
                "forward_only": message.forward_only,
                "loss_fn": message.loss_fn,
                "loss_fn_config": dict(message.loss_fn_config),
                "loss_fn_config_v2": {k: v.number for k, v in message.loss_fn_config_v2.items()},
                "data": data,
            }
        )
    )


if __name__ == "__main__":
    main()
