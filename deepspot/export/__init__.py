"""Export DeepSpot and DeepCell models to ONNX, with named dynamic axes, metadata and verified parity.

Public API:

- :func:`export_onnx`: a model or checkpoint, in its forward mode, to one validated ``.onnx`` file.
- :func:`build_export_module`: the same computation as an ``nn.Module`` (fused, folded, export-friendly median),
  without writing ONNX; the runtime uses it.
- :func:`validate_onnx`: parity of an ONNX file with its PyTorch model on onnxruntime, as a report.
- :func:`read_model_metadata` and :func:`model_info`: what an exported file holds; :func:`indexed_export_info`: the
  two graphs of an indexed export's folder.
- :data:`EXPORT_SPECS` / :func:`get_spec`: one declarative spec per forward mode (names, dynamic axes, example
  inputs, tolerances).
- :func:`lower_median` / :func:`lower_median_of`: ``torch.median``'s lower median as a min/max network.
- :func:`write_triton_repository`: a Triton model repository for an export, validated against Triton's schema.

``onnxruntime`` is imported only when a graph is run, and PyTorch only when a name that needs it is first used, so
importing this package needs neither.
"""

import importlib

# PEP 562: the names load on first use, so that the torch-free parts (``info``, ``triton``, ``metadata``) import
# without PyTorch; everything else here needs it.
_LAZY = {
    "exporter": ("DEFAULT_OPSET", "ExportResult", "export_onnx", "state_dict_hash"),
    "graph": ("ExportModule", "build_export_module", "fold_rho_ensemble", "fuse_phi_ensemble"),
    "info": ("ModelInfo", "TensorInfo", "indexed_export_info", "model_info", "read_model_metadata"),
    "median": ("lower_median", "lower_median_of", "selection_network"),
    "triton": ("TritonRepository", "write_triton_repository"),
    "specs": ("EXPORT_SPECS", "PRECISIONS", "ExportSpec", "Tolerance", "get_spec"),
    "validate": (
        "ExportValidationError",
        "KernelUnavailableError",
        "OutputParity",
        "ValidationReport",
        "session_from_onnx",
        "validate_onnx",
    ),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "TritonRepository",
    "Tolerance",
    "ValidationReport",
    "build_export_module",
    "export_onnx",
    "fold_rho_ensemble",
    "fuse_phi_ensemble",
    "get_spec",
    "indexed_export_info",
    "lower_median",
    "lower_median_of",
    "model_info",
    "read_model_metadata",
    "selection_network",
    "session_from_onnx",
    "state_dict_hash",
    "validate_onnx",
    "write_triton_repository",
]
