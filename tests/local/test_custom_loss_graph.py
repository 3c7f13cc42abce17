"""The custom-loss graph checker (`local/_custom_graph.py`) and interpreter
(`engine/_graph_loss.py`): values and gradients against hand-written formulas, and refusals."""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from custom_loss_graphs import neg_ll, ppo_clipped, scaled, topk_distill, upload_body

from tinkex_trio.local._custom_graph import MAX_NODES, CustomLoss, compile_custom_loss
from tinkex_trio.local._engine_api import EngineUserError
from tinkex_trio.local.engine._graph_loss import MAX_ELEMENTS, MAX_TOTAL_ELEMENTS, run_graph
from tinkex_trio.types._custom_loss import CreateCustomLossRequest


def compile_body(body: dict[str, Any]) -> CustomLoss:
    return compile_custom_loss(msgspec.convert(body, CreateCustomLossRequest), "sess:loss:0")


def compiled(fn: Any, ranks: dict[str, int]) -> CustomLoss:
    return compile_body(upload_body("sess", fn, ranks))


def run_with_grad(
    loss: CustomLoss, lp: list[float] | np.ndarray, *inputs: Any
) -> tuple[float, dict[str, float], np.ndarray]:
    lp_t = torch.tensor(np.asarray(lp, dtype=np.float32), requires_grad=True)
    value, metrics = run_graph(loss, [lp_t, *(torch.as_tensor(x) for x in inputs)])
    value.backward()
    assert lp_t.grad is not None
    return float(value.detach()), {k: float(v) for k, v in metrics.items()}, lp_t.grad.numpy()


def test_neg_ll_value_metrics_and_gradient() -> None:
    loss = compiled(neg_ll, {"logprobs": 1, "weights": 1})
    value, metrics, grad = run_with_grad(
        loss, [-1.0, -2.0, -0.5], np.array([1.0, 0.0, 2.0], np.float32)
    )
    assert value == pytest.approx(2.0)  # 1*1 + 0*2 + 2*0.5
    assert metrics == {"custom/neg_ll:sum": pytest.approx(2.0), "custom/tokens:mean": 3.0}
    np.testing.assert_allclose(grad, [-1.0, 0.0, -2.0])
    assert loss.metric_keys == ("custom/neg_ll:sum", "custom/tokens:mean")
    assert loss.input_names == ("weights",)


def test_ppo_clipped_loss_against_numpy() -> None:
    loss = compiled(ppo_clipped, {"logprobs": 1, "sampler_logprobs": 1, "advantages": 1})
    lp = np.array([-1.0, -0.5, 0.0], np.float32)
    q = np.array([-1.1, -0.45, -0.5], np.float32)
    adv = np.array([1.0, -2.0, 1.0], np.float32)
    value, metrics, grad = run_with_grad(loss, lp, q, adv)
    ratio = np.exp(lp.astype(np.float64) - q)
    clipped = np.clip(ratio, 0.8, 1.2)
    # Token 0 and 1: the unclipped term is the minimum; token 2 is clipped (ratio e^0.5).
    assert value == pytest.approx(-np.minimum(ratio * adv, clipped * adv).sum(), rel=1e-6)
    np.testing.assert_allclose(grad, [-ratio[0] * adv[0], -ratio[1] * adv[1], 0.0], rtol=1e-6)
    assert metrics["custom/clip_fraction:mean"] == pytest.approx(1 / 3)
    assert metrics["custom/ppo:sum"] == pytest.approx(value)


def test_rank2_logprobs_and_input_against_torch_reference() -> None:
    loss = compiled(topk_distill, {"logprobs": 2, "teacher": 2})
    rng = np.random.default_rng(0)
    lp = -rng.random((4, 3)).astype(np.float32) * 3
    teacher = rng.dirichlet(np.ones(3), size=4).astype(np.float32)
    value, metrics, grad = run_with_grad(loss, lp, teacher)
    ref_lp = torch.tensor(lp, requires_grad=True)
    ref = (
        -(torch.tensor(teacher) * torch.log_softmax(ref_lp, dim=-1)).sum()
        + torch.log1p(torch.exp(ref_lp[:, 0])).mean()
    )
    ref.backward()
    assert ref_lp.grad is not None
    assert value == pytest.approx(float(ref.detach()), rel=1e-6)
    np.testing.assert_allclose(grad, ref_lp.grad.numpy(), rtol=1e-5, atol=1e-7)
    assert metrics == {"custom/distill:sum": pytest.approx(float(ref.detach()), rel=1e-6)}


def test_rank0_input() -> None:
    loss = compiled(scaled, {"logprobs": 1, "scale": 0})
    value, metrics, grad = run_with_grad(loss, [-1.0, -3.0], np.float32(0.5))
    assert value == pytest.approx(2.0)
    assert metrics == {"custom/scale:mean": 0.5}
    np.testing.assert_allclose(grad, [-0.5, -0.5])


def test_literals_slices_ellipsis_dtypes_and_infinities() -> None:
    def shaped(logprobs: Any, mask: Any) -> Any:
        head = logprobs[1:None:2].to(torch.float64)
        safe = torch.where(mask[...] > 0, logprobs, torch.full_like(logprobs, float("-inf")))
        loss = -head.sum() - torch.logsumexp(safe, dim=0).float()
        return loss, {}

    loss = compiled(shaped, {"logprobs": 1, "mask": 1})
    value, metrics, grad = run_with_grad(
        loss, [-1.0, -2.0, -3.0, -4.0], np.array([1, 0, 1, 0], np.float32)
    )
    assert value == pytest.approx(6.0 - np.log(np.exp(-1.0) + np.exp(-3.0)), rel=1e-6)
    assert metrics == {}
    soft = np.exp([-1.0, -3.0]) / np.exp([-1.0, -3.0]).sum()
    np.testing.assert_allclose(grad, [-soft[0], -1.0, -soft[1], -1.0], rtol=1e-6)


# -------------------------------------------------------------------------- refusals at upload


def base_body() -> dict[str, Any]:
    return upload_body("sess", neg_ll, {"logprobs": 1, "weights": 1})


def with_node(node: dict[str, Any], at: int = 2) -> dict[str, Any]:
    body = base_body()
    body["graph"]["nodes"].insert(at, node)
    return body


def call(op: str, target: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    return {"op": op, "name": "bad", "target": target, "args": list(args), "kwargs": kwargs}


REF = {"ref": "logprobs"}


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (with_node(call("call_function", "builtins.eval", "1+1")), "'builtins.eval'"),
        (with_node(call("call_function", "os.system", "true")), "'os.system'"),
        (with_node(call("call_function", "torch.load", "x")), "'torch.load'"),
        (with_node(call("call_function", "torch.Tensor.__class__", REF)), "allowlist"),
        (with_node(call("call_method", "__class__", REF)), "'__class__'"),
        (with_node(call("call_method", "add_", REF, 1)), "'add_'"),
        (with_node(call("call_method", "numpy", REF)), "'numpy'"),
        (with_node(call("call_function", "getattr", REF, "__class__")), "shape"),
        (with_node(call("call_function", "getattr", "torch", "load")), "shape"),
        (with_node(call("call_function", "getattr", REF, ["shape"])), "shape"),
        (with_node(call("get_attr", "_tensor_constant0")), "captures a tensor"),
        (with_node(call("call_module", "linear", REF)), "module"),
        (with_node(call("call_function", "torch.exp", REF, out=REF)), "out="),
        (with_node(call("call_function", "torch.exp", {"ref": "output"})), "not an earlier"),
        (with_node(call("call_method", "to", REF, {"device": "cuda"})), "device 'cuda'"),
        (with_node(call("call_method", "to", REF, {"dtype": ["x"]})), "dtype ['x']"),
        (with_node(call("call_function", "torch.exp", {"code": "x"})), "not a valid encoding"),
        (with_node(call("call_function", "torch.exp", 2**70)), "outside int64"),
    ],
    ids=[
        "builtins.eval",
        "os.system",
        "torch.load",
        "attribute-walk",
        "dunder-method",
        "in-place-method",
        "host-method",
        "getattr-dunder",
        "getattr-module",
        "getattr-unhashable",
        "get_attr",
        "call_module",
        "out-kwarg",
        "forward-ref",
        "cuda-device",
        "unhashable-dtype",
        "unknown-encoding",
        "huge-int",
    ],
)
def test_refused_nodes_name_the_node_and_op(body: dict[str, Any], expected: str) -> None:
    with pytest.raises(EngineUserError) as info:
        compile_body(body)
    message = str(info.value)
    assert expected in message
    assert "neg_ll" in message


def test_get_attr_from_a_captured_tensor_is_refused() -> None:
    weights = torch.ones(3)

    def captures(logprobs: Any) -> Any:
        loss = -(logprobs * weights).sum()
        return loss, {}

    with pytest.raises(EngineUserError, match="captures a tensor"):
        compiled(captures, {"logprobs": 1})


def test_too_many_nodes() -> None:
    body = base_body()
    nodes = body["graph"]["nodes"]
    extra = [
        call("call_function", "operator.neg", {"ref": "logprobs"}) | {"name": f"n{i}"}
        for i in range(MAX_NODES)
    ]
    body["graph"]["nodes"] = nodes[:2] + extra + nodes[2:]
    with pytest.raises(EngineUserError, match=f"at most {MAX_NODES}"):
        compile_body(body)


@pytest.mark.parametrize("key", ["loss:sum", "custom/Neg:sum", "custom/x:max", "custom/:sum"])
def test_bad_metric_keys(key: str) -> None:
    body = base_body()
    output = body["graph"]["nodes"][-1]
    output["args"] = [{"tuple": [{"ref": "neg"}, {"dict": {key: {"ref": "neg"}}}]}]
    with pytest.raises(EngineUserError, match="metric keys must be custom/"):
        compile_body(body)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda b: b["inputs"].reverse(), "first input must be logprobs"),
        (lambda b: b["inputs"][0].update(rank=0), "first input must be logprobs"),
        (
            lambda b: b["inputs"].extend({"name": f"x{i}", "rank": 1} for i in range(15)),
            "1 to 16 inputs",
        ),
        (lambda b: b["graph"]["nodes"].pop(), "no output node"),
        (lambda b: b["graph"]["nodes"][1].update(target="other"), "expected weights"),
        (lambda b: b["graph"]["nodes"][-1].update(args=[{"ref": "neg"}]), "(loss, metrics)"),
    ],
    ids=["order", "rank0-logprobs", "too-many-inputs", "no-output", "placeholder", "output"],
)
def test_malformed_graphs(mutate: Any, expected: str) -> None:
    body = copy.deepcopy(base_body())
    mutate(body)
    with pytest.raises(EngineUserError) as info:
        compile_body(body)
    assert expected in str(info.value)


# ---------------------------------------------------------------------- guards at run time


def test_a_broadcast_over_the_element_limit_is_refused_before_it_runs() -> None:
    def cube(logprobs: Any) -> Any:
        outer = logprobs.unsqueeze(1) * logprobs.unsqueeze(0)
        loss = (outer.unsqueeze(-1) * logprobs).sum()
        return loss, {}

    loss = compiled(cube, {"logprobs": 1})
    n = round(MAX_ELEMENTS ** (1 / 3)) + 8
    with pytest.raises(EngineUserError, match=r"node 'mul_1' .* would create a tensor"):
        run_graph(loss, [torch.zeros(n)])
    value, _ = run_graph(loss, [torch.ones(4)])
    assert float(value) == 64.0


def test_the_tensors_of_one_run_share_an_element_budget() -> None:
    body = upload_body("sess", lambda_free_chain, {"logprobs": 1})
    loss = compile_body(body)
    size = MAX_ELEMENTS // 2
    steps = MAX_TOTAL_ELEMENTS // size  # each node creates one tensor of `size` elements
    assert len(loss.nodes) > steps
    with pytest.raises(EngineUserError, match=f"over {MAX_TOTAL_ELEMENTS} elements"):
        run_graph(loss, [torch.zeros(size)])
    value, _ = run_graph(loss, [torch.zeros(8)])
    assert float(value) == 0.0


def lambda_free_chain(logprobs: Any) -> Any:
    x = logprobs
    for _ in range(40):
        x = x * 1.0
    return x.sum(), {}


def test_python_arithmetic_guards() -> None:
    body = base_body()
    nodes = body["graph"]["nodes"]
    nodes[2:2] = [
        call("call_function", "getattr", REF, "shape") | {"name": "shape"},
        call("call_function", "operator.getitem", {"ref": "shape"}, 0) | {"name": "n"},
        call("call_function", "operator.pow", {"ref": "n"}, 10**6) | {"name": "big"},
    ]
    loss = compile_body(body)
    with pytest.raises(EngineUserError, match=r"node 'big' .*power above"):
        run_graph(loss, [torch.zeros(3), torch.zeros(3)])


def test_a_method_on_a_non_tensor_and_a_failing_node_are_user_errors() -> None:
    body = base_body()
    body["graph"]["nodes"][2:2] = [
        call("call_function", "getattr", REF, "shape") | {"name": "shape"},
        call("call_method", "sum", {"ref": "shape"}) | {"name": "s"},
    ]
    with pytest.raises(EngineUserError, match=r"node 's' .*on a Size"):
        run_graph(compile_body(body), [torch.zeros(3), torch.zeros(3)])
    loss = compiled(neg_ll, {"logprobs": 1, "weights": 1})
    with pytest.raises(
        EngineUserError, match=r"node 'mul' \(call_function 'operator.mul'\) failed"
    ):
        run_graph(loss, [torch.zeros(3), torch.zeros(4)])


def test_a_non_scalar_loss_is_refused() -> None:
    def vector(logprobs: Any) -> Any:
        return -logprobs, {}

    with pytest.raises(EngineUserError, match="scalar loss"):
        run_graph(compiled(vector, {"logprobs": 1}), [torch.zeros(3)])


def test_softplus_and_logsigmoid_resolve_to_the_functional_forms() -> None:
    def both(logprobs: Any) -> Any:
        loss = F.softplus(logprobs).sum() - F.logsigmoid(logprobs).sum()
        return loss, {}

    loss = compiled(both, {"logprobs": 1})
    assert {n.target for n in loss.nodes} >= {"torch._C._nn.softplus", "torch._C._nn.log_sigmoid"}
    x = torch.tensor([-1.0, 0.5])
    value, _ = run_graph(loss, [x])
    assert float(value) == pytest.approx(float(2 * F.softplus(x).sum() - x.sum()), rel=1e-6)
