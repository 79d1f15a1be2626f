"""Parity of an exported graph with the PyTorch model, on onnxruntime's CPU provider.

Validation checks names, then shapes, then values, and collects every failure before it reports: a graph with the
wrong input names is not run at all, one with wrong shapes still has its values compared where they can be. The
result is a :class:`ValidationReport` (per case and output: max/mean absolute error, max relative error, the
tolerance, pass or fail); :meth:`ValidationReport.raise_for_failures` turns a failed one into one line that states
every measured error and its tolerance. ``onnxruntime`` is imported only when a session is built.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import DeepSpotError, option_value
from .specs import ExportSpec, Tolerance, get_spec, resolve_io_dtype

CPU = "CPUExecutionProvider"
_ORT_TYPES = {"fp32": "tensor(float)", "fp16": "tensor(float16)"}
_NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class ExportValidationError(DeepSpotError):
    """An exported graph does not match the PyTorch model (names, shapes or values)."""


class KernelUnavailableError(DeepSpotError):
    """An execution provider has no kernel for an op of the graph at its dtype, so the graph cannot run there.

    Attributes:
        op: The op without a kernel (``MatMul``).
        provider: The execution provider (``CPUExecutionProvider``).
    """

    def __init__(self, message: str, op: str, provider: str):
        super().__init__(message)
        self.op = op
        self.provider = provider


def session_from_onnx(path: str | Path, providers: Sequence[str] = (CPU,), threads: int | None = None):
    """Build an onnxruntime session for ``path`` on ``providers``, for validation (not for throughput).

    Its threads do not spin while idle: onnxruntime's default spinning would take the cores from the PyTorch
    reference that runs between two sessions' calls.

    Args:
        path: The ONNX file.
        providers: Execution providers, in order of preference.
        threads: Intra-op threads; onnxruntime's default (one per core) if ``None``.

    Raises:
        KernelUnavailableError: A provider lacks a kernel for one of the graph's ops (the message names it).
        DeepSpotError: onnxruntime cannot load the file.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise DeepSpotError(
            "validating an export needs onnxruntime: pip install 'deepspot[cpu]' (or 'deepspot[gpu]'), "
            f"or export with {option_value('validate', False, '--no-validate')}"
        ) from None

    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
    except Exception as e:  # onnxruntime raises its own exception types, which are not importable stably
        text = str(e)
        missing = re.search(r"Could not find an implementation for (\w+)\((\d+)\)", text)
        if missing:
            op = missing.group(1)
            raise KernelUnavailableError(
                f"{Path(path).name}: onnxruntime's {providers[0]} has no kernel for {op} "
                f"(opset {missing.group(2)}) at this precision, so the graph cannot run there",
                op=op,
                provider=providers[0],
            ) from None
        raise DeepSpotError(f"{path}: onnxruntime cannot load the model ({text.splitlines()[0][:300]})") from None


@dataclass(frozen=True)
class OutputParity:
    """Errors of one output on one validation case.

    Attributes:
        name: Output name.
        batch: Batch size of the case.
        bag_size: Tiles per multi-tile bag of the case.
        max_abs_err: Largest absolute error (``inf`` where exactly one side is NaN).
        mean_abs_err: Mean absolute error.
        max_rel_err: Largest ``|onnx - torch| / max(|torch|, 1e-12)``.
        reference_max_abs: Largest magnitude of the PyTorch output.
        limit: The allowed max absolute error, from the tolerance.
    """

    name: str
    batch: int
    bag_size: int
    max_abs_err: float
    mean_abs_err: float
    max_rel_err: float
    reference_max_abs: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.max_abs_err <= self.limit

    def describe(self) -> str:
        return (
            f"{self.name} (batch {self.batch}, bag {self.bag_size}): max abs error {self.max_abs_err:.3g} "
            f"{'<=' if self.passed else '>'} tolerance {self.limit:.3g}"
        )


@dataclass
class ValidationReport:
    """Parity of an ONNX graph with its PyTorch model, as data.

    Attributes:
        path: The validated file.
        provider: The execution provider it ran on.
        precision: Compute precision of the graph.
        tolerance: The tolerance applied.
        results: One entry per case and output that could be compared.
        failures: Every name, shape and value failure, in the order found.
    """

    path: str
    provider: str
    precision: str
    tolerance: Tolerance
    results: list[OutputParity] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    @property
    def max_abs_err(self) -> float:
        return max((r.max_abs_err for r in self.results), default=float("nan"))

    @property
    def worst(self) -> OutputParity | None:
        """The result closest to (or furthest over) its limit."""
        return max(self.results, key=lambda r: r.max_abs_err / r.limit if r.limit > 0 else np.inf, default=None)

    def summary(self) -> str:
        """One line: pass or fail, and the worst measured error against its tolerance."""
        status = "passed" if self.passed else "FAILED"
        worst = self.worst
        detail = f"; worst: {worst.describe()}" if worst is not None else ""
        return f"validation on {self.provider} {status} ({self.precision}, tolerance {self.tolerance}){detail}"

    def table(self) -> str:
        """A plain-text table of every case and output."""
        lines = [
            f"{'output':<12} {'batch':>5} {'bag':>4} {'max abs':>10} {'mean abs':>10} {'max rel':>10} "
            f"{'abs limit':>10}  result"
        ]
        for r in self.results:
            lines.append(
                f"{r.name:<12} {r.batch:>5} {r.bag_size:>4} {r.max_abs_err:>10.3g} {r.mean_abs_err:>10.3g} "
                f"{r.max_rel_err:>10.3g} {r.limit:>10.3g}  {'pass' if r.passed else 'FAIL'}"
            )
        lines.append(
            "limit bounds max abs (atol + rtol x max |reference|); max rel (error / |reference|, large where the "
            "reference is near 0) is for information"
        )
        return "\n".join(lines)

    def raise_for_failures(self, note: str = "") -> None:
        """Raise :class:`ExportValidationError` listing every failure (measured error and tolerance) on one line."""
        if self.failures:
            raise ExportValidationError(
                f"{self.path}: validation on {self.provider} failed ({self.precision}, tolerance {self.tolerance}): "
                + "; ".join(self.failures)
                + note
            )


def compare(name: str, actual: np.ndarray, reference: np.ndarray, tolerance: Tolerance, batch: int, bag_size: int):
    """Error statistics of ``actual`` against ``reference`` (NaN on both sides agrees, on one side is ``inf``)."""
    a = np.asarray(actual, dtype=np.float64)
    r = np.asarray(reference, dtype=np.float64)
    both_nan = np.isnan(a) & np.isnan(r)
    err = np.where(both_nan, 0.0, np.abs(a - r))
    err = np.where(np.isnan(err), np.inf, err)  # NaN on one side only
    ref_max = float(np.nanmax(np.abs(r))) if r.size and not np.isnan(r).all() else 0.0
    rel = err / np.maximum(np.abs(np.nan_to_num(r)), 1e-12)
    return OutputParity(
        name=name,
        batch=batch,
        bag_size=bag_size,
        max_abs_err=float(err.max()) if err.size else 0.0,
        mean_abs_err=float(err.mean()) if err.size else 0.0,
        max_rel_err=float(rel.max()) if rel.size else 0.0,
        reference_max_abs=ref_max,
        limit=tolerance.limit(ref_max),
    )


def torch_reference(model: nn.Module, inputs: dict[str, torch.Tensor], fold_scaler: bool = False) -> np.ndarray:
    """The PyTorch model's eval-mode float32 output on ``inputs`` (inverse-transformed if the scaler is folded)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            y = model(**{k: v.float() for k, v in inputs.items()})
            if fold_scaler:
                y = model.inverse_transform(y)
    finally:
        model.train(was_training)
    return y.numpy()


def validate_onnx(
    path: str | Path,
    model: nn.Module,
    precision: str = "fp32",
    io_dtype: str | None = None,
    fold_scaler: bool = False,
    spec: ExportSpec | None = None,
    cases: Sequence[tuple[int, int]] | None = None,
    tolerance: Tolerance | None = None,
    providers: Sequence[str] = (CPU,),
    seed: int = 1,
) -> ValidationReport:
    """Run the graph at ``path`` in onnxruntime and compare it with ``model`` (eval mode, float32).

    Args:
        path: The ONNX file.
        model: The PyTorch model it was exported from.
        precision: The graph's compute precision (picks the tolerance).
        io_dtype: The graph's input and output dtype (``fp32`` or ``fp16``).
        fold_scaler: Whether the graph outputs the original scale (the reference is then inverse-transformed).
        spec: The mode's export spec; looked up from the model if not given.
        cases: ``(batch, bag size)`` pairs to run; the spec's validation cases by default.
        tolerance: Overrides the spec's tolerance for ``precision``.
        providers: onnxruntime execution providers, CPU by default.
        seed: Seed of the example inputs.

    Returns:
        The report; it does not raise on a mismatch (call :meth:`ValidationReport.raise_for_failures`).

    Raises:
        KernelUnavailableError: The provider cannot run the graph at this precision.
    """
    spec = spec or get_spec(model.family, model.mode.name)
    io_dtype = resolve_io_dtype(precision, io_dtype)
    tolerance = tolerance or spec.tolerance(precision)
    report = ValidationReport(str(path), providers[0], precision, tolerance)
    session = session_from_onnx(path, providers)

    # 1. Names and dtypes: without the right names nothing can be fed, so stop here if they are wrong.
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if list(inputs) != list(spec.input_names):
        report.failures.append(f"inputs are {list(inputs)}, expected {list(spec.input_names)}")
    if list(outputs) != list(spec.output_names):
        report.failures.append(f"outputs are {list(outputs)}, expected {list(spec.output_names)}")
    if report.failures:
        return report
    for name, arg in [*inputs.items(), *outputs.items()]:
        if arg.type != _ORT_TYPES[io_dtype]:
            report.failures.append(f"{name} has type {arg.type}, expected {_ORT_TYPES[io_dtype]}")

    # 2. Symbolic shapes: the named dynamic axes and the fixed feature and gene axes.
    expected = {**spec.input_shapes(model.input_size), **spec.output_shapes(model.output_size)}
    for name, arg in [*inputs.items(), *outputs.items()]:
        if tuple(arg.shape) != expected[name]:
            report.failures.append(f"{name} has shape {tuple(arg.shape)}, expected {expected[name]}")

    # 3. Values, on every case; the reference sees the inputs after rounding to the io dtype.
    for batch, bag_size in cases or spec.validation_cases:
        example = spec.example_inputs(model.input_size, batch, bag_size, seed=seed + batch * 1000 + bag_size)
        feed = {k: v.numpy().astype(_NUMPY_DTYPES[io_dtype]) for k, v in example.items()}
        reference = torch_reference(
            model, {k: torch.from_numpy(v.astype(np.float32)) for k, v in feed.items()}, fold_scaler
        )
        actual = dict(zip(spec.output_names, session.run(list(spec.output_names), feed)))
        for name in spec.output_names:
            if actual[name].shape != reference.shape:
                report.failures.append(
                    f"{name} (batch {batch}, bag {bag_size}) has shape {actual[name].shape}, expected {reference.shape}"
                )
                continue
            result = compare(name, actual[name], reference, tolerance, batch, bag_size)
            report.results.append(result)
            if not result.passed:
                report.failures.append(result.describe())
    return report
