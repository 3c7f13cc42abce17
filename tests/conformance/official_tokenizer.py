"""The official SDK's `get_tokenizer()` for a model the local backend serves, offline.

Run with the python of the tinker 0.38 venv, with HF_HOME pointing at a hub cache written by
`tinkex-trio hf-cache` and HF_HUB_OFFLINE=1: `python official_tokenizer.py BASE_URL API_KEY
MODEL TEXT...`. Prints one JSON object: the tokenizer's ids for each TEXT and its special
tokens. (Its chat template is not rendered here: the official SDK's venv has no jinja2; the
hf-cache tests render it with transformers.)
"""

from __future__ import annotations

import json
import sys

import tinker


def main() -> None:
    base_url, api_key, model, *texts = sys.argv[1:]
    service = tinker.ServiceClient(base_url=base_url, api_key=api_key)
    training = service.create_lora_training_client(base_model=model, rank=4)
    if callable(getattr(type(training), "result", None)):
        training = training.result()
    tokenizer = training.get_tokenizer()
    print(
        json.dumps(
            {
                "ids": [tokenizer.encode(text, add_special_tokens=False) for text in texts],
                "eos_token": tokenizer.eos_token,
                "has_chat_template": bool(tokenizer.chat_template),
            }
        )
    )
    service.close("success")


if __name__ == "__main__":
    main()
