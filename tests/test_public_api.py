"""Every public name is importable from `moai_sdk`, lazily."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moai_sdk


@pytest.mark.parametrize("name", [n for n in moai_sdk.__all__ if n != "__version__"])
def test_public_name_resolves(name):
    assert getattr(moai_sdk, name) is not None


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute"):
        moai_sdk.NotAThing  # noqa: B018


def test_import_is_light_and_errors_are_typed():
    code = "import sys, moai_sdk; print('transformers' in sys.modules, issubclass(moai_sdk.InputError, ValueError))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]


def test_public_names_are_not_shadowed_by_submodules():
    """Importing every submodule must not replace a public function or class with a module object."""
    code = (
        "import importlib, pkgutil, types, moai_sdk\n"
        "for m in pkgutil.walk_packages(moai_sdk.__path__, 'moai_sdk.'):\n"
        "    importlib.import_module(m.name)\n"
        "bad = [n for n in moai_sdk.__all__ if isinstance(getattr(moai_sdk, n), types.ModuleType)]\n"
        "print(bad)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
