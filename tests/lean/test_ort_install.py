"""Which onnxruntime package runs: the CPU and GPU packages write the same module, and users end up with both."""

from __future__ import annotations

from pathlib import Path

import pytest

from deepspot.runtime._onnxruntime import ort_install
from deepspot.runtime.backends import Probe, unavailable_reason
from deepspot.runtime.ort import CPU, CUDA, TRT


def _site(root: Path, *packages: tuple[str, str], module: bool = True) -> str:
    """A site-packages folder holding ``packages`` (name, version) and, if ``module``, an ``onnxruntime`` module."""
    root.mkdir(parents=True, exist_ok=True)
    for name, version in packages:
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (root / "onnxruntime" / "capi").mkdir(parents=True, exist_ok=True)
    if module:
        (root / "onnxruntime" / "__init__.py").write_text("__version__ = 'x'\n")
    return str(root)


def test_the_package_that_is_imported_is_reported_and_the_one_it_hides_is_noted(tmp_path):
    # The GPU server's layout: onnxruntime-gpu in its own folder, first on the path, over the image's CPU package.
    path = [_site(tmp_path / "gpu", ("onnxruntime-gpu", "1.31.1")), _site(tmp_path / "cpu", ("onnxruntime", "1.30.0"))]
    install = ort_install(path)
    assert (install.package, install.version) == ("onnxruntime-gpu", "1.31.1")
    assert install.module == (tmp_path / "gpu" / "onnxruntime").resolve()
    assert install.problem() is None
    assert "hides onnxruntime 1.30.0" in install.note() and str(tmp_path / "cpu") in install.note()


def test_both_packages_in_one_folder_is_a_broken_install_with_the_fix_that_works(tmp_path):
    install = ort_install([_site(tmp_path / "site", ("onnxruntime", "1.32.0"), ("onnxruntime-gpu", "1.31.1"))])
    assert install.package is None and install.version is None and len(install.owners) == 2
    problem = install.problem()
    # Uninstalling only the CPU package would delete the module's files that both packages wrote.
    assert "onnxruntime 1.32.0 and onnxruntime-gpu 1.31.1 are both installed" in problem
    assert "pip uninstall -y onnxruntime onnxruntime-gpu && pip install 'deepspot[gpu]'" in problem
    for backend in ("ort-cuda", "ort-trt"):
        assert problem in unavailable_reason(backend, Probe(providers=(CPU,), cuda=True, ort=install))
    assert install.gpu_hint() == problem and install.note() == problem


def test_a_package_whose_module_was_deleted_says_to_reinstall_it(tmp_path):
    install = ort_install([_site(tmp_path / "site", ("onnxruntime-gpu", "1.31.1"), module=False)])
    assert install.module is None  # the leftover folder (no __init__.py) is not a module
    assert "pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1" in install.problem()
    assert "--force-reinstall" in unavailable_reason("ort-cpu", Probe(providers=(), ort=install))


@pytest.mark.parametrize(
    "layout, backend, expected",
    [
        ("cpu", "ort-cuda", "no CUDAExecutionProvider; install onnxruntime-gpu instead of onnxruntime: "
                            "pip uninstall -y onnxruntime && pip install 'deepspot[gpu]'"),
        ("cpu", "ort-trt", "pip uninstall -y onnxruntime && pip install 'deepspot[gpu,tensorrt]'"),
        ("cpu-over-gpu", "ort-cuda", "is hidden by onnxruntime in"),
        ("none", "ort-cuda", "onnxruntime is not installed; pip install 'deepspot[gpu]'"),
        ("none", "ort-cpu", "onnxruntime is not installed; pip install 'deepspot[cpu]'"),
    ],
)  # fmt: skip
def test_the_install_hint_fits_what_is_installed(tmp_path, layout, backend, expected):
    path = {
        "cpu": lambda: [_site(tmp_path / "cpu", ("onnxruntime", "1.32.0"))],
        "cpu-over-gpu": lambda: [_site(tmp_path / "cpu", ("onnxruntime", "1.32.0")),
                                 _site(tmp_path / "gpu", ("onnxruntime-gpu", "1.31.1"))],
        "none": lambda: [str(tmp_path)],
    }[layout]()  # fmt: skip
    install = ort_install(path)
    providers = () if layout == "none" else (CPU,)
    reason = unavailable_reason(backend, Probe(providers=providers, cuda=True, ort=install))
    assert expected in reason
    if layout == "cpu-over-gpu":
        assert reason.endswith("which comes first on the path: pip uninstall -y onnxruntime")


def test_a_gpu_install_has_no_hint_for_the_cuda_provider(tmp_path):
    install = ort_install([_site(tmp_path / "gpu", ("onnxruntime-gpu", "1.31.1"))])
    probe = Probe(providers=(TRT, CUDA, CPU), cuda=True, ort=install)
    assert unavailable_reason("ort-cuda", probe) is None and unavailable_reason("ort-trt", probe) is None


def test_doctor_reports_the_onnxruntime_that_is_imported():
    import onnxruntime

    from deepspot.runtime.doctor import diagnose

    versions = diagnose().versions
    assert versions["onnxruntime"] == onnxruntime.__version__
    assert Path(versions["onnxruntime module"]) == Path(onnxruntime.__file__).resolve().parent
    assert versions["onnxruntime package"] in ("onnxruntime", "onnxruntime-gpu")


def test_an_onnxruntime_that_does_not_import_says_why_and_how_to_repair_it(tmp_path):
    import os
    import subprocess
    import sys

    site = Path(_site(tmp_path / "site", ("onnxruntime-gpu", "1.31.1")))
    (site / "onnxruntime" / "__init__.py").write_text(
        "raise ImportError('libcublasLt.so.13: cannot open shared object file')\n")  # fmt: skip
    code = ("from deepspot.runtime.backends import Probe, unavailable_reason; "
            "print(unavailable_reason('ort-cuda', Probe.detect(torch_cuda=False)))")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *sys.path])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert "onnxruntime-gpu 1.31.1" in out and "does not import (libcublasLt.so.13: cannot open" in out
    assert "pip install --force-reinstall --no-deps onnxruntime-gpu==1.31.1" in out
