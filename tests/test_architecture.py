"""Data flows one way: checkpoint -> export -> runtime. The runtime never imports training code, nothing in the
library imports the CLI, and ``import deepspot`` needs neither onnxruntime nor TensorRT."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = """
import sys
import {module}
loaded = set(sys.modules)
bad = sorted(m for m in {forbidden} if m in loaded)
print(",".join(bad))
"""


@pytest.mark.parametrize(
    "module, forbidden",
    [
        ("deepspot", ["deepspot.train", "deepspot.cli", "onnxruntime", "tensorrt", "deepspot.export"]),
        ("deepspot.export", ["deepspot.train", "deepspot.cli", "deepspot.runtime", "onnxruntime"]),
        ("deepspot.runtime", ["deepspot.train", "deepspot.cli", "deepspot.quickstart", "onnxruntime", "tensorrt"]),
        ("deepspot.runtime.indexed", ["deepspot.train", "deepspot.cli"]),
    ],
)
def test_imports_flow_one_way(module, forbidden):
    out = subprocess.run(
        [sys.executable, "-c", CHECK.format(module=module, forbidden=forbidden)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"importing {module} loaded {out.stdout.strip()}"
