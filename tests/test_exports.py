"""The public surface: `__all__` is exactly the public names, classes are closed.

"Public names" of a module are read from its source, as a type checker sees them: every name
its top level binds by `def`, `class` or assignment, and every explicit re-export
(`from m import X as X`), except those starting with `_` (`__version__` aside). Plain imports
are not public. Each public module must list exactly those in `__all__`: a new public name that
is not exported, or an export that names nothing, fails here.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import tinkex_trio

# The public modules of the SDK: every module of the package not starting with `_`, but
# `local` (the backend, its own package) and `cli` (a command, whose API is `main`; its
# helpers belong to the command-line work).
NOT_CHECKED = frozenset({"local", "cli"})
PUBLIC_MODULES = [
    f"tinkex_trio.{info.name}"
    for info in pkgutil.iter_modules(tinkex_trio.__path__)
    if not info.name.startswith("_") and info.name not in NOT_CHECKED
]


def public_names(module: ModuleType) -> set[str]:
    assert module.__file__ is not None
    tree = ast.parse(Path(module.__file__).read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update(
                alias.asname
                for alias in node.names
                if alias.asname is not None and alias.asname == alias.name.rsplit(".", 1)[-1]
            )
    return {name for name in names if not name.startswith("_") or name == "__version__"}


def test_every_public_module_is_checked() -> None:
    assert set(PUBLIC_MODULES) >= {
        "tinkex_trio.config",
        "tinkex_trio.errors",
        "tinkex_trio.futures",
        "tinkex_trio.rest",
        "tinkex_trio.sampling",
        "tinkex_trio.service",
        "tinkex_trio.training",
        "tinkex_trio.types",
    }


@pytest.mark.parametrize("name", ["tinkex_trio", *PUBLIC_MODULES])
def test_all_is_exactly_the_public_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), "__all__ lists a name twice"
    assert set(exported) == public_names(module)
    for export in exported:
        assert hasattr(module, export), export


def test_the_check_sees_a_missing_export(tmp_path: Path) -> None:
    """`public_names` reads what the module binds, not what `__all__` claims."""
    source = tmp_path / "sample_module.py"
    source.write_text(
        "from x import A as A, B\nimport y as y\nC = 1\n_D = 2\ndef e(): ...\nclass F: ...\n"
    )
    module = ModuleType("sample_module")
    module.__file__ = str(source)
    assert public_names(module) == {"A", "y", "C", "e", "F"}


@pytest.mark.parametrize(
    "cls",
    [
        tinkex_trio.APIFuture,
        tinkex_trio.ServiceClient,
        tinkex_trio.TrainingClient,
        tinkex_trio.SamplingClient,
        tinkex_trio.RestClient,
        tinkex_trio.RateLimiter,
        tinkex_trio.Config,
        tinkex_trio.Telemetry,
    ],
)
def test_public_classes_are_final(cls: type) -> None:
    assert getattr(cls, "__final__", False), f"{cls.__name__} should be @final"


@pytest.mark.parametrize("cls", [tinkex_trio.TrainingClient, tinkex_trio.SamplingClient])
def test_clients_have_no_public_constructor(cls: type) -> None:
    with pytest.raises(TypeError, match="create"):
        cls()


def test_every_error_is_exported_and_derives_from_tinkex_error() -> None:
    from tinkex_trio import errors

    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj)
        and issubclass(obj, Exception)
        and obj.__module__ == errors.__name__
        and not name.startswith("_")
    }
    exported = {
        name
        for name in tinkex_trio.__all__
        if inspect.isclass(obj := getattr(tinkex_trio, name)) and issubclass(obj, Exception)
    }
    # Every error class of the SDK is reachable from the package, and each is a TinkexError.
    assert exported == defined
    assert all(issubclass(getattr(errors, name), tinkex_trio.TinkexError) for name in defined)
