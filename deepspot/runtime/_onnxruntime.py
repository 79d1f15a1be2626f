"""Importing onnxruntime, or saying what to install: shared by the session builder (``ort``) and the GPU IO binding
(``_ort_gpu``), so that neither imports the other.

onnxruntime comes as two packages, ``onnxruntime`` (CPU) and ``onnxruntime-gpu``, that write the same
``onnxruntime`` module. Installed side by side in one folder they leave a mix of the two (often without a working
CUDA provider), and uninstalling one of them then deletes the other's files too. :func:`ort_install` finds which
package the module that Python imports belongs to, so that errors and ``deepspot doctor`` can name the fix.
"""

from __future__ import annotations

import importlib.machinery
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from ..errors import BackendUnavailableError

#: The distributions that install the ``onnxruntime`` module.
PACKAGES = ("onnxruntime", "onnxruntime-gpu")
#: How to replace the CPU package by the GPU one.
GPU_INSTALL = ("install onnxruntime-gpu instead of onnxruntime: pip uninstall -y onnxruntime && "
               "pip install 'deepspot[gpu]'")
#: What to check when the software is in place but the GPU is not reached (no driver, no visible device).
DRIVER_HINT = "check the NVIDIA driver (nvidia-smi) and CUDA_VISIBLE_DEVICES"


@dataclass(frozen=True)
class Installed:
    """One installed onnxruntime distribution: its name, version and the folder its ``onnxruntime`` module is in."""

    name: str
    version: str
    folder: Path

    def __str__(self) -> str:
        return f"{self.name} {self.version} ({self.folder})"


@dataclass(frozen=True)
class OrtInstall:
    """Which onnxruntime packages are installed, and which one ``import onnxruntime`` loads.

    Attributes:
        module: The folder that holds the ``onnxruntime`` module Python imports (``None``: there is none).
        packages: Every installed distribution of :data:`PACKAGES`, wherever it is on the path.
    """

    module: Path | None
    packages: tuple[Installed, ...] = ()

    @property
    def owners(self) -> tuple[Installed, ...]:
        """The packages whose files are the imported module (two: a mix)."""
        return tuple(p for p in self.packages if p.folder == self.module)

    @property
    def shadowed(self) -> tuple[Installed, ...]:
        """Packages installed in another folder, which the imported module hides."""
        return tuple(p for p in self.packages if p.folder != self.module)

    @property
    def package(self) -> str | None:
        """The package ``import onnxruntime`` loads (``None`` if none, or a mix)."""
        owners = self.owners
        return owners[0].name if len(owners) == 1 else None

    @property
    def version(self) -> str | None:
        owners = self.owners
        return owners[0].version if len(owners) == 1 else None

    def problem(self) -> str | None:
        """A broken install, with its fix: both packages in one folder, or a package whose module is gone."""
        owners = self.owners
        if len(owners) > 1:
            both = " and ".join(f"{p.name} {p.version}" for p in owners)
            return (f"{both} are both installed in {self.module} and write the same module, which is now a mix of "
                    "the two; reinstall one: pip uninstall -y onnxruntime onnxruntime-gpu && pip install "
                    "'deepspot[gpu]' (or 'deepspot[cpu]' without a GPU)")  # fmt: skip
        if self.module is None and self.packages:
            first = self.packages[0]
            return (f"{first.name} {first.version} is installed, but its onnxruntime module is gone (uninstalling "
                    f"the other onnxruntime package removes it too): pip install --force-reinstall --no-deps "
                    f"{first.name}=={first.version}")  # fmt: skip
        return None

    def note(self) -> str | None:
        """What ``deepspot doctor`` should point out: a problem, or a package the imported one hides."""
        problem = self.problem()
        if problem:
            return problem
        if self.shadowed and self.owners:
            hidden = ", ".join(str(p) for p in self.shadowed)
            return f"{self.owners[0]} is imported; it hides {hidden}, later on the path"
        return None

    def gpu_hint(self, extras: str = "gpu") -> str:
        """How to get onnxruntime's GPU providers here (``extras``: ``gpu``, or ``gpu,tensorrt`` for TensorRT)."""
        problem = self.problem()
        if problem:
            return problem
        gpu = [p for p in self.shadowed if p.name == "onnxruntime-gpu"]
        if self.package == "onnxruntime" and gpu:
            return (f"onnxruntime-gpu {gpu[0].version} in {gpu[0].folder} is hidden by onnxruntime in {self.module}, "
                    "which comes first on the path: pip uninstall -y onnxruntime")  # fmt: skip
        if self.package == "onnxruntime":
            return GPU_INSTALL.replace("[gpu]", f"[{extras}]")
        return f"pip install 'deepspot[{extras}]' (onnxruntime-gpu, not onnxruntime: they install the same module)"


def ort_install(path: list[str] | None = None) -> OrtInstall:
    """Inspect the onnxruntime install on ``path`` (default ``sys.path``) without importing it."""
    spec = importlib.machinery.PathFinder.find_spec("onnxruntime", path)
    module = None
    if spec is not None and spec.origin and Path(spec.origin).is_file():  # a folder without __init__.py: gone
        module = Path(spec.origin).resolve().parent
    found: list[Installed] = []
    where = {} if path is None else {"path": path}
    for name in PACKAGES:
        for dist in importlib.metadata.distributions(name=name, **where):
            folder = Path(str(dist.locate_file("onnxruntime"))).resolve()
            entry = Installed(name, dist.version, folder)
            if entry not in found:
                found.append(entry)
    return OrtInstall(module, tuple(found))


def import_ort():
    """``onnxruntime``, or an error that says what to install (or how to repair a broken install)."""
    try:
        import onnxruntime

        onnxruntime.InferenceSession  # noqa: B018  a leftover folder imports as an empty namespace package
    except (ImportError, AttributeError) as e:
        install = ort_install()
        if install.problem():
            raise BackendUnavailableError(f"onnxruntime does not import: {install.problem()}") from None
        if install.packages:
            first = (install.owners or install.packages)[0]  # the package whose module failed, if one owns it
            raise BackendUnavailableError(
                f"{first} is installed but does not import ({e}): pip install --force-reinstall --no-deps "
                f"{first.name}=={first.version}"
            ) from None
        raise BackendUnavailableError(
            "onnxruntime is not installed: pip install 'deepspot[cpu]' (or 'deepspot[gpu]' on a GPU server)"
        ) from None
    return onnxruntime
