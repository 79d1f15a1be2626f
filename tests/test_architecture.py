"""Data flows one way: checkpoint -> export -> runtime. The runtime never imports training code, nothing in the
library imports the CLI, ``import deepspot`` needs neither onnxruntime nor TensorRT, no module imports another that
imports it back (imports inside functions included), and the runtime runs ONNX models without PyTorch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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
        ("deepspot", ["deepspot.train", "deepspot.cli", "onnxruntime", "tensorrt", "deepspot.export", "torch"]),
        ("deepspot.export", ["deepspot.train", "deepspot.cli", "deepspot.runtime", "onnxruntime", "torch"]),
        ("deepspot.runtime", ["deepspot.train", "deepspot.cli", "deepspot.quickstart", "onnxruntime", "tensorrt",
                              "torch", "deepspot.checkpoint", "deepspot.importer"]),
        # The typer app loads fast: the heavy packages come with the command that needs them.
        ("deepspot.cli", ["torch", "onnx", "onnxruntime", "tritonclient", "numpy", "deepspot.runtime"]),
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
import importlib.metadata
import sys
sys.modules["onnxruntime"] = None  # as if neither onnxruntime nor onnxruntime-gpu were installed: no module,
_distributions = importlib.metadata.distributions  # and no distribution (else it is a broken install, said so)
importlib.metadata.distributions = lambda **kw: (
    [] if kw.get("name") in ("onnxruntime", "onnxruntime-gpu") else _distributions(**kw))
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


# -- the import graph, read from the source (function-level imports included) ---------------------------------------
PACKAGE = Path(__file__).resolve().parents[1] / "deepspot"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, module_level_only: bool = False) -> set[str]:
    """The deepspot modules that module ``name`` imports (``from .x import y`` counts as ``x.y`` where that is a
    module, else as ``x``)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            candidates = submodules or [target]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c in MODULES and c != name)
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_checker_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert "deepspot.runtime.torch_runner" in _imports("deepspot.runtime.backends")  # imported inside a function
    assert "deepspot.runtime.torch_runner" not in _imports("deepspot.runtime.backends", module_level_only=True)


def test_no_import_cycles_even_through_function_level_imports():
    graph = {name: _imports(name) for name in MODULES}
    assert _cycles(graph) == []


TRAINING_IMPORT_CHECKPOINT = ("deepspot.train", "deepspot.importer", "deepspot.checkpoint", "deepspot.reference",
                              "deepspot.assemble", "deepspot.quickstart", "deepspot.cli")  # fmt: skip


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("deepspot.runtime")))
def test_runtime_imports_no_training_import_or_checkpoint_code_at_module_level(name):
    bad = sorted(m for m in _imports(name, module_level_only=True) if m.startswith(TRAINING_IMPORT_CHECKPOINT))
    assert bad == [], f"{name} imports {bad} at module level"


WITHOUT_TORCH = """
import importlib, sys
sys.modules["torch"] = None  # as on a serving install: `import torch` raises ImportError
for name in sys.argv[2].split(","):
    importlib.import_module(name)
import numpy as np
from deepspot.runtime import load_runner
with load_runner(sys.argv[1], "ort-cpu") as runner:
    out = runner.infer({"spot": np.ones((3, 1, 8), np.float32), "subspot": np.ones((3, 2, 8), np.float32),
                        "neighbors": np.ones((3, 4, 8), np.float32)})["expression"]
print(out.shape, bool(np.isfinite(out).all()))
"""
TORCH_FREE = sorted(
    [n for n in MODULES if n.startswith("deepspot.runtime") and n != "deepspot.runtime.torch_runner"]
    + ["deepspot", "deepspot.cli", "deepspot.export", "deepspot.export.info", "deepspot.export.metadata",
       "deepspot.export.triton", "deepspot.data", "deepspot.scaler", "deepspot.anndata_io"]
)  # fmt: skip


def test_runtime_imports_and_runs_an_onnx_model_without_torch():
    onnx = Path(__file__).resolve().parent / "data" / "spot.onnx"
    out = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, str(onnx), ",".join(TORCH_FREE)], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "(3, 5) True"
