"""The public names a Python user imports: every name in a package's ``__all__`` resolves, and the package says it
is typed."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

import deepspot


@pytest.mark.parametrize("package", ["deepspot", "deepspot.export", "deepspot.runtime"])
def test_every_public_name_resolves(package):
    # `from deepspot.export import write_triton_repository` looked in deepspot.export.validate (AttributeError).
    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, name
    assert len(set(module.__all__)) == len(module.__all__)


def test_the_package_ships_py_typed():
    root = Path(deepspot.__file__).parent
    assert (root / "py.typed").is_file()
    pyproject = (root.parent / "pyproject.toml").read_text()  # as text: tomllib needs Python 3.11
    assert '\ndeepspot = ["py.typed"]\n' in pyproject.split("[tool.setuptools.package-data]")[1]
