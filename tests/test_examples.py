"""The examples run end to end against the local backend with the tiny model, reduced in size.

Each runs as a subprocess exactly as a user would start it (plus `--model` and a size flag),
with no TINKER_* variables set, so it must pick the local backend and say so.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("hypercorn")

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
TINY = "tinkex-trio/SmolLM2-tiny-random"
TIMEOUT = 300.0


def run_example(name: str, *argv: str, data_dir: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TINKER_")}
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--model", TINY, "--data-dir", str(data_dir), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=data_dir.parent,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "backend: local tinkex_trio backend at http://127.0.0.1:" in proc.stdout
    return proc.stdout


def test_rl_loop(tmp_path: Path) -> None:
    out = run_example(
        "rl_loop.py",
        "--iterations", "2", "--prompts", "2", "--num-samples", "4",
        data_dir=tmp_path / "data",
    )  # fmt: skip
    rewards = re.findall(r"iteration (\d+): mean reward (-?\d+\.\d+) \((\d+)/(\d+) correct\)", out)
    assert [int(r[0]) for r in rewards] == [1, 2], out
    for _, mean, correct, total in rewards:
        assert -0.5 <= float(mean) <= 1.0
        assert int(total) == 8 and 0 <= int(correct) <= 8
    # The brevity term gives the random model differing rewards, so training really ran.
    assert "trained on" in out and "loss:sum" in out, out
    assert "done in" in out


def test_checkpoints(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    out_dir = tmp_path / "downloads"
    out = run_example(
        "checkpoints.py", "--steps", "2", "--output-dir", str(out_dir), data_dir=data_dir
    )
    losses = [float(x) for x in re.findall(r"step \d+: loss per token (\d+\.\d+)", out)]
    assert len(losses) == 3, out  # two steps, then one after resuming
    saved = re.search(r"saved state: (tinker://\S+/weights/step-2)", out)
    assert saved, out
    assert f"  {saved.group(1)}  training" in out  # listed by the RestClient
    assert f"published: {saved.group(1)} (public now: True)" in out
    assert "with optimizer state" in out
    # The download appeared on disk with the adapter and the optimizer state.
    [target] = list(out_dir.iterdir())
    names = {p.name for p in target.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.safetensors"} <= names
    assert f"downloaded to {target}: {len(names)} files" in out


def test_sampling_fanout(tmp_path: Path) -> None:
    out = run_example(
        "sampling_fanout.py", "--count", "48", "--max-tokens", "4", data_dir=tmp_path / "data"
    )
    m = re.search(r"samples: (\d+) in \d+\.\d+ s = (\d+\.\d+) calls/s", out)
    assert m and int(m.group(1)) == 48 and float(m.group(2)) > 0, out
    assert re.search(r"tokens: 192 = ", out), out
    assert "sampling client: completed 48, retries 0" in out
    assert "rate limiter: rate_limited_total 0" in out
    assert re.search(r"queue-state events: \d+", out)
    assert "FutureCompleted Sample ok: 48" in out
    assert "RequestFinished asample 200: 48" in out


def test_sl_quickstart(tmp_path: Path) -> None:
    out = run_example("sl_quickstart.py", "--quick", data_dir=tmp_path / "data")
    first, last = map(float, re.findall(r"first loss (\d+\.\d+) -> last loss (\d+\.\d+)", out)[0])
    assert last < first, out
    curve = re.findall(r"loss curve \(per answer token\): (.*)", out)[0].split()
    assert len(curve) == 6, out
    assert "Answers before and after fine-tuning" in out
    assert "What is the capital of Vellmora?" in out
