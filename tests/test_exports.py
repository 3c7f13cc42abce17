"""The public surface: every exported name exists (ruff keeps `__all__` sorted), classes are closed."""

from __future__ import annotations

import inspect

import pytest

import tinkex_trio
from tinkex_trio import types


@pytest.mark.parametrize("module", [tinkex_trio, types])
def test_all_names_exist_and_are_unique(module: object) -> None:
    names = module.__all__  # type: ignore[attr-defined]
    assert len(names) == len(set(names))
    for name in names:
        assert hasattr(module, name), name


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


def test_every_error_derives_from_tinkex_error() -> None:
    errors = [
        obj
        for name in tinkex_trio.__all__
        if inspect.isclass(obj := getattr(tinkex_trio, name)) and issubclass(obj, Exception)
    ]
    assert len(errors) > 15
    assert all(issubclass(e, tinkex_trio.TinkexError) for e in errors)
