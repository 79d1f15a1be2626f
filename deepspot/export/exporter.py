"""``export_onnx``: a checkpoint's model, in one forward mode, to a validated ONNX file.

Steps, each its own function: load the model (or take it), build the export-ready module, trace it with torch's
TorchScript exporter into memory, stamp the metadata, check the graph (``onnx.checker`` full check, strict shape
inference), write it to a temporary file beside the target, validate that file in onnxruntime against the PyTorch
model, and only then rename it into place. A failure at any step leaves nothing behind.

Exporter choice: ``torch.onnx.export`` defaults to the dynamo exporter since torch 2.9. It needs ``onnxscript`` and
turns dynamic shapes into guarded symbolic ones; the TorchScript exporter (``dynamo=False``) traces this simple,
shape-agnostic graph robustly, names dynamic axes directly with ``dynamic_axes``, and needs nothing beyond torch,
so it is chosen deliberately (its deprecation warning is silenced here).

Opset: 17 by default. The graph uses MatMul/Gemm, Add, Mul, Split, Min, Max, Relu, ReduceSum/Max/Mean, IsNaN,
Greater, Where, Concat, Flatten and Cast; none of them changed meaning between opsets 13 and 20 (later versions only
add types or turn attributes into inputs), so the lowest opset allowed gives the widest reach: onnxruntime >= 1.13
and TensorRT >= 8.6 read it, on the CPU, CUDA and TensorRT providers. Opsets 18 to 20 are accepted too.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._version import __version__
from ..errors import CheckpointError, ConfigError, DeepSpotError, folder_hint, option_value
from ..fileio import atomic_path, check_output_file
from .metadata import DEFAULT_OPSET, METADATA_FORMAT, METADATA_VERSION, metadata_value  # noqa: F401  (re-exported)
from .graph import ExportModule, build_export_module, check_mode
from .specs import ExportSpec, check_precision, get_spec, resolve_io_dtype
from .validate import KernelUnavailableError, ValidationReport, validate_onnx

MIN_OPSET = 17
MAX_OPSET = 20  # the TorchScript exporter's highest opset in torch 2.4 .. 2.13
# One protobuf message holds at most 2 GiB; these models (visium-uni: ~50 MB) are far below, so weights are always
# stored inside the single .onnx file.
_PROTOBUF_LIMIT = 2**31 - 2**20


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        path: The ONNX file.
        spec: The mode's export spec (input/output names, dynamic axes).
        precision: Compute precision.
        io_dtype: Dtype of the inputs and the output.
        optimize: Whether the optimised graph was written.
        fold_scaler: Whether the output is on the original scale.
        opset: ONNX opset of the default domain.
        metadata: The ``metadata_props`` written, as strings.
        validation: The parity report, or ``None`` when validation was switched off.
        size_bytes: File size.
        seconds: Wall time per step (``load``, ``build``, ``trace``, ``check``, ``validate``, ``total``).
    """

    path: Path
    spec: ExportSpec
    precision: str
    io_dtype: str
    optimize: bool
    fold_scaler: bool
    opset: int
    metadata: dict[str, str]
    validation: ValidationReport | None
    size_bytes: int
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"wrote {self.path} ({self.spec.key}, {self.precision}, io {self.io_dtype}, opset {self.opset}, "
            f"{'optimised' if self.optimize else 'not optimised'}, "
            f"scaler {'folded' if self.fold_scaler else 'not folded'}, "
            f"{self.size_bytes / 1e6:.1f} MB) in {self.seconds.get('total', 0.0):.2f} s"
        )


# -- model and source ---------------------------------------------------------------------------------------------
def load_model(source: nn.Module | str | os.PathLike) -> tuple[nn.Module, dict[str, str]]:
    """Load (or take) the model and describe its source: name and SHA-256 of its checkpoint or state dict.

    Raises:
        CheckpointError: The checkpoint is missing, unreadable or not a model.
    """
    if isinstance(source, nn.Module):
        if not hasattr(source, "mode") or not hasattr(source, "phi"):
            raise ConfigError(f"cannot export a {type(source).__name__}: expected a DeepSpot or DeepCell model")
        return source, {
            "source": "in-memory",
            "source_sha256": state_dict_hash(source),
            "source_sha256_of": "state_dict",
        }
    from .. import checkpoint

    path = Path(source)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file{folder_hint(path)}")
    try:
        model = checkpoint.load(path)
    except ModuleNotFoundError as e:
        # Reference files go through deepspot.importer; say so instead of showing an import traceback.
        raise CheckpointError(f"{path}: cannot import reference files here ({e})") from None
    return model, {"source": path.name, "source_sha256": checkpoint.file_hash(path), "source_sha256_of": "file"}


def state_dict_hash(model: nn.Module) -> str:
    """SHA-256 over the state dict's names, dtypes, shapes and bytes in key order: the identity of in-memory weights."""
    h = hashlib.sha256()
    for key, value in sorted(model.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# -- metadata -----------------------------------------------------------------------------------------------------
def build_metadata(
    model: nn.Module,
    module: ExportModule,
    source: dict[str, str],
    opset: int,
) -> dict[str, str]:
    """The ``metadata_props`` of an exported model: everything a runtime needs without the checkpoint.

    Values are strings; structured ones (constructor arguments, genes, scaler) are JSON.
    """
    scaler = getattr(model, "scaler", None)
    genes = getattr(model, "genes", None)
    return {
        "format": METADATA_FORMAT,
        "format_version": str(METADATA_VERSION),
        "family": model.family,
        "mode": model.mode.name,
        "mode_reference": model.mode.reference,
        "config": json.dumps(model.config, sort_keys=True),
        "genes": json.dumps(None if genes is None else [str(g) for g in genes]),
        "precision": module.precision,
        "io_dtype": module.io_dtype,
        "scaler_folded": json.dumps(module.fold_scaler),
        "scaler": json.dumps(None if scaler is None else scaler.to_dict()),
        "optimize": json.dumps(module.optimize),
        "deepspot_version": __version__,
        "opset": str(opset),
        "input_names": json.dumps(list(module.input_names)),
        "pools": json.dumps(module.pools),
        **source,
    }


def set_metadata(onnx_model, metadata: dict[str, str], module: ExportModule) -> None:
    """Write ``metadata_props`` and the producer fields of ``onnx_model`` in place."""
    import onnx

    del onnx_model.metadata_props[:]
    onnx.helper.set_model_props(onnx_model, metadata)
    onnx_model.producer_name = "deepspot"
    onnx_model.producer_version = __version__
    onnx_model.graph.name = f"deepspot_{module.family}_{module.mode.name}"
    onnx_model.doc_string = f"{module.family}/{module.mode.name} ({module.mode.reference}), {module.precision}"


# -- tracing and checking -----------------------------------------------------------------------------------------
def trace_to_onnx(module: ExportModule, spec: ExportSpec, input_size: int, opset: int):
    """Trace ``module`` with the TorchScript exporter into an in-memory ``onnx.ModelProto``."""
    import onnx

    batch, bag_size = spec.trace_case
    example = spec.example_inputs(input_size, batch, bag_size, dtype=module.io)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The legacy exporter is chosen on purpose (see module doc); its deprecation notices say nothing new.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*[Ff]eature will be removed.*")
        with torch.no_grad():
            torch.onnx.export(
                module,
                tuple(example[name] for name in spec.input_names),
                buffer,
                dynamo=False,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes(),
                opset_version=opset,
                do_constant_folding=True,
                export_params=True,
            )
    return onnx.load_from_string(buffer.getvalue())


def check_graph(onnx_model) -> None:
    """``onnx.checker`` full check and strict shape inference; a failure here is a bug, not a user error."""
    import onnx

    onnx.checker.check_model(onnx_model, full_check=True)
    onnx.shape_inference.infer_shapes(onnx_model, check_type=True, strict_mode=True, data_prop=True)


def check_opset(opset: int) -> int:
    if not MIN_OPSET <= int(opset) <= MAX_OPSET:
        raise ConfigError(f"opset {opset} is not supported; use {MIN_OPSET} to {MAX_OPSET} (default {DEFAULT_OPSET})")
    return int(opset)


def check_output(output: str | os.PathLike, source: object = None) -> Path:
    """Refuse an output that cannot be a file before any work is done (atomic writing catches the rest): a folder, a
    name without ``.onnx`` (what ``infer`` and ``info`` take ONNX files by), the checkpoint being exported."""
    path = Path(output)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the path of the .onnx file to write")
    if path.suffix.lower() != ".onnx":
        raise ConfigError(f"{path}: the output of an ONNX export must end in .onnx")
    return check_output_file(path, "output", [source])


# -- the entry point ----------------------------------------------------------------------------------------------
def export_onnx(
    model_or_checkpoint: nn.Module | str | os.PathLike,
    output: str | os.PathLike,
    mode: str | None = None,
    precision: str = "fp32",
    io_dtype: str | None = None,
    optimize: bool = True,
    fold_scaler: bool = False,
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
) -> ExportResult:
    """Export a DeepSpot/DeepCell model in its forward mode to one validated ONNX file.

    Args:
        model_or_checkpoint: A model, or the path of a checkpoint (``.safetensors``, or a reference file that
            :func:`deepspot.load` imports).
        output: The ``.onnx`` file to write (replaced atomically if it exists).
        mode: The mode to export; must be the model's own (short or reference name). Default: the model's mode.
        precision: ``fp32`` (default), ``fp16`` (fp16 weights and compute) or ``bf16``.
        io_dtype: Dtype of inputs and output: ``fp32`` (default) or the compute precision (``fp16``).
        optimize: Fuse the Phi ensemble into one product, fold the Rho ensemble into one linear layer, drop dropout
            and the identity ReLU. ``False`` exports the model's layers as they are.
        fold_scaler: Append the scaler's inverse transform, so the graph outputs the original scale.
        opset: ONNX opset, 17 (default) to 20.
        validate: Run the graph in onnxruntime (CPU) on two input sizes and compare it with the model before the
            file is put in place.

    Returns:
        An :class:`ExportResult` with the path, the metadata, the parity report and timings.

    Raises:
        CheckpointError: Missing or unreadable checkpoint.
        ConfigError: Wrong or unknown mode, precision, io dtype or opset; ``fold_scaler`` without a scaler.
        ExportValidationError: The graph does not match the model; the message gives measured errors and tolerances.
        KernelUnavailableError: onnxruntime's CPU provider cannot run the graph at this precision (bf16), so it
            cannot be validated; pass ``validate=False`` to write it anyway.
        DeepSpotError: The output cannot be written.
    """
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    def lap(step: str, t0: float) -> float:
        now = time.perf_counter()
        seconds[step] = now - t0
        return now

    # Cheap checks first, so that a typo costs no model loading.
    check_precision(precision)
    io_dtype = resolve_io_dtype(precision, io_dtype)
    opset = check_opset(opset)
    path = check_output(output, model_or_checkpoint)

    t = time.perf_counter()
    model, source = load_model(model_or_checkpoint)
    check_mode(model, mode)
    spec = get_spec(model.family, model.mode.name)
    t = lap("load", t)

    module = build_export_module(
        model, precision=precision, io_dtype=io_dtype, optimize=optimize, fold_scaler=fold_scaler
    )
    _check_size(module)
    t = lap("build", t)

    onnx_model = trace_to_onnx(module, spec, model.input_size, opset)
    metadata = build_metadata(model, module, source, opset)
    set_metadata(onnx_model, metadata, module)
    t = lap("trace", t)
    check_graph(onnx_model)
    t = lap("check", t)

    import onnx

    report = None
    try:
        with atomic_path(path) as tmp:
            onnx.save_model(onnx_model, str(tmp))
            if validate:
                report = _validate(tmp, path, model, spec, precision, io_dtype, fold_scaler)
                report.path = str(path)
                report.raise_for_failures(note="; nothing was written")
            size = tmp.stat().st_size
    except OSError as e:
        raise DeepSpotError(f"{path}: cannot write ({e.strerror or e})") from None
    lap("validate", t)
    seconds["total"] = time.perf_counter() - started
    return ExportResult(
        path=path,
        spec=spec,
        precision=precision,
        io_dtype=io_dtype,
        optimize=bool(optimize),
        fold_scaler=bool(fold_scaler),
        opset=opset,
        metadata=metadata,
        validation=report,
        size_bytes=size,
        seconds=seconds,
    )


def _validate(tmp: Path, path: Path, model, spec, precision, io_dtype, fold_scaler) -> ValidationReport:
    try:
        return validate_onnx(tmp, model, precision=precision, io_dtype=io_dtype, fold_scaler=fold_scaler, spec=spec)
    except KernelUnavailableError as e:
        raise KernelUnavailableError(
            f"{path}: cannot validate the {precision} graph: onnxruntime's {e.provider} has no {precision} kernel for "
            f"{e.op}; nothing was written (pass {option_value('validate', False, '--no-validate')} to write it "
            "unvalidated, e.g. for the CUDA or TensorRT providers)",
            op=e.op,
            provider=e.provider,
        ) from None


def _check_size(module: nn.Module) -> None:
    size = sum(p.numel() * p.element_size() for p in module.parameters())
    size += sum(b.numel() * b.element_size() for b in module.buffers())
    if size > _PROTOBUF_LIMIT:
        raise ConfigError(
            f"the weights take {size / 2**30:.2f} GiB, more than one ONNX file can hold (2 GiB); "
            "export at fp16 or split the model"
        )
