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


WITHOUT_ORT = """
import sys
sys.modules["onnxruntime"] = None  # as if neither onnxruntime nor onnxruntime-gpu were installed
from pathlib import Path
from deepspot import DeepSpotError, create_model
from deepspot.export import export_onnx
from deepspot.runtime import load_runner
model = create_model("cell", "cell", input_size=4, output_size=2, n_ensemble=2, phi2rho_size=3)
out = Path(sys.argv[1])
export_onnx(model, out / "m.onnx", validate=False)
assert (out / "m.onnx").is_file()
for call in (lambda: export_onnx(model, out / "v.onnx"), lambda: load_runner(out / "m.onnx", "ort-cpu")):
    try:
        call()
    except DeepSpotError as e:
        print(e)
"""


def test_onnxruntime_is_optional_and_its_absence_is_explained(tmp_path):
    # onnxruntime is an extra (`cpu` or `gpu`), so that a GPU install never ends with both packages.
    out = subprocess.run([sys.executable, "-c", WITHOUT_ORT, str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2 and all("deepspot[cpu]" in line for line in lines)
    assert not (tmp_path / "v.onnx").exists()
