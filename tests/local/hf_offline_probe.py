"""Load models by name from the hub cache with transformers, offline (run as a subprocess).

`python hf_offline_probe.py OUT.npz NAME...` with HF_HOME and HF_HUB_OFFLINE=1 set: the
environment must be set before huggingface_hub is imported, hence a separate process. For
each NAME it saves the AutoTokenizer ids of the golden strings, the chat template rendering
and the AutoModelForCausalLM logits of `TOKENS`.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

GOLDEN = [
    "Hello, world!",
    "The year 2024 had 365 days.",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n",
    "  indented\tcode  \n\n",
]
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
TOKENS = [[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 19556, 28, 905, 17]]


def main() -> None:
    out, *names = sys.argv[1:]
    arrays: dict[str, np.ndarray] = {}
    texts: dict[str, object] = {}
    for index, name in enumerate(names):
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
        model.eval()
        with torch.inference_mode():
            arrays[f"logits{index}"] = model(input_ids=torch.tensor(TOKENS)).logits.numpy()
        texts[name] = {
            "ids": [tokenizer.encode(text, add_special_tokens=False) for text in GOLDEN],
            "chat": tokenizer.apply_chat_template(
                MESSAGES, tokenize=False, add_generation_prompt=True
            ),
            "tied": bool(model.config.tie_word_embeddings),
            "eos_token": tokenizer.eos_token,
        }
    np.savez(out, **arrays)
    print(json.dumps(texts))


if __name__ == "__main__":
    main()
