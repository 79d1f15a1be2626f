"""Export DeepSpot and DeepCell models to ONNX, with named dynamic axes, metadata and verified parity.

Public API:

- :func:`export_onnx`: a model or checkpoint, in its forward mode, to one validated ``.onnx`` file.
- :func:`build_export_module`: the same computation as an ``nn.Module`` (fused, folded, export-friendly median),
  without writing ONNX; the runtime uses it.
- :func:`validate_onnx`: parity of an ONNX file with its PyTorch model on onnxruntime, as a report.
- :func:`read_model_metadata` and :func:`model_info`: what an exported file holds.
- :data:`EXPORT_SPECS` / :func:`get_spec`: one declarative spec per forward mode (names, dynamic axes, example
  inputs, tolerances).
- :func:`lower_median` / :func:`lower_median_of`: ``torch.median``'s lower median as a min/max network.

``onnxruntime`` is imported only when a graph is run, so importing this package does not need it.
"""

from .exporter import DEFAULT_OPSET, ExportResult, export_onnx, state_dict_hash
from .graph import ExportModule, build_export_module, fold_rho_ensemble, fuse_phi_ensemble
from .info import ModelInfo, TensorInfo, model_info, read_model_metadata
from .median import lower_median, lower_median_of, selection_network
from .specs import EXPORT_SPECS, PRECISIONS, ExportSpec, Tolerance, get_spec
from .validate import (
    ExportValidationError,
    KernelUnavailableError,
    OutputParity,
    ValidationReport,
    session_from_onnx,
    validate_onnx,
)

__all__ = [
    "DEFAULT_OPSET",
    "EXPORT_SPECS",
    "PRECISIONS",
    "ExportModule",
    "ExportResult",
    "ExportSpec",
    "ExportValidationError",
    "KernelUnavailableError",
    "ModelInfo",
    "OutputParity",
    "TensorInfo",
    "Tolerance",
    "ValidationReport",
    "build_export_module",
    "export_onnx",
    "fold_rho_ensemble",
    "fuse_phi_ensemble",
    "get_spec",
    "lower_median",
    "lower_median_of",
    "model_info",
    "read_model_metadata",
    "selection_network",
    "session_from_onnx",
    "state_dict_hash",
    "validate_onnx",
]
