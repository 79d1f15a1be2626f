"""Parity: run a reference runner (the PyTorch model) and a backend on the same inputs, and report per output.

As in Polygraphy's comparator, parity is a report, not an assert: for each output the max and mean absolute error,
the max relative error, the lowest per-gene Pearson correlation between backend and reference, the tolerance and
pass or fail. Tolerances are data, one row per precision; every failure states the measured error and the limit.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from .._pages import release_rows, row_blocks
from ..checks import at_least, check_memory, finite_at_least
from ..errors import ConfigError, InputError, option, option_value
from ..fileio import atomic_path, numpy_error
from .backends import get_backend
from .base import Runner


@dataclass(frozen=True)
class Tolerance:
    """Pass when ``max|backend - reference| <= atol + rtol * max|reference|`` and every gene's ``r >= min_pearson``.

    The limit scales with the output's magnitude rather than element by element, because expression on the original
    scale runs to the thousands while standardised expression is of order one, and elementwise relative error is
    meaningless next to zero.
    """

    atol: float
    rtol: float
    min_pearson: float

    def limit(self, reference_max_abs: float) -> float:
        return self.atol + self.rtol * float(reference_max_abs)


# fp32: only the reordering of sums (fused Phi, folded Rho) separates backend and reference, as in the exporter's
# validation. fp16 and bf16 round weights, inputs and intermediates (unit roundoff 2^-11 and 2^-8), with a margin.
TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {
        "fp32": Tolerance(atol=1e-5, rtol=1e-5, min_pearson=0.99999),
        # TF32 rounds the products' operands to a 10-bit mantissa and accumulates in fp32. Emulated on the CPU at
        # the real sizes (visium-uni, xenium), the largest error was 6e-4 and 4e-4 of the largest output, where this
        # allows 2e-3 of it plus 2e-3.
        "tf32": Tolerance(atol=2e-3, rtol=2e-3, min_pearson=0.9999),
        "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_pearson=0.999),
        "bf16": Tolerance(atol=6e-2, rtol=6e-2, min_pearson=0.99),
    }
)


def tolerance_for(precision: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The table's tolerance for ``precision``, with ``atol`` / ``rtol`` overridden where given."""
    _check_tolerances(atol, rtol)
    if precision not in TOLERANCES:
        raise ConfigError(f"no tolerance for precision {precision!r}; expected one of: {', '.join(TOLERANCES)}")
    tol = TOLERANCES[precision]
    return replace(tol, atol=tol.atol if atol is None else atol, rtol=tol.rtol if rtol is None else rtol)


def _check_tolerances(atol: float | None, rtol: float | None) -> None:
    for value, name in ((atol, "atol"), (rtol, "rtol")):
        if value is not None:
            finite_at_least(float(value), option(name))


def check_parity_options(batch_size: int = 256, n_random: int | None = None, atol: float | None = None,
                         rtol: float | None = None, seed: int = 0) -> None:  # fmt: skip
    """Refuse, before any work, options a comparison cannot use.

    Raises:
        ConfigError: ``batch_size`` or ``n_random`` below 1, a tolerance that is negative, NaN or infinite, or a
            negative seed.
    """
    at_least(batch_size, option("batch_size"))
    if n_random is not None:
        at_least(n_random, option("n_random", "--random"))
    _check_tolerances(atol, rtol)
    at_least(seed, option("seed"), 0)


def _check_items(n: int, source: Any) -> None:
    if n == 0:
        raise InputError(f"{source}: has no items; parity needs at least one to compare")


@dataclass
class OutputParity:
    """Parity of one output over all compared items."""

    name: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    max_rel: float
    min_pearson: float | None
    worst_gene: int | None
    reference_max_abs: float
    limit: float
    tolerance: Tolerance
    passed: bool

    def describe(self) -> str:
        r = "n/a" if self.min_pearson is None else f"{self.min_pearson:.6f} (gene {self.worst_gene})"
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{self.name}: {verdict}: max abs err {self.max_abs:.3g} (limit {self.limit:.3g}), mean abs err "
            f"{self.mean_abs:.3g}, max rel err {self.max_rel:.3g}, "
            f"min Pearson r {r} (limit {self.tolerance.min_pearson})"
        )


@dataclass
class ParityReport:
    """Per-output parity of ``backend`` against ``reference``."""

    reference: str
    backend: str
    precision: str
    n: int
    outputs: list[OutputParity]
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return bool(self.outputs) and all(o.passed for o in self.outputs)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def save(self, path: str | Path) -> Path:
        """Write the report as JSON, atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return Path(path)

    def summary(self) -> str:
        head = f"parity of {self.backend} ({self.precision}) against {self.reference} on {self.n} items: "
        return head + ("PASS" if self.passed else "FAIL") + "".join(f"\n  {o.describe()}" for o in self.outputs)


#: Bytes of each operand a comparison reads at a time: a slide's predictions (500,000 x 5,000 float32 is 10 GB) are
#: compared block by block, in float64, never as whole float64 copies.
COMPARE_CHUNK_BYTES = 16 << 20


def _row_blocks(a: np.ndarray, chunk_bytes: int | None = None) -> Iterator[tuple[int, int]]:
    # float64 blocks: twice the bytes of float32 rows
    return row_blocks(a.shape[0], 2 * a[:1].nbytes, chunk_bytes or COMPARE_CHUNK_BYTES)


def _block(a: np.ndarray, start: int, stop: int) -> np.ndarray:
    return np.asarray(a[start:stop], dtype=np.float64)


def _release(start: int, stop: int, *arrays: np.ndarray) -> None:
    for a in arrays:
        release_rows(a, start, stop)  # a memory-mapped operand's pages, once compared


def pearson_per_column(a: np.ndarray, b: np.ndarray, chunk_bytes: int | None = None) -> np.ndarray:
    """Pearson r of each column of ``a`` with the same column of ``b`` (NaN where a column of ``b`` is constant).

    Two passes over blocks of rows (the means, then the centred sums), in float64, so memory stays at a block's
    whatever the number of rows (``a`` and ``b`` may be memory maps)."""
    n = a.shape[0]
    shape = a.shape[1:]
    sa, sb = np.zeros(shape), np.zeros(shape)
    for start, stop in _row_blocks(a, chunk_bytes):
        sa += _block(a, start, stop).sum(axis=0)
        sb += _block(b, start, stop).sum(axis=0)
        _release(start, stop, a, b)
    ma, mb = sa / max(n, 1), sb / max(n, 1)
    saa, sbb, sab = np.zeros(shape), np.zeros(shape), np.zeros(shape)
    for start, stop in _row_blocks(a, chunk_bytes):
        x = _block(a, start, stop) - ma
        y = _block(b, start, stop) - mb
        saa += (x * x).sum(axis=0)
        sbb += (y * y).sum(axis=0)
        sab += (x * y).sum(axis=0)
        _release(start, stop, a, b)
    denom = np.sqrt(saa * sbb)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = sab / denom
    # A constant reference gene has no correlation to speak of; its absolute error is still checked.
    r[sbb <= 1e-30] = np.nan
    return r


def output_parity(name: str, actual: np.ndarray, expected: np.ndarray, tolerance: Tolerance) -> OutputParity:
    """Compare one output: ``actual`` from the backend, ``expected`` from the reference."""
    if actual.shape != expected.shape:
        inf = float("inf")
        return OutputParity(name, tuple(actual.shape), inf, inf, inf, None, None, 0.0, 0.0, tolerance, False)
    # Block by block in float64 (the operands may be a whole slide's memory-mapped predictions).
    ref_maxes, abs_maxes, rel_maxes, total, nan = [0.0], [0.0], [0.0], 0.0, False
    if actual.size:
        for start, stop in _row_blocks(actual):
            want = _block(expected, start, stop)
            diff = np.abs(_block(actual, start, stop) - want)
            ref_maxes.append(np.abs(want).max())
            abs_maxes.append(diff.max())
            nan = nan or bool(np.isnan(diff).any())
            total += float(diff.sum())
            rel_maxes.append((diff / (np.abs(want) + tolerance.atol)).max())
            _release(start, stop, actual, expected)
    ref_max, max_abs, max_rel = (float(np.max(v)) for v in (ref_maxes, abs_maxes, rel_maxes))  # NaN propagates
    if nan:
        max_abs = float("nan")  # np.max already propagates NaN; keep it explicit: NaN never passes
    mean_abs = total / actual.size if actual.size else float("nan")
    r = pearson_per_column(actual, expected) if actual.ndim == 2 and actual.shape[0] > 2 else np.array([np.nan])
    finite = np.isfinite(r)
    min_r = float(r[finite].min()) if finite.any() else None
    worst = int(np.flatnonzero(finite)[np.argmin(r[finite])]) if finite.any() else None
    limit = tolerance.limit(ref_max)
    passed = bool(np.isfinite(max_abs) and max_abs <= limit and (min_r is None or min_r >= tolerance.min_pearson))
    return OutputParity(
        name, tuple(actual.shape), max_abs, mean_abs, max_rel, min_r, worst, ref_max, limit, tolerance, passed
    )


def iter_feeds(inputs: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Batches of a dict of arrays (all of the same length)."""
    n = next(iter(inputs.values())).shape[0]
    for start in range(0, n, batch_size):
        yield {k: np.ascontiguousarray(v[start : start + batch_size], dtype=np.float32) for k, v in inputs.items()}


def compare(
    reference: Runner,
    runner: Runner,
    feeds: Mapping[str, np.ndarray] | Iterable[Mapping[str, np.ndarray]],
    tolerance: Tolerance | None = None,
    batch_size: int = 256,
    reference_transform: Callable[[np.ndarray], np.ndarray] | None = None,
) -> ParityReport:
    """Run both runners on the same feeds and report parity per output.

    Both runners are activated for the comparison and deactivated after it, as Polygraphy's comparator does.

    Args:
        reference: The reference runner.
        runner: The runner under test.
        feeds: One dict of arrays (split into batches of ``batch_size``) or an iterable of feed dicts.
        tolerance: Default: the table's row for the runner's precision.
        batch_size: Batch size when ``feeds`` is one dict of arrays.
        reference_transform: Applied to reference outputs first (the scaler, for a graph with a folded scaler).
    """
    precision = runner.info.precision if runner.info else "fp32"
    tolerance = tolerance or tolerance_for(precision)
    if isinstance(feeds, Mapping):
        feeds = iter_feeds(feeds, batch_size)
    got: dict[str, list[np.ndarray]] = {}
    want: dict[str, list[np.ndarray]] = {}
    with reference, runner:
        for feed in feeds:
            ref_out = reference.infer(feed)
            out = runner.infer(feed)
            for name in ref_out:
                expected = ref_out[name] if reference_transform is None else reference_transform(ref_out[name])
                want.setdefault(name, []).append(np.asarray(expected, dtype=np.float32))
                got.setdefault(name, []).append(out.get(name, np.full_like(ref_out[name], np.nan)))
    outputs = [output_parity(name, np.concatenate(got[name]), np.concatenate(want[name]), tolerance) for name in want]
    n = int(outputs[0].shape[0]) if outputs else 0
    return ParityReport(reference.name, runner.name, precision, n, outputs)


def _has_index(bundle) -> bool:
    from ..data import load_bundle

    return "neighbor_index" in load_bundle(bundle)


DEFAULT_BAGS = {"subspot": 9, "neighbors": 6, "spot": 1, "cell": 1}


def random_inputs(info, n: int, bag_sizes: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs for a model; the last neighbour of the first item is a zero row, as the
    reference pads short bags (a zero row is a real input, and every backend must treat it as one)."""
    sizes = {**DEFAULT_BAGS, **(bag_sizes or {})}
    specs = info.input_specs()
    tiles_of = {name: 1 if spec.shape[1] == 1 else sizes.get(name, 4) for name, spec in specs.items()}
    check_memory(4 * n * sum(tiles_of.values()) * info.input_size,
                 f"{option_value('n_random', n, '--random')} items of {sum(tiles_of.values())} tiles of "
                 f"{info.input_size} features")  # fmt: skip
    rng = np.random.default_rng(seed)
    inputs = {}
    for name in specs:
        tiles = tiles_of[name]
        x = rng.standard_normal((n, tiles, info.input_size), dtype=np.float32)
        if name == "neighbors" and tiles > 1:
            x[0, -1] = 0.0
        inputs[name] = x
    return inputs


def check_parity(
    checkpoint: Any,
    model: Any,
    backend: str | None = None,
    bundle: str | Path | None = None,
    n_random: int | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    batch_size: int = 256,
    options: Any = None,
    allow_fallback: bool = False,
    seed: int = 0,
    layout: str | None = None,
) -> ParityReport:
    """Parity of ``model`` on ``backend`` against the eager PyTorch model of ``checkpoint``.

    Args:
        checkpoint: The reference: a checkpoint path or an in-memory model.
        model: What to test: an ``.onnx`` file, a ``.plan`` or a checkpoint (for ``torch`` variants).
        backend: Backend for ``model`` (default from its file type).
        bundle: Compare on a feature bundle's items; else on ``n_random`` seeded random items.
        n_random: How many random items without a bundle (default 64).
        atol: Override the precision's absolute tolerance.
        rtol: Override the precision's relative tolerance.
        batch_size: Items per batch.
        options: :class:`~deepspot.runtime.backends.RunnerOptions` for ``model``'s runner.
        allow_fallback: Permit another backend (the report then names the one that ran).
        seed: Seed of the random inputs.
        layout: ``indexed`` compares the indexed layout (encoder + head, neighbours by index) with the per-item
            model on the equivalent dense bags; default: ``indexed`` for an indexed export folder, or for a bundle
            with ``neighbor_index`` and a checkpoint.

    Raises:
        ConfigError: The model and the checkpoint are of different families, modes or sizes.
    """
    from .backends import RunnerOptions, load_runner
    from .indexed import is_indexed_folder
    from .infer import LAYOUTS

    check_parity_options(batch_size, n_random, atol, rtol, seed)
    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    if layout is None:
        indexed_bundle = bundle is not None and _has_index(bundle)
        from .artifacts import artifact_kind

        layout = (
            "indexed" if is_indexed_folder(model) or (indexed_bundle and artifact_kind(model) == "model") else "dense"
        )
    if layout == "indexed":
        return check_parity_indexed(checkpoint, model, backend, bundle, n_random, atol, rtol, batch_size, options,
                                    allow_fallback, seed)  # fmt: skip
    from .stream import check_inputs
    from .torch_runner import TorchRunner

    reference = TorchRunner(checkpoint, name="torch (reference)")
    ref = reference.info
    inputs = None
    options = options or RunnerOptions()
    options.batch_size = batch_size
    if bundle is not None:
        from ..data import load_bundle

        data = load_bundle(bundle)
        mode = data.validate(ref.family, ref.mode, input_size=ref.input_size, allow_index=True)
        if data.layout == "indexed" and mode.has_neighbors:
            from ..data import check_neighbor_index, densify

            # The per-item graph on an indexed bundle: its neighbour bags, materialised (parity runs on samples).
            own = data[mode.bags[0].name]
            check_neighbor_index(data["neighbor_index"], own.shape[0], source=str(bundle))
            data.arrays["neighbors"] = densify(np.asarray(own), data["neighbor_index"])
        inputs = data.inputs(mode)
        _check_items(next(iter(inputs.values())).shape[0], bundle)
        options.bag_sizes = {k: int(v.shape[1]) for k, v in inputs.items()}
    runner = load_runner(model, backend, options, allow_fallback)
    info = runner.info
    if info is not None:
        theirs, ours = (
            (info.family, info.mode, info.input_size, info.output_size),
            (ref.family, ref.mode, ref.input_size, ref.output_size),
        )
        if theirs != ours:
            raise ConfigError(
                f"{model} is a {theirs[0]}/{theirs[1]} model (D={theirs[2]}, G={theirs[3]}) but "
                f"{checkpoint} is {ours[0]}/{ours[1]} (D={ours[2]}, G={ours[3]})"
            )
    if inputs is None:
        inputs = random_inputs(ref, n_random or 64, seed=seed)
    check_inputs(inputs, ref, source=str(bundle or "random inputs"))
    transform = ref.scaler.inverse_transform if info is not None and info.fold_scaler and ref.scaler else None
    report = compare(
        reference,
        runner,
        inputs,
        tolerance_for(info.precision if info else "fp32", atol, rtol),
        batch_size,
        reference_transform=transform,
    )
    selection = getattr(runner, "selection", None)
    if selection is not None and selection.fell_back:
        report.notes.append(f"requested {selection.requested}, ran {selection.backend} (fallback allowed)")
    return report


# -- the indexed layout (here rather than in .indexed, so that the two modules do not import each other) -------
def random_slide(info, n: int, k: int = 6, n_subspots: int = 9, seed: int = 0) -> dict[str, np.ndarray]:
    """A seeded random slide for parity: standard-normal tiles and a random neighbour index that includes ``-1``
    padding, repeated neighbours, an item that is its own neighbour and an item without neighbours."""
    mode = info.mode_spec
    tiles = 1 + n_subspots * ("subspot" in mode.input_names)
    check_memory(n * (4 * tiles * info.input_size + 8 * k),
                 f"{option_value('n_random', n, '--random')} items of {tiles} tiles of {info.input_size} "
                 "features")  # fmt: skip
    rng = np.random.default_rng(seed)
    arrays = {mode.bags[0].name: rng.standard_normal((n, info.input_size), dtype=np.float32)}
    if "subspot" in mode.input_names:
        arrays["subspot"] = rng.standard_normal((n, n_subspots, info.input_size), dtype=np.float32)
    index = rng.integers(-1, n, size=(n, k))
    index[0] = -1
    if n > 2:
        index[1, 0] = 1
        index[2, :] = index[2, 0]
    arrays["neighbor_index"] = index
    return arrays


def check_parity_indexed(checkpoint, model, backend=None, bundle=None, n_random=None, atol=None, rtol=None,
                         batch_size: int = 256, options=None, allow_fallback: bool = False, seed: int = 0):  # fmt: skip
    """Parity of the indexed layout (``model``: an indexed export folder, or a checkpoint run on torch) against the
    eager PyTorch model of ``checkpoint`` in the per-item layout, on the equivalent dense bags.

    Returns:
        A :class:`~deepspot.runtime.parity.ParityReport`.
    """
    from ..data import load_bundle
    from ..export.metadata import indexed_precision
    from .indexed import check_indexed_inputs, dense_from_index, load_pipeline, predict_indexed
    from .stream import batches
    from .torch_runner import TorchRunner

    check_parity_options(batch_size, n_random, atol, rtol, seed)
    reference = TorchRunner(checkpoint, name="torch (reference, per-item)")
    ref = reference.info
    pipeline = load_pipeline(model, backend, options, allow_fallback, batch_size)
    info = pipeline.info
    if (info.family, info.mode, info.input_size, info.output_size) != (
        ref.family, ref.mode, ref.input_size, ref.output_size
    ):  # fmt: skip
        raise ConfigError(f"{model} is a {info.family}/{info.mode} model, {checkpoint} a {ref.family}/{ref.mode} one")
    if bundle is not None:
        data = load_bundle(bundle)
        data.validate(ref.family, ref.mode, input_size=ref.input_size, allow_index=True)
        if "neighbor_index" not in data:
            raise ConfigError(f"{bundle}: parity of the indexed layout needs a bundle with 'neighbor_index'")
        arrays = data.arrays
    else:
        arrays = random_slide(ref, n_random or 64, seed=seed)
    n = check_indexed_inputs(arrays, ref, source=str(bundle or "random slide"))
    _check_items(n, bundle)
    inputs, gather = dense_from_index(arrays, ref.mode_spec)
    want = np.empty((n, ref.output_size), dtype=np.float32)
    with reference:
        for start, stop, feed in batches(inputs, batch_size, {k: v.dtype for k, v in inputs.items()}, prepare=gather):
            want[start:stop] = reference.infer(feed)["expression"]
    if info.fold_scaler and ref.scaler is not None:
        want = ref.scaler.inverse_transform(want)
    with pipeline:
        got, _ = predict_indexed(pipeline, arrays, batch_size)
    precision = indexed_precision(info.precision, pipeline.table_dtype)
    tolerance = tolerance_for(precision, atol, rtol)
    name = f"{pipeline.backend} (indexed)"
    report = ParityReport(reference.name, name, precision, n, [output_parity("expression", got, want, tolerance)])
    if precision != info.precision:
        report.notes.append(f"the embedding table is {pipeline.table_dtype}: the {precision} tolerance applies")
    selection = getattr(pipeline.head, "selection", None)
    if selection is not None and selection.fell_back:
        report.notes.append(f"requested {selection.requested}, ran {selection.backend} (fallback allowed)")
    return report


# -- against stored outputs (no PyTorch) ----------------------------------------------------------------------------
def load_expected(path: str | Path) -> np.ndarray:
    """Stored reference predictions: an ``.npy`` array, or the ``predictions`` of an ``.npz`` (as ``infer`` writes).

    Raises:
        InputError: Missing or unreadable file, not 2-D, not floating point, or holding NaN or infinity.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file of expected outputs")
    try:
        if path.suffix.lower() == ".npz":
            from ..data import _read_npz

            with np.load(path, allow_pickle=False) as z:
                if "predictions" not in z.files:
                    raise InputError(f"{path}: no 'predictions' array (it holds {', '.join(z.files) or 'nothing'})")
            values = _read_npz(path, mmap=True)["predictions"]  # memory-mapped where stored (as infer writes it)
        else:
            values = np.load(path, mmap_mode="r", allow_pickle=False)
    except InputError:
        raise
    except Exception as e:  # NumPy raises ValueError, OSError, EOFError, zipfile errors for a corrupt file
        raise InputError(f"{path}: not a readable .npy/.npz array ({numpy_error(e)})") from None
    if values.ndim != 2 or values.dtype.kind != "f":
        raise InputError(f"{path}: expected outputs must be a 2-D float array (items x genes), got {values.dtype} "
                         f"{values.shape}")  # fmt: skip
    from .stream import first_nonfinite_row

    row = first_nonfinite_row(values, target=values.dtype)  # block by block: a slide's outputs are never all in memory
    if row is not None:
        raise InputError(f"{path}: row {row} holds NaN or infinity")
    return values


def _graph_precision(model: Any, precision: str | None = None) -> tuple[str, str]:
    """The precision a model file runs at (``precision`` if asked of the backend, else its graph's) and the tolerance
    row that applies: the same, except for an indexed export with an fp16 embedding table, which rounds every
    embedding and is held to the fp16 row (:func:`~deepspot.export.metadata.indexed_precision`)."""
    from ..export import read_model_metadata
    from .indexed import is_indexed_folder

    if is_indexed_folder(model):
        from ..export.metadata import HEAD_FILE, indexed_precision

        meta = read_model_metadata(Path(model) / HEAD_FILE)
        graph = precision or str(meta.get("precision", "fp32"))
        return graph, indexed_precision(graph, str(meta.get("table_dtype", "fp32")))
    if not precision and Path(model).suffix.lower() == ".onnx":
        precision = str(read_model_metadata(model).get("precision", "fp32"))
    return precision or "fp32", precision or "fp32"


def check_parity_expected(
    model: Any,
    expected: str | Path,
    bundle: str | Path,
    backend: str | None = None,
    atol: float | None = None,
    rtol: float | None = None,
    batch_size: int = 256,
    options: Any = None,
    allow_fallback: bool = False,
    layout: str | None = None,
    inverse_transform: bool = False,
) -> ParityReport:
    """Parity of ``model`` on ``backend`` against stored reference outputs for a bundle's items (no PyTorch needed).

    The model runs exactly as ``deepspot infer`` runs it (any layout), into a temporary file, and its predictions are
    compared with ``expected`` row by row, with the tolerance of the graph's precision.

    Args:
        model: An ``.onnx`` file, an indexed export folder, a ``.plan`` or a checkpoint.
        expected: ``.npy`` (N x G), or an ``.npz`` with ``predictions`` (as ``infer`` writes).
        bundle: The bundle the expected outputs were computed on.
        backend: Backend for ``model`` (default from its file type).
        atol: Override the precision's absolute tolerance.
        rtol: Override the precision's relative tolerance.
        batch_size: Items per batch.
        options: :class:`~deepspot.runtime.backends.RunnerOptions` for ``model``'s runner.
        allow_fallback: Permit another backend (the report then names the one that ran).
        layout: ``dense`` or ``indexed``, as :func:`~deepspot.runtime.infer` takes it.
        inverse_transform: The expected outputs are on the original scale (``infer --inverse-transform``).

    Raises:
        InputError: Unreadable expected outputs, or a shape that is not the model's predictions on the bundle.
    """
    import tempfile

    from .infer import infer

    check_parity_options(batch_size, atol=atol, rtol=rtol)
    want = load_expected(expected)
    _check_items(want.shape[0], expected)
    graph, precision = ("fp32", "fp32")
    if isinstance(model, (str, Path)):
        graph, precision = _graph_precision(model, getattr(options, "precision", None))
    with tempfile.TemporaryDirectory(prefix="deepspot-parity-") as tmp:
        result = infer(model, bundle, Path(tmp) / "predictions.npy", backend, batch_size, options, inverse_transform,
                       allow_fallback, layout=layout)  # fmt: skip
        got = np.load(Path(tmp) / "predictions.npy", mmap_mode="r")  # compared block by block, not read whole
        return _expected_report(model, expected, bundle, options, atol, rtol, result, got, want, graph, precision)


def _expected_report(model, expected, bundle, options, atol, rtol, result, got, want, graph, precision) -> ParityReport:
    # fp32 products on TF32 tensor cores, as asked, where a GPU ran them (a fallback to the CPU runs without --tf32)
    if getattr(options, "tf32", False) and graph == "fp32" and get_backend(result.backend).device == "cuda":
        graph, precision = _graph_precision(model, "tf32")
    if got.shape != want.shape:
        raise InputError(
            f"{expected}: holds {want.shape[0]} x {want.shape[1]} outputs; {model} predicts {got.shape[0]} x "
            f"{got.shape[1]} on {bundle}"
        )
    tolerance = tolerance_for(precision, atol, rtol)
    name = result.backend + (" (indexed)" if result.layout == "indexed" else "")
    report = ParityReport(f"expected outputs ({Path(expected).name})", name, precision, result.n,
                          [output_parity("expression", got, want, tolerance)])  # fmt: skip
    if precision != graph:
        report.notes.append(f"the embedding table is fp16: the {precision} tolerance applies")
    if result.requested != result.backend:
        report.notes.append(f"requested {result.requested}, ran {result.backend} (fallback allowed)")
    return report
