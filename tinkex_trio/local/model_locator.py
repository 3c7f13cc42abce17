"""Which directory a `--model [NAME=]PATH` argument means, and the name it is served under.

`PATH` is a Hugging Face model directory, or an `org/name` repository id looked up offline in
the Hugging Face hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
`~/.cache/huggingface/hub`; the snapshot `refs/main` names). Nothing is ever downloaded.

The served base-model name (what `get_server_capabilities` lists, `get_info` reports and the
tokenizer id follows) is, in order: the `NAME=` prefix, `--model-name` (for a single model),
the repository id a hub-cache lookup used, or the config's `_name_or_path` when that is a
repository id (`org/name`) rather than a filesystem path. A model that none of these names
is refused with the fix, since serving it as an arbitrary path would leak into checkpoint
metadata and tokenizer lookups.

No torch here: the CLI resolves arguments before the engine is imported.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from tinkex_trio.tokenizer import find_in_hub_cache, hf_hub_cache_dir

from ._engine_api import ModelDirectoryError

CONFIG_FILE: Final = "config.json"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


@dataclass(frozen=True)
class ModelArgument:
    """One `--model [NAME=]PATH` as typed: the optional name and the path or repository id."""

    name: str | None
    location: str

    @classmethod
    def parse(cls, value: str) -> ModelArgument:
        """`NAME=PATH` or `PATH` (argparse type); raises ValueError naming the form."""
        name, sep, location = value.partition("=")
        if not sep:
            name, location = "", value
        elif not name:
            raise ValueError(f"--model expects [NAME=]PATH, got {value!r} (empty NAME)")
        if not location:
            raise ValueError(f"--model expects [NAME=]PATH, got {value!r} (empty PATH)")
        if name and (name != name.strip() or any(c.isspace() for c in name)):
            raise ValueError(f"--model NAME must not contain whitespace, got {name!r}")
        return cls(name or None, location)


@dataclass(frozen=True)
class LocatedModel:
    """A model directory and the base-model name it is served under."""

    name: str
    directory: Path


def is_repo_id(value: str) -> bool:
    """True for `org/name` (the Hugging Face repository id form), False for other paths."""
    return bool(_REPO_ID.match(value)) and ".." not in value


def locate_model(argument: ModelArgument, model_name: str | None = None) -> LocatedModel:
    """The directory and served name of one `--model` argument.

    Raises:
        ModelDirectoryError: not a directory and not in the hub cache, or no name to serve it
            under; one line naming what was tried and the fix.
    """
    path = Path(argument.location).expanduser()
    repo_id: str | None = None
    if path.is_dir():
        directory = path
    elif is_repo_id(argument.location):
        hub = hf_hub_cache_dir()
        found = find_in_hub_cache(hub, argument.location, CONFIG_FILE)
        if found is None:
            raise ModelDirectoryError(
                f"{argument.location}: not a directory, and not in the Hugging Face hub cache "
                f"({hub}); nothing is downloaded: fetch it first (e.g. `hf download "
                f"{argument.location}`) or pass the model's directory"
            )
        directory = found.parent
        repo_id = argument.location
    else:
        raise ModelDirectoryError(
            f"{path}: not a directory; --model takes a Hugging Face model directory or an "
            "org/name repository id from the hub cache"
        )
    name = argument.name or model_name or repo_id or _name_from_config(directory)
    if name is None:
        raise ModelDirectoryError(
            f"{directory / CONFIG_FILE}: no repository id in _name_or_path to serve the model "
            "under; name it: --model NAME=PATH or --model-name NAME"
        )
    return LocatedModel(name, directory)


def locate_models(
    arguments: Sequence[ModelArgument], model_name: str | None = None
) -> list[LocatedModel]:
    """Every `--model` argument located; `model_name` names the single one given.

    Raises:
        ModelDirectoryError: as `locate_model`, or two models under one name.
        ValueError: `model_name` with other than exactly one `--model` (a usage error).
    """
    if model_name is not None and len(arguments) != 1:
        raise ValueError(
            f"--model-name names the one --model given, but there are {len(arguments)}; "
            "name each model with --model NAME=PATH instead"
        )
    located = [locate_model(argument, model_name) for argument in arguments]
    seen: dict[str, Path] = {}
    for model in located:
        if model.name in seen:
            raise ModelDirectoryError(
                f"{model.directory}: served as {model.name!r}, like {seen[model.name]}; give "
                "each model its own name (--model NAME=PATH)"
            )
        seen[model.name] = model.directory
    return located


def _name_from_config(directory: Path) -> str | None:
    try:
        config = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # the engine's checks report an unreadable config with the fix
    name = config.get("_name_or_path") if isinstance(config, dict) else None
    if isinstance(name, str) and is_repo_id(name) and not Path(name).expanduser().exists():
        return name
    return None


# --- command-line arguments shared by `serve` and `hf-cache` ---------------------------------


def _model_argument(value: str) -> ModelArgument:
    try:
        return ModelArgument.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """`--model [NAME=]PATH` (repeatable) and `--model-name NAME`."""
    parser.add_argument(
        "--model",
        action="append",
        default=[],
        type=_model_argument,
        metavar="[NAME=]PATH",
        help="also serve a Hugging Face model directory, or an org/name from the hub cache "
        "(offline); NAME defaults to --model-name, the repo id or config.json's _name_or_path "
        "(repeatable)",
    )
    parser.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="the base-model name to serve the one --model under",
    )
