"""An instant Tinker stub server for the side-by-side client benchmarks.

It answers what both this SDK and the official `tinker` 0.38 SDK call during a sampling
fan-out or a training loop (client/config, sessions, create_sampling_session, asample,
create_model, get_info, forward_backward in JSON or protobuf, optim_step, retrieve_future with
JSON or protobuf results), at once, with as little server CPU as possible: raw trio streams,
a head split on CRLF, pre-encoded constant answers. It is not a server to learn from (the local
backend is): it exists so that a benchmark measures clients, not the server.

Two listening ports: on the first, `client/config` says `use_pyqwest_transport: true` (the
official SDK's Rust transport), on the second `false` (its httpx transport); ours ignores it.

    python benchmarks/_stub_server.py [--cpu N]   # prints "PORT_PYQWEST PORT_HTTPX", serves forever
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
from pathlib import Path

import msgspec
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tinkex_trio import _protobuf, types as t

API = b"/api/v1/"
JSON = b"application/json"
PROTOBUF = b"application/x-protobuf"

_SAMPLE = t.SampleResponse(
    sequences=[t.SampledSequence(stop_reason="length", tokens=[11, 12], logprobs=[-0.5, -0.25])]
)
_SAMPLE_JSON = t.encode(_SAMPLE)
_SAMPLE_PROTO = _protobuf.encode_sample_response(_SAMPLE)
_future_decoder = msgspec.json.Decoder(t.RetrieveFutureRequest)


class Stub:
    def __init__(self) -> None:
        self._ids = itertools.count()
        # request id -> (JSON body, protobuf body or None); a sample's answer is constant.
        self._results: dict[str, tuple[bytes, bytes | None]] = {}

    def _future(self, json_body: bytes, proto_body: bytes | None) -> bytes:
        request_id = f"r{next(self._ids)}"
        self._results[request_id] = (json_body, proto_body)
        return b'{"request_id":"%s"}' % request_id.encode()

    def route(
        self, path: bytes, headers: dict[bytes, bytes], body: bytes, pyqwest: bool
    ) -> tuple[int, bytes, bytes]:
        name = path[len(API) :] if path.startswith(API) else path
        if name == b"asample":
            request_id = f"s{next(self._ids)}".encode()
            return (
                200,
                JSON,
                b'{"request_id":"%s","sample_sequence_ids":["%s-0"]}'
                % (
                    request_id,
                    request_id,
                ),
            )
        if name == b"retrieve_future":
            request_id = _future_decoder.decode(body).request_id
            wants_proto = PROTOBUF in headers.get(b"accept", b"")
            if request_id.startswith("s"):
                return (200, PROTOBUF, _SAMPLE_PROTO) if wants_proto else (200, JSON, _SAMPLE_JSON)
            json_body, proto_body = self._results.pop(request_id)
            if wants_proto and proto_body is not None:
                return 200, PROTOBUF, proto_body
            return 200, JSON, json_body
        if name in (b"forward_backward", b"forward"):
            return 200, JSON, self._forward_backward(headers, body)
        if name == b"optim_step":
            return 200, JSON, self._future(b'{"metrics":{}}', None)
        if name == b"client/config":
            flags = t.ClientConfigResponse(use_pyqwest_transport=pyqwest)
            return 200, JSON, t.encode(flags)
        if name == b"client/dynamic_config":
            return 200, JSON, t.encode(t.DynamicConfigResponse())
        if name == b"create_session":
            return 200, JSON, t.encode(t.CreateSessionResponse(session_id="stub-session"))
        if name == b"create_sampling_session":
            created = t.CreateSamplingSessionResponse(sampling_session_id="stub-sampler")
            return 200, JSON, t.encode(created)
        if name == b"create_model":
            done = t.CreateModelResponse(model_id="stub-session:train:0")
            return 200, JSON, self._future(t.encode(done), None)
        if name == b"get_info":
            info = t.GetInfoResponse(
                model_id="stub-session:train:0",
                model_data=t.ModelData(arch="llama", model_name="stub/model"),
                is_lora=True,
                lora_rank=8,
            )
            return 200, JSON, t.encode(info)
        if name == b"telemetry":
            return 200, JSON, b'{"status":"accepted"}'
        if name in (b"session_heartbeat",) or name.endswith(b"/finish"):
            return 200, JSON, b"{}"
        return 404, JSON, b'{"detail":"not in the stub"}'

    def _forward_backward(self, headers: dict[bytes, bytes], body: bytes) -> bytes:
        """Logprobs of -0.5 for every target token of every datum; loss = their sum."""
        if headers.get(b"content-type", b"").startswith(PROTOBUF):
            if headers.get(b"content-encoding") == b"zstd":
                body = _protobuf.decompress(body)
            data = _protobuf.decode_forward_backward_request(body).data
        else:
            raw = msgspec.json.decode(body)
            key = "forward_backward_input" if "forward_backward_input" in raw else "forward_input"
            data = msgspec.convert(raw[key]["data"], list[t.Datum])
        outputs = []
        for datum in data:
            n = len(datum.loss_fn_inputs["target_tokens"].data)
            outputs.append({"logprobs": t.TensorData.from_list([-0.5] * n, "float32")})
        result = t.ForwardBackwardOutput(
            loss_fn_output_type="ArrayRecord", loss_fn_outputs=outputs, metrics={"loss:sum": 0.0}
        )
        return self._future(t.encode(result), _protobuf.encode_forward_backward_output(result))


async def _read_chunked(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    body = bytearray()
    while True:
        while (end := buffer.find(b"\r\n")) < 0:
            buffer += await stream.receive_some(65536)
        size = int(bytes(buffer[:end]).split(b";")[0], 16)
        del buffer[: end + 2]
        while len(buffer) < size + 2:
            buffer += await stream.receive_some(65536)
        body += buffer[:size]
        del buffer[: size + 2]
        if size == 0:
            return bytes(body)


async def serve_connection(stub: Stub, stream: trio.SocketStream, *, pyqwest: bool) -> None:
    buffer = bytearray()
    async with stream:
        while True:
            while (end := buffer.find(b"\r\n\r\n")) < 0:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return
                buffer += data
            lines = bytes(buffer[:end]).split(b"\r\n")
            del buffer[: end + 4]
            _, target, _ = lines[0].split(b" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                body = await _read_chunked(stream, buffer)
            else:
                size = int(headers.get(b"content-length", b"0"))
                while len(buffer) < size:
                    buffer += await stream.receive_some(65536)
                body = bytes(buffer[:size])
                del buffer[:size]
            path = target.split(b"?", 1)[0]
            status, content_type, payload = stub.route(path, headers, body, pyqwest)
            head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (
                status,
                b"OK" if status == 200 else b"Not Found",
                content_type,
                len(payload),
            )
            try:
                if len(payload) > 65536:
                    await stream.send_all(head)
                    await stream.send_all(payload)
                else:
                    await stream.send_all(head + payload)
            except trio.BrokenResourceError:
                return


async def main(cpu: int | None) -> None:
    if cpu is not None:
        os.sched_setaffinity(0, {cpu})
    stub = Stub()
    async with trio.open_nursery() as nursery:
        ports = []
        for pyqwest in (True, False):
            handler = functools.partial(serve_connection, stub, pyqwest=pyqwest)
            serve = functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1", backlog=4096)
            listeners = await nursery.start(serve)
            ports.append(listeners[0].socket.getsockname()[1])
        print(*ports, flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", type=int, default=None)
    trio.run(main, parser.parse_args().cpu)
