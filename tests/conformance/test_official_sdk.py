"""Conformance: the official `tinker` SDK drives the local backend (tiny model), checked by value.

Each test runs the local backend in this trio loop (Hypercorn on 127.0.0.1, the torch engine in
its worker thread) and `official_client.py` in a subprocess with the python of a venv holding a
pinned official SDK (conftest.py): 0.38.0 speaks protobuf forward_backward (zstd, chunked two
datums per request by the `fwdbwd_max_chunk_len` flag) and protobuf results; 0.15.0 speaks JSON
only (PROTOCOL.md Appendix A). The parity test runs the same job through tinkex_trio and
compares losses, sampled tokens and logprobs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio

pytest.importorskip("torch")

from hf_dirs import write_family_dir
from official_venvs import JSON_VERSION, PROTOBUF_VERSION
from ours_job import run_job

from tinkex_trio import get_tokenizer
from tinkex_trio.local import open_local_backend
from tinkex_trio.local.engine import TorchEngine
from tinkex_trio.local.hf_cache import write_hf_cache
from tinkex_trio.local.model_locator import LocatedModel

TINY = "tinkex-trio/SmolLM2-tiny-random"
SCRIPT = Path(__file__).with_name("official_client.py")
#: Wall-clock bound per job (the install is bounded separately in conftest.py).
JOB_LIMIT = 240
#: Float tolerance between two passes over the same weights (float32 on CPU).
LOGPROB_ATOL = 1e-4
#: 0.38: protobuf with zstd, 5 datums cut into chunks of 2 (PROTOCOL.md 2.1, 6.3, 9.1).
PROTOBUF_FLAGS: dict[str, Any] = {"proto_compress_fwdbwd": True, "fwdbwd_max_chunk_len": 2}


async def run_official(
    python: Path,
    base_url: str,
    api_key: str,
    model: str = TINY,
    *,
    script: Path = SCRIPT,
    args: tuple[str, ...] = (),
    env_extra: dict[str, str] | None = None,
) -> dict[str, Any]:
    env = {**os.environ, "TINKER_TELEMETRY": "0", **(env_extra or {})}
    env.pop("TINKER_API_KEY", None)
    env.pop("TINKER_BASE_URL", None)
    done = await trio.run_process(
        [str(python), str(script), base_url, api_key, model, *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        pytest.fail(
            f"the official client failed (exit {done.returncode}):\n"
            + done.stderr.decode(errors="replace")[-4000:]
        )
    result: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
    return result


async def run_official_on_tiny_backend(
    tmp_path: Path, python: Path, script: Path, args: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`script` (official SDK) against a fresh tiny-model backend with the protobuf flags."""
    with trio.fail_after(JOB_LIMIT):
        async with open_local_backend(
            data_dir=tmp_path / "data", models=[TINY], client_flags=PROTOBUF_FLAGS
        ) as backend:
            return await run_official(
                python, backend.base_url, backend.api_key, script=script, args=args
            )


def check_values(result: dict[str, Any]) -> None:
    """What the job must show whichever client ran it."""
    losses = result["losses"]
    assert losses[-1] < losses[0], f"loss did not fall: {losses}"
    assert result["sample_tokens"] == result["sample_tokens_again"], "same seed, other tokens"
    assert all(len(tokens) == 6 for tokens in result["sample_tokens"])
    assert all("length" in reason.lower() for reason in result["sample_stop_reasons"])
    # save_state + create_training_client_from_state_with_optimizer: the same weights.
    for a, b in zip(result["forward"], result["resumed_forward"], strict=True):
        np.testing.assert_allclose(a, b, atol=LOGPROB_ATOL)
    # compute_logprobs on the sampler agrees with the training forward pass (datum 0).
    computed = result["computed_logprobs"]
    assert computed[0] is None
    np.testing.assert_allclose(computed[1:], result["forward"][0], atol=LOGPROB_ATOL)
    prompt_logprobs = result["prompt_logprobs"]
    assert prompt_logprobs[0] is None and all(x is not None for x in prompt_logprobs[1:])
    # REST listing sees the run and its checkpoint.
    assert result["model_id"] in result["run_ids"]
    assert "weights/conformance" in result["checkpoint_ids"]
    assert result["saved_path"].endswith("/weights/conformance")


@pytest.mark.parametrize(
    ("version", "flags"),
    [(PROTOBUF_VERSION, PROTOBUF_FLAGS), (JSON_VERSION, {})],
    ids=["tinker-0.38-protobuf", "tinker-0.15-json"],
)
async def test_official_sdk_job_against_local_backend(
    tmp_path: Path,
    official_python: Callable[[str], Path],
    version: str,
    flags: dict[str, Any],
) -> None:
    python = official_python(version)
    with trio.fail_after(JOB_LIMIT):
        async with open_local_backend(
            data_dir=tmp_path / "data", models=[TINY], client_flags=flags
        ) as backend:
            result = await run_official(python, backend.base_url, backend.api_key)
    assert result["version"] == version
    check_values(result)


async def test_parity_with_the_official_sdk(
    tmp_path: Path, official_python: Callable[[str], Path]
) -> None:
    """Same job, same server flags: our SDK (JSON and protobuf) and tinker 0.38 agree."""
    python = official_python(PROTOBUF_VERSION)
    with trio.fail_after(JOB_LIMIT):
        async with open_local_backend(
            data_dir=tmp_path / "data", models=[TINY], client_flags=PROTOBUF_FLAGS
        ) as backend:
            official = await run_official(python, backend.base_url, backend.api_key)
            ours_json = await run_job(backend.base_url, backend.api_key, TINY)
            ours_proto = await run_job(
                backend.base_url, backend.api_key, TINY, wire_format="protobuf"
            )
    for ours in (ours_json, ours_proto):
        check_values({**ours, "sample_stop_reasons": ours["sample_stop_reasons"]})
        np.testing.assert_allclose(ours["losses"], official["losses"], rtol=1e-5)
        assert ours["sample_tokens"] == official["sample_tokens"]
        for a, b in zip(ours["forward"], official["forward"], strict=True):
            np.testing.assert_allclose(a, b, atol=LOGPROB_ATOL)
        np.testing.assert_allclose(
            ours["computed_logprobs"][1:], official["computed_logprobs"][1:], atol=LOGPROB_ATOL
        )
        np.testing.assert_allclose(
            ours["prompt_logprobs"][1:], official["prompt_logprobs"][1:], atol=LOGPROB_ATOL
        )


QWEN3_NAME = "tinkex-test/Qwen3-tiny-random"
GOLDEN_TEXTS = ("Hello, world!", "The year 2024 had 365 days.", "<|im_start|>user\nHi<|im_end|>\n")


async def test_official_sdk_job_against_a_qwen3_directory(
    tmp_path: Path, official_python: Callable[[str], Path]
) -> None:
    """0.38 runs the whole job on a user's Qwen3-architecture directory (q/k norms, tied
    embeddings, SmolLM2's tokenizer), then loads its tokenizer with `get_tokenizer()` offline
    from the hub cache that `hf-cache` wrote."""
    python = official_python(PROTOBUF_VERSION)
    directory = write_family_dir(tmp_path / "qwen3", "qwen3", tied=True)
    hf_home = tmp_path / "hf-home"
    write_hf_cache([LocatedModel(QWEN3_NAME, directory)], hf_home=hf_home, builtins=())
    engine = TorchEngine(models=[], extra_models={QWEN3_NAME: directory})
    offline = {"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    with trio.fail_after(JOB_LIMIT):
        async with open_local_backend(
            data_dir=tmp_path / "data", engine=engine, client_flags=PROTOBUF_FLAGS
        ) as backend:
            result = await run_official(python, backend.base_url, backend.api_key, QWEN3_NAME)
            tokenizer = await run_official(
                python,
                backend.base_url,
                backend.api_key,
                QWEN3_NAME,
                script=SCRIPT.with_name("official_tokenizer.py"),
                args=GOLDEN_TEXTS,
                env_extra=offline,
            )
    assert result["version"] == PROTOBUF_VERSION
    check_values(result)
    ours = get_tokenizer(directory)
    assert tokenizer["ids"] == [ours.encode(text) for text in GOLDEN_TEXTS]
    assert tokenizer["ids"][0] == [19556, 28, 905, 17]
    assert tokenizer["eos_token"] == "<|im_end|>"
    assert tokenizer["has_chat_template"] is True


if sys.platform == "win32":  # pragma: no cover - venv layout differs (Scripts/python.exe)
    pytest.skip("the conformance venvs assume a POSIX layout", allow_module_level=True)


async def test_our_protobuf_request_decodes_with_the_official_classes(
    tmp_path: Path, official_python: Callable[[str], Path]
) -> None:
    """Byte level: our protobuf forward_backward body, read by tinker 0.38's generated
    classes, carries exactly what our JSON form (Appendix A.1) carries."""
    import msgspec

    from tinkex_trio import _protobuf, types as t
    from tinkex_trio._fwdbwd import FwdBwdChunk, encode_json

    rng = np.random.default_rng(3)
    data = []
    for n in (4, 9, 1):
        tokens = rng.integers(0, 150_000, size=n + 1)
        data.append(
            t.Datum(
                model_input=t.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs": rng.normal(size=n).astype(np.float32),
                    "advantages": rng.normal(size=n).astype(np.float32),
                },
            )
        )
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.25}
    body = _protobuf.encode_forward_backward_request(
        model_id="s:train:0",
        seq_id=7,
        data=data,
        loss_fn="ppo",
        loss_fn_config=config,
        forward_only=False,
    )
    path = tmp_path / "body.pb"
    path.write_bytes(body)
    done = await trio.run_process(
        [
            str(official_python(PROTOBUF_VERSION)),
            str(SCRIPT.with_name("decode_with_official.py")),
            str(path),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    official = json.loads(done.stdout)

    _, json_body = encode_json(FwdBwdChunk("s:train:0", 7, data, "ppo", config, False))
    ours = msgspec.json.decode(json_body)
    fb_input = ours["forward_backward_input"]
    assert official["model_id"] == ours["model_id"] and official["seq_id"] == ours["seq_id"]
    assert official["forward_only"] is False and official["loss_fn"] == fb_input["loss_fn"]
    assert official["loss_fn_config"] == fb_input["loss_fn_config"] == config
    assert official["loss_fn_config_v2"] == config
    assert official["data"] == fb_input["data"]


async def test_official_sdk_job_with_jwt_auth(
    tmp_path: Path, official_python: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """0.38 in JWT-exchange mode (PROTOCOL.md 1.3): it trades the key at auth/token first."""
    from tinkex_trio.local._jwt import JwtIssuer

    verified: list[bool] = []
    real_verify = JwtIssuer.verify

    def counting_verify(self: JwtIssuer, token: str) -> dict[str, Any] | None:
        claims = real_verify(self, token)
        verified.append(claims is not None)
        return claims

    monkeypatch.setattr(JwtIssuer, "verify", counting_verify)
    python = official_python(PROTOBUF_VERSION)
    with trio.fail_after(JOB_LIMIT):
        async with open_local_backend(
            data_dir=tmp_path / "data", models=[TINY], client_flags=PROTOBUF_FLAGS, jwt_auth=True
        ) as backend:
            result = await run_official(python, backend.base_url, backend.api_key)
    assert result["version"] == PROTOBUF_VERSION
    check_values(result)
    # Its requests after the exchange carried valid JWTs, not the raw key.
    assert len(verified) > 10 and all(verified)


RL_SCRIPT = Path(__file__).with_name("official_rl_client.py")


async def test_official_sdk_rl_losses_on_sampled_sequences(
    tmp_path: Path, official_python: Callable[[str], Path]
) -> None:
    """tinker 0.38: gspo and stable_reinforce through `forward_backward` on real samples, the
    latter with provenance from a `record_stability_info` sampler; losses checked by value
    against the numpy references, from the learner log-probs the server returned and the
    sampler log-probs the client received; a span naming an unknown sequence is refused."""
    from rl_reference import gspo_reference, policy_gradient_reference, stable_reinforce_reference

    python = official_python(PROTOBUF_VERSION)
    result = await run_official_on_tiny_backend(tmp_path, python, RL_SCRIPT)
    assert result["version"] == PROTOBUF_VERSION
    ids = result["sequence_ids"]
    assert len(set(ids)) == 4 and all(ids)
    stable_total = gspo_total = 0.0
    ratios = []
    for k, x in enumerate(result["inputs"]):
        adv = np.array(x["advantages"])
        n_prompt = adv.size - len(result["sampled_tokens"][k])
        # The sampler's log-probs of the sampled tokens, as the client received them (and as
        # the server recorded them); prompt positions have none.
        recorded = np.concatenate([np.full(n_prompt, np.nan), result["sampled_logprobs"][k]])
        lp = np.array(result["stable_logprobs"][k])
        ratios.extend(np.exp(lp[n_prompt:] - recorded[n_prompt:]).tolist())
        stable_total += stable_reinforce_reference(lp, recorded, adv, 1.5, 0.1)[0]
        lp_gspo = np.array(result["gspo_logprobs"][k])
        np.testing.assert_allclose(lp_gspo, lp, atol=LOGPROB_ATOL)  # same weights, same pass
        gspo_total += gspo_reference(
            lp_gspo,
            np.array(x["logprobs"]),
            adv,
            np.array(x["mask"]),
            0.8,
            1.2,
        )[0]
    # Off-policy (the learner took a step after sampling): ratios away from 1, some truncated.
    assert max(ratios) > 1.5 and min(ratios) < 0.9, ratios
    assert result["stable_loss"] == pytest.approx(stable_total, rel=1e-4, abs=1e-4)
    assert result["gspo_loss"] == pytest.approx(gspo_total, rel=1e-4, abs=1e-4)
    # Every other RL LossFnType on the same sequences, against its numpy formula.
    assert set(result["others"]) == {"importance_sampling", "ppo", "cispo", "dro"}
    for loss_fn, out in result["others"].items():
        expected = sum(
            policy_gradient_reference(
                loss_fn,
                np.array(out["logprobs"][k]),
                np.array(x["logprobs"]),
                np.array(x["advantages"]),
                out["config"],
            )
            for k, x in enumerate(result["inputs"])
        )
        assert out["loss"] == pytest.approx(expected, rel=1e-4, abs=1e-4), loss_fn
    refusal = result["refusal"]
    assert refusal["raised"] == "BadRequestError", refusal
    assert "data[0].model_input_spans[0]" in refusal["message"]
    assert "'no-such-sequence'" in refusal["message"]


async def test_official_sdk_server_side_custom_loss_matches_client_side(
    tmp_path: Path, official_python: Callable[[str], Path]
) -> None:
    """tinker 0.38's `create_custom_loss` + `forward_backward_custom` (PROTOCOL.md 8.8, 9.8):
    with `custom_loss_server_side` the graph is uploaded and run by the local backend; without
    it the SDK runs the same loss client-side. Loss, metrics, logprobs and the weights after
    one step agree within 1e-5."""
    import sysconfig

    python = official_python(PROTOBUF_VERSION)
    script = SCRIPT.with_name("official_custom_loss.py")
    env = {"OURS_SITE_PACKAGES": sysconfig.get_paths()["purelib"]}
    runs: dict[bool, dict[str, Any]] = {}
    with trio.fail_after(2 * JOB_LIMIT):
        for server_side in (True, False):
            flags = {**PROTOBUF_FLAGS, "custom_loss_server_side": server_side}
            async with open_local_backend(
                data_dir=tmp_path / f"data-{server_side}", models=[TINY], client_flags=flags
            ) as backend:
                runs[server_side] = await run_official(
                    python, backend.base_url, backend.api_key, script=script, env_extra=env
                )
    server, client = runs[True], runs[False]
    # The loss_id comes from the backend's create_custom_loss future only.
    assert server["loss_id"] is not None and server["loss_id"].endswith(":loss:0")
    assert client["loss_id"] is None
    # The client-side path renames the server's surrogate loss; the rest must agree.
    assert set(client["metrics"]) - set(server["metrics"]) == {"surrogate_loss:sum"}
    for key, value in server["metrics"].items():
        np.testing.assert_allclose(value, client["metrics"][key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert 0 < server["metrics"]["custom/clip_fraction:mean"] < 1  # both clip branches ran
    for key in ("logprobs", "after"):
        for a, b in zip(server[key], client[key], strict=True):
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=key)
    before = np.concatenate(server["logprobs"])
    assert not np.allclose(before, np.concatenate(server["after"]), atol=1e-4)


async def test_our_protobuf_body_is_byte_identical_to_the_official_sdks(
    tmp_path: Path, official_python: Callable[[str], Path]
) -> None:
    """The same data, built by a user from Python lists (and, on our side, from numpy arrays
    too), gives the very same protobuf forward_backward body from both SDKs: our conversions
    (lists checked by msgspec, buffers converted once) change speed, not bytes. Compared with
    the official body serialized deterministically, since the official SDK's own bytes order
    map entries by a per-process hash seed (see encode_with_official.py)."""
    from tinkex_trio import _protobuf, types as t

    _pb = _protobuf._pb
    rng = np.random.default_rng(11)
    spec_data = []
    for n in (5, 300, 1):
        tokens = rng.integers(0, 150_000, size=n + 1)
        spec_data.append(
            {
                "tokens": tokens[:-1].tolist(),
                "loss_fn_inputs": {
                    "target_tokens": tokens[1:].tolist(),
                    "weights": rng.random(n).tolist(),  # float64 values: rounded to float32
                    "advantages": rng.normal(size=n).tolist(),
                },
            }
        )
    config = {"clip_low_threshold": 0.8, "clip_high_threshold": 1.25}
    spec = {
        "model_id": "s:train:0",
        "seq_id": 12,
        "loss_fn": "ppo",
        "loss_fn_config": config,
        "forward_only": False,
        "data": spec_data,
    }
    spec_path, out_path = tmp_path / "spec.json", tmp_path / "official.pb"
    spec_path.write_text(json.dumps(spec))
    done = await trio.run_process(
        [
            str(official_python(PROTOBUF_VERSION)),
            str(SCRIPT.with_name("encode_with_official.py")),
            str(spec_path),
            str(out_path),
        ],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    official = out_path.with_name("official.pb.det").read_bytes()
    as_sent = _pb.ForwardBackwardRequest.FromString(out_path.read_bytes())

    def ours(from_numpy: bool) -> bytes:
        data = []
        for datum in spec_data:
            inputs = datum["loss_fn_inputs"]
            if from_numpy:
                data.append(
                    t.Datum(
                        model_input=t.ModelInput.from_ints(np.asarray(datum["tokens"])),
                        loss_fn_inputs={
                            "target_tokens": np.asarray(inputs["target_tokens"]),
                            "weights": np.asarray(inputs["weights"], dtype=np.float32),
                            "advantages": np.asarray(inputs["advantages"], dtype=np.float32),
                        },
                    )
                )
            else:
                data.append(
                    t.Datum(
                        model_input=t.ModelInput.from_ints(datum["tokens"]),
                        loss_fn_inputs=dict(inputs),
                    )
                )
        return _protobuf.encode_forward_backward_request(
            model_id="s:train:0",
            seq_id=12,
            data=data,
            loss_fn="ppo",
            loss_fn_config=config,
            forward_only=False,
        )

    assert len(official) > 3000
    assert ours(from_numpy=False) == official
    assert ours(from_numpy=True) == official
    # What the official SDK actually sent (its map order is per-process) is the same message.
    assert _pb.ForwardBackwardRequest.FromString(ours(from_numpy=False)) == as_sent


def _read_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


async def test_official_sdk_encrypted_weight_export(
    tmp_path: Path, official_python: Callable[[str], Path]
) -> None:
    """0.38 exports with `age_encryption_recipients` (X25519 and SSH) and downloads with its
    CLI through the signed URLs; pyrage decrypts every `<file>.age` to the exact bytes of the
    unencrypted export of the same weights (PROTOCOL.md 3.2, 9.10)."""
    import pyrage
    from age_keys import ssh_keypair

    python = official_python(PROTOBUF_VERSION)
    x25519 = pyrage.x25519.Identity.generate()
    ssh_key, ssh_pub = ssh_keypair(tmp_path, "ed25519")
    out = tmp_path / "downloads"
    result = await run_official_on_tiny_backend(
        tmp_path,
        python,
        SCRIPT.with_name("official_age_export.py"),
        (str(out), str(x25519.to_public()), ssh_pub),
    )
    plain = _read_files(Path(result["directories"][result["plain"]]))
    secret = _read_files(Path(result["directories"][result["secret"]]))
    assert "adapter_model.safetensors" in plain and "adapter_config.json" in plain
    assert sorted(secret) == sorted(name + ".age" for name in plain)
    ssh_identity = pyrage.ssh.Identity.from_buffer(ssh_key.read_bytes())
    for name, content in plain.items():
        for identity in (x25519, ssh_identity):
            assert pyrage.decrypt(secret[name + ".age"], [identity]) == content, name
    # The trained adapter really is in there (B matrices moved off zero).
    assert len(set(plain["adapter_model.safetensors"][-256:])) > 1


async def test_official_sdk_parses_session_search_and_admin_calls(
    tmp_path: Path, official_python: Callable[[str], Path]
) -> None:
    """0.38's `search_sessions` and `AdminClient` calls, each answer validated strictly by its
    official type: every required field present and typed (a session's `project_id` is the
    default project), and the contents true to what happened (PROTOCOL.md 3.6, 7.9)."""
    python = official_python(PROTOBUF_VERSION)
    result = await run_official_on_tiny_backend(
        tmp_path, python, SCRIPT.with_name("official_admin.py")
    )
    [session] = result["sessions"]
    assert session["project_id"] == "local-default"
    assert session["owner"] == "tml:user:local"
    assert session["status"] == "active"
    assert session["checkpoints_count"] == 1
    kept, gone = result["kept"], result["gone"]
    assert [event for event in result["audit"] if event[0].startswith("checkpoint_")] == [
        ["checkpoint_create", kept],
        ["checkpoint_create", gone],
        ["checkpoint_delete", gone],
    ]
    assert result["audit"][0][0] == "session_create"
    assert result["checkpoint_audit"] == ["checkpoint_create"] * 2 + ["checkpoint_delete"]
    counts = [e for e in result["usage"] if e["type"] == "checkpoint"]
    assert sum(e["count"] for e in counts) == 2 and all(e["cost"] is None for e in counts)
    storage_events = [e for e in result["usage"] if e["type"] == "storage"]
    assert storage_events and all(e["free"] and e["cost"] == 0.0 for e in storage_events)
    [storage] = result["storage"]
    assert storage["project_id"] == "local-default" and storage["checkpoint_count"] == 1
    assert storage["size_bytes"] > 0 and storage["cost"] == 0.0
