"""Checks of a Hugging Face model directory before it is served: refuse what we would ignore.

The engine implements one computation: a Llama decoder (RMSNorm, rotate-half RoPE with a
single `rope_theta`, grouped-query attention without biases, a SiLU-gated MLP without biases,
tied or untied unembedding). A `config.json` field that asks for anything else (q/k/v biases,
q/k norms, RoPE scaling, sliding windows, another activation), or a weight tensor the forward
pass would not read, would make the served log-probs silently differ from the model's. So
every config key is either understood, known to be metadata, or pinned to the one value the
engine implements, and every tensor in the weights file must be one the engine uses. Anything
else is refused at start-up with one line that names the file, the field and what to do.

Only the safetensors header is read here (names and shapes), so checking a multi-GB model
costs milliseconds and no memory.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Final

from .._engine_api import ModelDirectoryError

CONFIG_FILE: Final = "config.json"
WEIGHTS_FILE: Final = "model.safetensors"
TOKENIZER_FILE: Final = "tokenizer.json"

SUPPORTED_MODEL_TYPES: Final = ("llama",)
SUPPORTED_ARCHITECTURES: Final = ("LlamaForCausalLM",)

# Keys the engine reads (LlamaConfig.from_hf).
UNDERSTOOD_KEYS: Final = frozenset(
    {
        "model_type",
        "architectures",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rope_theta",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
        "eos_token_id",
    }
)

# Keys that do not change the forward pass: provenance, storage dtype (weights are upcast to
# float32), generation/cache hints, initialisation, special-token ids the tokenizer owns.
METADATA_KEYS: Final = frozenset(
    {
        "_name_or_path",
        "transformers_version",
        "torch_dtype",
        "dtype",
        "use_cache",
        "initializer_range",
        "bos_token_id",
        "pad_token_id",
        "is_llama_config",
        "transformers.js_config",
        "pretraining_tp",  # a tensor-parallel slicing of the same matmuls in transformers
        "tokenizer_class",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "_attn_implementation_autoset",
    }
)

# Keys the engine accepts only at the value it implements (None also means "absent").
PINNED_VALUES: Final[Mapping[str, tuple[object, ...]]] = {
    "hidden_act": ("silu",),
    "rope_scaling": (None,),
    "attention_bias": (False, None),
    "mlp_bias": (False, None),
    "attention_dropout": (0, 0.0, None),
    "rope_interleaved": (False, None),
    "use_sliding_window": (False, None),
}


def _refuse(path: Path, message: str) -> ModelDirectoryError:
    return ModelDirectoryError(f"{path}: {message}")


def read_config(directory: Path) -> dict[str, object]:
    """`config.json` of `directory`, checked; raises ModelDirectoryError naming file and fix."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise _refuse(
            path,
            "missing; a model directory needs config.json, model.safetensors and "
            "tokenizer.json (as written by save_pretrained)",
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise _refuse(path, f"not readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise _refuse(path, "must hold a JSON object")
    check_config(raw, path)
    return raw


def check_config(config: Mapping[str, object], path: Path) -> None:
    """Refuse a config that asks for computation the engine does not implement."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise _refuse(
            path,
            f"model_type {model_type!r} is not supported by the local engine; it serves "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} models ({', '.join(SUPPORTED_ARCHITECTURES)})",
        )
    architectures = config.get("architectures")
    if architectures is not None and (
        not isinstance(architectures, list)
        or not architectures
        or any(a not in SUPPORTED_ARCHITECTURES for a in architectures)
    ):
        raise _refuse(
            path,
            f"architectures {architectures!r} is not supported by the local engine; it "
            f"serves {', '.join(SUPPORTED_ARCHITECTURES)}",
        )
    for key, allowed in PINNED_VALUES.items():
        if key not in config:
            continue  # absent: the transformers default, which is the implemented value
        value = config[key]
        if not any(value == ok and type(value) is type(ok) for ok in allowed):
            raise _refuse(
                path,
                f"{key} = {value!r} is not implemented by the local engine (it implements "
                f"{' or '.join(repr(v) for v in allowed if v is not None)}); serving this "
                "model would give wrong log-probs, so it is refused",
            )
    unknown = sorted(set(config) - UNDERSTOOD_KEYS - METADATA_KEYS - set(PINNED_VALUES))
    if unknown:
        raise _refuse(
            path,
            f"unknown config field(s) {unknown}: the local engine does not know what they "
            "change, so it refuses the model rather than ignore them",
        )


def read_safetensors_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's JSON header (the data is not read)."""
    try:
        with path.open("rb") as stream:
            (length,) = struct.unpack("<Q", stream.read(8))
            if length > 100 * 1024 * 1024:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(stream.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise _refuse(path, f"not a readable safetensors file ({exc})") from None
    shapes: dict[str, tuple[int, ...]] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shapes[name] = tuple(int(n) for n in entry["shape"])
    return shapes


def check_weights(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    expected: Mapping[str, tuple[int, ...]],
    *,
    ignorable: frozenset[str] = frozenset(),
) -> None:
    """Every tensor the engine needs is present with its shape, and nothing else is.

    `ignorable` names tensors that transformers itself ignores (a tied model's saved
    `lm_head.weight` is replaced by the embedding), so ignoring them changes nothing.
    """
    missing = sorted(set(expected) - set(shapes))
    if missing:
        raise _refuse(
            path,
            f"lacks tensor(s) {missing[:4]}{' ...' if len(missing) > 4 else ''} that config.json "
            "implies; is the directory complete and does config.json belong to these weights?",
        )
    unused = sorted(set(shapes) - set(expected) - ignorable)
    if unused:
        raise _refuse(
            path,
            f"holds tensor(s) the local engine would ignore: {unused[:4]}"
            f"{' ...' if len(unused) > 4 else ''}; such a model needs computation the engine "
            "does not implement (biases, extra norms), so it is refused",
        )
    for name, shape in expected.items():
        if tuple(shapes[name]) != tuple(shape):
            raise _refuse(
                path,
                f"tensor {name} has shape {list(shapes[name])} but config.json implies "
                f"{list(shape)}; does config.json belong to these weights?",
            )


def check_tokenizer(directory: Path) -> Path:
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        raise _refuse(
            path,
            "missing; the local backend needs the fast tokenizer file (save it with "
            "`AutoTokenizer.from_pretrained(...).save_pretrained(dir)`)",
        )
    return path
