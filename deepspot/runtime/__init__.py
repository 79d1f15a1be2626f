"""Run exported DeepSpot/DeepCell graphs at the hardware's speed: runners, streaming inference, parity, benchmarks.

Public API:

- :class:`Runner`: the contract every backend honours (``activate``, ``infer(feed) -> outputs``, ``deactivate``,
  context manager); :class:`TorchRunner`, :class:`OrtRunner` (``ort-cpu``, ``ort-cuda``, ``ort-trt``) and
  :class:`~deepspot.runtime.trt.TrtRunner` (``tensorrt``) implement it.
- :func:`load_runner`: the runner for a checkpoint, an ``.onnx`` or a ``.plan`` on a named backend; a backend that
  cannot run here is an error that says what to install, unless ``allow_fallback``. :data:`BACKENDS`,
  :func:`select_backend`, :class:`RunnerOptions`.
- :func:`session_from_onnx` and :func:`~deepspot.runtime.trt.engine_from_onnx`: building, separate from running.
- :func:`infer`: stream a bundle through a runner into ``.npy`` / ``.npz`` / ``.h5ad``, atomically.
- :func:`compare` / :func:`check_parity`: a :class:`ParityReport` per output; :data:`TOLERANCES` per precision.
  :func:`check_parity_expected`: the same against stored reference outputs, without PyTorch.
- :func:`~deepspot.runtime.bench.run_bench`: the workloads of BENCHMARKS.md, side by side with eager PyTorch.
- :func:`load_pipeline` / :func:`predict_indexed`: the indexed (whole-slide) layout, an encoder pass into a table of
  embeddings and a head that gathers neighbours by index.

``onnxruntime`` and ``tensorrt`` are imported only when a session or an engine is built, and PyTorch only by the
``torch`` backends (and by parity against a checkpoint): the ONNX backends run without it.
"""

from .backends import BACKENDS, FallbackWarning, Probe, RunnerOptions, Selection, load_runner, select_backend
from .base import ModelInfo, Runner, TensorSpec
from .indexed import IndexedPipeline, load_pipeline, predict_indexed
from .infer import InferResult, infer
from .ort import OrtRunner, session_from_onnx
from .parity import TOLERANCES, OutputParity, ParityReport, Tolerance, check_parity, check_parity_expected, compare
from .stream import check_inputs, predict


def __getattr__(name: str):
    # PyTorch loads with the torch backend only: the ONNX and TensorRT backends run without it.
    if name == "TorchRunner":
        from .torch_runner import TorchRunner

        return TorchRunner
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BACKENDS",
    "FallbackWarning",
    "IndexedPipeline",
    "InferResult",
    "ModelInfo",
    "OrtRunner",
    "OutputParity",
    "ParityReport",
    "Probe",
    "Runner",
    "RunnerOptions",
    "Selection",
    "TOLERANCES",
    "TensorSpec",
    "Tolerance",
    "TorchRunner",
    "check_inputs",
    "check_parity",
    "check_parity_expected",
    "compare",
    "infer",
    "load_pipeline",
    "load_runner",
    "predict",
    "predict_indexed",
    "select_backend",
    "session_from_onnx",
]
