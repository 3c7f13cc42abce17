"""Encrypted weight export through the official `tinker` 0.38 SDK and its CLI.

`python official_age_export.py BASE_URL API_KEY MODEL OUT_DIR RECIPIENT...`: trains one step,
exports the adapter twice (`plain`, then `secret` encrypted to the recipients with
`save_weights_external(..., age_encryption_recipients=...)`, as the recipe library's
`weights.download` does), and downloads both with the official CLI (`tinker checkpoint download
PATH --output OUT_DIR`), which fetches each file through its signed URL. Prints one JSON object:
the two tinker paths and the directories the CLI wrote. The test decrypts with pyrage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tinker
from tinker import types


def main() -> None:
    base_url, api_key, model, out_dir, *recipients = sys.argv[1:]
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=model, rank=4, seed=0)
    training = training.result() if hasattr(training, "result") else training
    tokens = [3, 14, 15, 92, 65, 35]
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )
    training.forward_backward([datum], "cross_entropy").result()
    training.optim_step(types.AdamParams(learning_rate=0.05)).result()
    plain = training.save_weights_external("plain").result().path
    secret = (
        training.save_weights_external("secret", age_encryption_recipients=recipients).result().path
    )

    cli = Path(sys.executable).with_name("tinker")
    env = {**os.environ, "TINKER_API_KEY": api_key, "TINKER_BASE_URL": base_url}
    directories = {}
    for path in (plain, secret):
        done = subprocess.run(
            [str(cli), "checkpoint", "download", path, "--output", out_dir],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            sys.exit(f"tinker checkpoint download {path} failed:\n{done.stdout}\n{done.stderr}")
        directories[path] = str(Path(out_dir) / path.replace("tinker://", "").replace("/", "_"))
    print(json.dumps({"plain": plain, "secret": secret, "directories": directories}))


if __name__ == "__main__":
    main()
