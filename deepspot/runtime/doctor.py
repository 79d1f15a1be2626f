"""``deepspot doctor``: what this machine can run, in one table that users paste into bug reports.

Every probe is guarded: a missing package, driver or GPU is a line of the report, never an error. The TensorRT paths
(``ort-trt``, ``tensorrt``) are marked unverified: they follow the documented APIs but have not run on a GPU.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from typing import Any

UNVERIFIED = {"ort-trt", "tensorrt"}


@dataclass
class Report:
    """What :func:`diagnose` found: versions, the GPU, and per backend whether it can run here (and why not)."""

    versions: dict[str, str | None] = field(default_factory=dict)
    machine: dict[str, str | None] = field(default_factory=dict)
    gpu: dict[str, str | None] = field(default_factory=dict)
    libraries: dict[str, str] = field(default_factory=dict)
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _nvidia_smi() -> dict[str, str | None]:
    if shutil.which("nvidia-smi") is None:
        return {"name": None, "driver": None, "note": "no nvidia-smi (no NVIDIA driver here)"}
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip().splitlines()  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        return {"name": None, "driver": None, "note": f"nvidia-smi failed: {e}"}
    if not out:
        return {"name": None, "driver": None, "note": "nvidia-smi lists no GPU"}
    name, driver, memory = (part.strip() for part in (out[0].split(",") + [None, None])[:3])
    return {"name": name, "driver": driver, "memory": memory, "count": str(len(out))}


def diagnose() -> Report:
    """Probe this machine; never raises for something that is missing."""
    from .._version import __version__
    from .backends import BACKENDS, Probe, unavailable_reason
    from .ort import CUDA, TRT

    report = Report()
    probe = Probe.detect()
    ort = probe.ort
    # The package that `import onnxruntime` loads: with both packages installed (one hiding the other on the path,
    # or both in one folder), the first distribution found by name is not necessarily the one that runs.
    report.versions = {
        "deepspot": __version__,
        "python": platform.python_version(),
        "numpy": _version("numpy"),
        "onnx": _version("onnx"),
        "onnxruntime": ort.version or (" + ".join(f"{p.name} {p.version}" for p in ort.owners) or None),
        "onnxruntime package": ort.package or ("a mix of both" if len(ort.owners) > 1 else None),
        "onnxruntime module": None if ort.module is None else str(ort.module),
    }
    if ort.note():
        report.versions["onnxruntime note"] = ort.note()
    report.versions |= {"torch": _version("torch"), "tensorrt": _version("tensorrt")}
    report.machine = {"platform": platform.platform(), "cpu": _cpu()}
    torch_gpu = None
    if importlib.util.find_spec("torch") is not None:
        import torch

        report.versions["torch cuda build"] = torch.version.cuda
        if torch.cuda.is_available():
            torch_gpu = torch.cuda.get_device_name(0)
    report.gpu = {**_nvidia_smi(), "torch sees": torch_gpu}
    cuda_software = report.versions.get("torch cuda build") or {CUDA, TRT} & set(probe.providers)
    if report.gpu.get("name") or torch_gpu or cuda_software:  # the libraries' versions even where no GPU is seen
        from .cuda_libs import cuda_versions, preload_cuda_libraries

        report.libraries = {**cuda_versions(), **preload_cuda_libraries()}
    report.versions["onnxruntime providers"] = ", ".join(probe.providers) or None
    for name in BACKENDS:
        why = unavailable_reason(name, probe)  # a GPU provider listed but not loading included
        report.backends[name] = {
            "available": why is None,
            "why not": why,
            "verified on a GPU": name not in UNVERIFIED,
        }
    return report


def render(report: Report, console) -> None:
    """Print the report as rich tables."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="deepspot doctor", show_header=True)
    table.add_column("what")
    table.add_column("found", overflow="fold")
    for section in (report.versions, report.machine, {f"gpu {k}": v for k, v in report.gpu.items()}, report.libraries):
        for key, value in section.items():
            table.add_row(key, "-" if value is None else escape(str(value)))
    console.print(table)
    backends = Table(title="backends", show_header=True)
    for column in ("backend", "runs here", "note"):
        backends.add_column(column, overflow="fold")
    for name, row in report.backends.items():
        note = row["why not"] or ""
        if not row["verified on a GPU"]:
            note = (note + "; " if note else "") + "unverified: has not run on a GPU (TensorRT is not installable here)"
        backends.add_row(name, "yes" if row["available"] else "no", escape(note))
    console.print(backends)


__all__ = ["Report", "diagnose", "render"]
