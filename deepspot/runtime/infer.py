"""``infer``: a model file and a feature bundle in, predictions out (``.npy``, ``.npz`` or ``.h5ad``), streamed.

The output is written atomically: predictions stream into a memory-mapped temporary ``.npy`` in the output's
folder, and the finished file is renamed into place (or packed into the ``.npz`` / ``.h5ad``) only after the last
batch. A failed or interrupted run leaves nothing that looks like an output.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checks import at_least
from ..data import FEATURE_KEYS, MAX_BAG
from ..errors import ConfigError, DeepSpotWarning, advice, option, option_value
from ..fileio import (
    atomic_path,
    check_clobber,
    check_output_file,
    ensure_free_space,
    preallocate,
    remove_leftovers,
    temp_prefix,
    temporary_file,
)
from .backends import RunnerOptions, load_runner
from .stream import check_inputs, predict

OUTPUT_SUFFIXES = (".npy", ".npz", ".h5ad")
COORD_KEYS = ("x_array", "y_array", "x_pixel", "y_pixel")


@dataclass
class InferResult:
    """What :func:`infer` did.

    Attributes:
        output: The file written.
        n: Items predicted.
        genes: Genes per item.
        seconds: Wall time of the inference loop.
        items_per_s: Throughput of the inference loop.
        backend: The backend that ran.
        requested: The backend asked for (differs only after an allowed fallback).
        batch_size: Items per batch.
        inverse_transform: Whether predictions are on the original scale.
        layout: ``dense`` or ``indexed``.
        table: Indexed layout: where the embedding table lived (``memory`` or ``mmap``).
    """

    output: Path
    n: int
    genes: int
    seconds: float
    items_per_s: float
    backend: str
    requested: str
    batch_size: int
    inverse_transform: bool
    layout: str = "dense"
    table: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "output": str(self.output)}


def check_output_path(output: str | Path, inputs: Sequence[Any] = (), no_clobber: bool = False) -> Path:
    """Refuse, before any work, an unknown output type, a missing folder, an output that is one of the run's
    ``inputs`` (or lies inside an input folder), and with ``no_clobber`` an output that exists."""
    output = Path(output)
    if output.suffix.lower() not in OUTPUT_SUFFIXES:
        raise ConfigError(f"{output}: unknown output type; expected one of {', '.join(OUTPUT_SUFFIXES)}")
    check_output_file(output, "output", inputs)
    check_clobber(output, no_clobber)
    # What an earlier run here left when it was killed (SIGKILL runs no clean-up).
    remove_leftovers(output.parent if str(output.parent) else Path("."))
    return output


class ModelSession:
    """A model loaded once per process: its runner (dense layout) and its pipeline (indexed layout) are built on first
    use and stay active until :meth:`close`, so a cohort of slides pays for loading and building once.

    Args: as :func:`infer`'s, and ``shared``: the session serves several bundles (a cohort), so nothing is fitted to
    the first one (``torch-cuda`` takes an fp16 bundle's features as they are only for a bundle of its own: in a
    cohort, a later fp32 slide would be cast to fp16, and its results would depend on the order of the slides).
    """

    def __init__(self, model: Any, backend: str | None = None, options: RunnerOptions | None = None,
                 allow_fallback: bool = False, table_dtype: str = "fp32", shared: bool = False):  # fmt: skip
        self.model, self.backend, self.allow_fallback, self.table_dtype = model, backend, allow_fallback, table_dtype
        self.shared = shared
        self.options = options or RunnerOptions()
        self._runner = None
        self._pipeline = None
        self._hash: str | None = None

    @property
    def model_hash(self) -> str | None:
        """SHA-256 of the model file (of both graphs for an indexed export); ``None`` for an in-memory model."""
        if self._hash is None and isinstance(self.model, (str, os.PathLike)):
            self._hash = model_fingerprint(self.model)
        return self._hash

    def dense(self, batch_size: int, bag_sizes: dict[str, int], fp16_features: bool = False):
        if self._runner is None:
            self.options.batch_size = batch_size
            self.options.bag_sizes = bag_sizes
            if fp16_features and self.options.io is None and self.backend == "torch-cuda" and not self.shared:
                self.options.io = "fp16"  # the bundle's fp16 features cross the bus as they are (half the bytes)
            runner = load_runner(self.model, self.backend, self.options, self.allow_fallback)
            if runner.info is None:
                raise ConfigError(f"{self.model}: not exported by deepspot (no model metadata); cannot match it to the bundle")
            self._runner = runner.activate()
        return self._runner

    def indexed(self, batch_size: int, table: str = "auto"):
        from .indexed import load_pipeline

        if self._pipeline is None:  # built by the first slide; a cohort runs every slide with the same settings
            pipeline = load_pipeline(self.model, self.backend, self.options, self.allow_fallback, batch_size,
                                     self.table_dtype, table)  # fmt: skip
            self._pipeline = pipeline.__enter__()
        return self._pipeline

    def close(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
        if self._pipeline is not None:
            self._pipeline.__exit__(None, None, None)
        self._runner = self._pipeline = None

    def __enter__(self) -> "ModelSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def model_fingerprint(model: str | os.PathLike) -> str:
    """SHA-256 of a model file, or of an indexed export's two graphs together."""
    import hashlib

    from ..fileio import file_sha256
    from .indexed import is_indexed_folder

    path = Path(model)
    if is_indexed_folder(path):
        from ..export.metadata import ENCODER_FILE, HEAD_FILE

        joined = "".join(file_sha256(path / name) for name in (ENCODER_FILE, HEAD_FILE))
        return hashlib.sha256(joined.encode()).hexdigest()
    return file_sha256(path)


def infer(
    model: Any,
    bundle: str | Path,
    output: str | Path,
    backend: str | None = None,
    batch_size: int | None = None,
    options: RunnerOptions | None = None,
    inverse_transform: bool = False,
    allow_fallback: bool = False,
    progress: bool = False,
    layout: str | None = None,
    table: str = "auto",
    table_dtype: str = "fp32",
    max_bag: int = MAX_BAG,
    no_clobber: bool = False,
    session: ModelSession | None = None,
) -> InferResult:
    """Predict every item of a bundle and write the predictions.

    Args:
        model: A checkpoint (runs on ``torch``), an ``.onnx`` file, a ``.plan``, or an in-memory model.
        bundle: A feature bundle's path (``.npz`` or a directory of ``.npy``, memory-mapped), a
            :class:`~deepspot.data.Bundle` (:func:`~deepspot.data.load_bundle`), or its arrays by name in memory
            (``spot``, ``subspot``, ``neighbors``, optionally ``barcode``, ``x_pixel``, ... as in a file).
        output: ``.npy`` (predictions), ``.npz`` (``predictions``, ``barcodes``, ``genes``) or ``.h5ad`` (an AnnData:
            barcodes as ``obs_names``, gene names as ``var_names``, ``obsm["spatial"]`` from the pixel coordinates).
        backend: Backend name; default ``torch`` for a checkpoint, ``ort-cpu`` for ONNX, ``tensorrt`` for a plan.
        batch_size: Items per batch; default :func:`default_batch_size` (large on a GPU).
        options: Runner options (device, precision, threads, ...); ``batch_size`` and the data's bag sizes are
            filled in here.
        inverse_transform: Map predictions to the original scale with the model's scaler.
        allow_fallback: Permit another backend when ``backend`` cannot run here (announced with a warning).
        progress: Show a progress bar with items/s.
        layout: ``indexed`` (an encoder pass, then a head that gathers neighbours by index) or ``dense`` (one graph
            per item). Default: ``indexed`` when the bundle holds ``neighbor_index``, else ``dense``. A dense graph
            also runs an indexed bundle: each batch's neighbour bags are gathered from the index.
        table: Indexed layout: where the embedding table lives, ``auto``, ``memory``, ``mmap`` or ``device`` (a
            copy where the head runs, gathered from in the graph; ``auto``: on ``ort-cuda`` and ``torch-cuda``).
        table_dtype: Indexed layout from a checkpoint: ``fp32`` or ``fp16`` table (an export fixes its own).
        max_bag: Largest bag (sub-spots or neighbours per item) accepted.
        no_clobber: Refuse to replace an existing output (by default it is replaced, atomically).
        session: A :class:`ModelSession` to reuse (a cohort's); by default one is made for this call and closed.

    Returns:
        An :class:`InferResult`: the output path, items, genes, seconds, items/s and the backend that ran.

    Raises:
        DeepSpotError: Bad input (reported before anything runs), unavailable backend, unwritable output.
        TypeError: ``bundle`` is neither a path, a bundle nor arrays by name.
    """
    from ..data import Bundle, as_bundle

    check_layout_options(layout, table, table_dtype)
    output = check_output_path(output, (bundle.path if isinstance(bundle, Bundle) else bundle, model), no_clobber)
    data = as_bundle(bundle, mmap=True)
    layout = resolve_layout(layout, data, model)
    if batch_size is not None:
        at_least(batch_size, option("batch_size"))  # 0 is not "the default"
    defaulted = batch_size is None
    batch_size = batch_size or default_batch_size(model, backend, data)
    owned = session is None
    session = session or ModelSession(model, backend, options, allow_fallback, table_dtype)
    try:
        if layout == "indexed":
            return _infer_indexed(session, data, output, batch_size, inverse_transform, progress, table, max_bag,
                                  no_clobber, defaulted)  # fmt: skip
        return _infer_dense(session, data, output, batch_size, inverse_transform, progress, max_bag, no_clobber,
                            defaulted)  # fmt: skip
    finally:
        if owned:
            session.close()


def _infer_dense(session, data, output, batch_size, inverse_transform, progress, max_bag, no_clobber,
                 defaulted=False) -> InferResult:  # fmt: skip
    features = {data[k].dtype for k in FEATURE_KEYS if k in data}
    runner = session.dense(batch_size, data_bag_sizes(data), fp16_features=features == {np.dtype(np.float16)})
    batch_size = _fallen_back_batch(batch_size, defaulted, runner)
    info = runner.info
    mode = data.validate(info.family, info.mode, input_size=info.input_size, allow_index=True)
    prepare = None
    dtypes = {name: spec.dtype for name, spec in runner.get_input_metadata().items()}  # the graph's: fp16 or fp32
    if data.layout == "indexed" and mode.has_neighbors:
        # A per-item graph on an indexed bundle: gather each batch's neighbour bags from the index.
        from .indexed import check_indexed_inputs, dense_from_index

        n = check_indexed_inputs(data.arrays, info, source=data.source, max_bag=max_bag, dtypes=dtypes)
        inputs, prepare = dense_from_index(data.arrays, mode)
    else:
        inputs = data.inputs(mode)
        n = check_inputs(inputs, info, source=data.source, max_bag=max_bag, dtypes=dtypes)
    _warn_if_empty(n, data)
    if inverse_transform:
        info.check_inverse_transform(session.model)
    genes = info.genes or (data.genes if data.genes and len(data.genes) == info.output_size else None)

    uns = _uns(runner.backend, info, "dense", session, output, inverse_transform)
    meta = (data.barcodes, genes, _coords(data), uns)
    with prediction_file(output, n, info.output_size, *meta, no_clobber=no_clobber) as out:
        start = time.perf_counter()
        predict(runner, inputs, batch_size, out=out, inverse_transform=inverse_transform, progress=progress,
                prepare=prepare, check_finite=True)  # fmt: skip
        seconds = time.perf_counter() - start
    selection = getattr(runner, "selection", None)
    return InferResult(
        output, n, info.output_size, seconds, n / max(seconds, 1e-9), runner.backend,
        selection.requested if selection else runner.backend, batch_size, inverse_transform or info.fold_scaler,
        "dense",
    )  # fmt: skip


def _fallen_back_batch(batch_size: int, defaulted: bool, runner) -> int:
    """The default batch of the backend that runs: a GPU backend's (chosen before loading) becomes the CPU's where the
    run fell back to a CPU backend."""
    from .backends import get_backend

    if defaulted and getattr(getattr(runner, "selection", None), "fell_back", False):
        if get_backend(runner.backend).device != "cuda":
            return CPU_BATCH
    return batch_size


def data_bag_sizes(data) -> dict[str, int]:
    """The bag size of every bag input a per-item graph will see, for the TensorRT optimisation profile (which
    pins each dynamic bag axis to it): the ``spot`` mode's bag of spot tiles, the sub-spots, and the neighbours,
    also where an indexed bundle gives them as ``neighbor_index`` (gathered into bags of its width batch by batch)."""
    sizes = {k: int(data[k].shape[1]) for k in ("spot", "subspot", "neighbors") if k in data and data[k].ndim == 3}
    if "neighbors" not in data and "neighbor_index" in data and data["neighbor_index"].ndim == 2:
        sizes["neighbors"] = int(data["neighbor_index"].shape[1])
    return sizes


#: Items per batch by default: on the CPU, and on a GPU by family (the workloads' GPU batches in BENCHMARKS.md: a GPU
#: needs large batches to be busy, and the copies of large batches run at the bus's full speed).
CPU_BATCH = 256
GPU_BATCH = {"spot": 4096, "cell": 1024}


def default_batch_size(model: Any, backend: str | None, data) -> int:
    """:data:`CPU_BATCH` on the CPU backends, :data:`GPU_BATCH` of the bundle's family on the GPU ones."""
    from .artifacts import artifact_kind
    from .backends import DEFAULT_BACKEND, get_backend
    from .indexed import is_indexed_folder

    kind = "onnx" if is_indexed_folder(model) else artifact_kind(model)
    if get_backend(backend or DEFAULT_BACKEND[kind]).device != "cuda":
        return CPU_BATCH
    return GPU_BATCH["cell" if "cell" in data else "spot"]


LAYOUTS = ("dense", "indexed")


TORCH_GRAPHS = ("eager", "export")


def check_backend_options(
    model: Any,
    backend: str | None,
    compile: bool = False,
    torch_graph: str = "eager",
    cache_dir: Any = None,
    table_dtype: str = "fp32",
    device: int = 0,
) -> str:
    """Refuse, before any work, options that the backend asked for (or the model's default one) would pass over:
    ``--compile`` and ``--torch-graph`` are the torch backends', ``--cache-dir`` holds TensorRT's engines, ``--device``
    names a GPU, and an exported model fixed its embedding table's dtype at export. With ``--allow-fallback`` the backend asked for
    counts. Returns that backend's name.

    Raises:
        ConfigError: Naming the option, the backend and what to do instead.
        CheckpointError: A model path of no known kind.
    """
    from .artifacts import artifact_kind
    from .backends import DEFAULT_BACKEND, get_backend
    from .indexed import is_indexed_folder

    check_layout_options(None, table_dtype=table_dtype)
    if torch_graph not in TORCH_GRAPHS:
        raise ConfigError(f"unknown {option('torch_graph')} {torch_graph!r}; expected one of: "
                          f"{', '.join(TORCH_GRAPHS)}")  # fmt: skip
    kind = "onnx" if is_indexed_folder(model) else artifact_kind(model)
    name = backend or DEFAULT_BACKEND[kind]
    b = get_backend(name)  # an unknown name is said as such, first
    torch = name in ("torch", "torch-cuda")
    if compile and not torch:
        raise ConfigError(f"{option('compile')} applies to the torch backends (torch, torch-cuda), not {name}; "
                          "leave it out")  # fmt: skip
    if torch_graph != "eager" and not torch:
        raise ConfigError(
            f"{option('torch_graph')} applies to the torch backends (torch, torch-cuda), not {name}; {model} runs as "
            "exported"
        )
    if at_least(device, option("device"), 0) != 0 and b.device == "cpu":
        raise ConfigError(f"{option_value('device', device)} names a GPU, but backend {name!r} runs on the CPU")
    if cache_dir is not None and name not in ("ort-trt", "tensorrt"):
        raise ConfigError(f"{option('cache_dir')} holds TensorRT engines: it applies to ort-trt and tensorrt, "
                          f"not {name}")  # fmt: skip
    if table_dtype != "fp32" and kind != "model":
        how = advice("deepspot.export.indexed.export_indexed(..., table_dtype='fp16')",
                     "deepspot export --layout indexed --table-dtype fp16")  # fmt: skip
        raise ConfigError(
            f"{option('table_dtype')} applies to the indexed layout run from a checkpoint; {model} is an export, whose "
            f"table dtype was fixed when it was exported ({how})"
        )
    return name


def check_layout_options(layout: str | None, table: str = "auto", table_dtype: str = "fp32") -> None:
    """Refuse an unknown ``layout``, ``table`` or ``table_dtype`` before any work, whichever layout the bundle then
    takes: a misspelt ``--table`` was passed over whenever the run took the dense layout.

    Raises:
        ConfigError: Naming the option and what it takes.
    """
    from .indexed import TABLE_CHOICES, TABLE_DTYPES

    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    if table not in TABLE_CHOICES:
        raise ConfigError(f"unknown table location {table!r}; expected one of: {', '.join(TABLE_CHOICES)}")
    if table_dtype not in TABLE_DTYPES:
        raise ConfigError(f"unknown table dtype {table_dtype!r}; expected one of: {', '.join(TABLE_DTYPES)}")


def resolve_layout(layout: str | None, data, model: Any) -> str:
    """The layout to run: as asked, else ``indexed`` for an indexed export or a bundle with ``neighbor_index`` (a
    per-item graph then says how to run it: ``--layout dense`` gathers the bags per batch).

    Raises:
        ConfigError: Unknown layout, or an indexed run asked of a bundle without ``neighbor_index``.
    """
    from .indexed import is_indexed_folder

    if layout is not None and layout not in LAYOUTS:
        raise ConfigError(f"unknown layout {layout!r}; expected one of: {', '.join(LAYOUTS)}")
    indexed_export = is_indexed_folder(model)
    if layout is None:
        layout = "indexed" if data.layout == "indexed" or indexed_export else "dense"
    if layout == "indexed" and "neighbor_index" not in data:
        build = advice("deepspot.layout.write_bundle(..., index=True)", "deepspot bundle --index")
        if indexed_export:
            raise ConfigError(
                f"{data.source}: holds neighbour features, and {model} is an indexed export, which takes neighbour "
                f"indices: build the bundle with {build}, or run the per-item .onnx export"
            )
        raise ConfigError(
            f"{data.source}: the indexed layout needs 'neighbor_index' in the bundle ({build}); this bundle holds "
            f"neighbour features, so run it with {option_value('layout', 'dense')}"
        )
    if layout == "dense" and is_indexed_folder(model):
        raise ConfigError(f"{model}: an indexed export (encoder + head) runs the indexed layout only")
    return layout


def _infer_indexed(session, data, output, batch_size, inverse_transform, progress, table, max_bag,
                   no_clobber, defaulted=False) -> InferResult:  # fmt: skip
    from .indexed import check_indexed_inputs, predict_indexed

    pipeline = session.indexed(batch_size, table)
    batch_size = _fallen_back_batch(batch_size, defaulted, pipeline.head)
    info = pipeline.info
    mode = data.validate(info.family, info.mode, input_size=info.input_size, allow_index=True)
    if not mode.has_neighbors:
        raise ConfigError(f"mode {mode.name!r} has no neighbours, so it has no indexed layout; use "
                          f"{option_value('layout', 'dense')}")  # fmt: skip
    n = check_indexed_inputs(data.arrays, info, source=data.source, max_bag=max_bag,
                             dtypes=pipeline.feature_dtypes())  # fmt: skip
    _warn_if_empty(n, data)
    if inverse_transform:
        info.check_inverse_transform(session.model)
    genes = info.genes or (data.genes if data.genes and len(data.genes) == info.output_size else None)
    uns = _uns(pipeline.backend, info, "indexed", session, output, inverse_transform)
    folder = output.parent if str(output.parent) else Path(".")
    meta = (data.barcodes, genes, _coords(data), uns)
    with prediction_file(output, n, info.output_size, *meta, no_clobber=no_clobber) as out:
        start = time.perf_counter()
        _, location = predict_indexed(pipeline, data.arrays, batch_size, out, inverse_transform, progress, table,
                                      table_folder=folder, check_finite=True)  # fmt: skip
        seconds = time.perf_counter() - start
    selection = getattr(pipeline.head, "selection", None)
    return InferResult(
        output, n, info.output_size, seconds, n / max(seconds, 1e-9), pipeline.backend,
        selection.requested if selection else pipeline.backend, batch_size, inverse_transform or info.fold_scaler,
        "indexed", location,
    )  # fmt: skip


def _warn_if_empty(n: int, data) -> None:
    if n == 0:  # a valid bundle (a slide with no tissue spots), but more often a mistake upstream: say so
        warnings.warn(f"{data.source}: the bundle holds no items, so the predictions have no rows", DeepSpotWarning,
                      stacklevel=3)  # fmt: skip


def _coords(data) -> dict[str, np.ndarray]:
    return {k: np.asarray(data[k]) for k in COORD_KEYS if k in data}


def _uns(backend: str, info, layout: str, session, output: Path, inverse_transform: bool) -> dict[str, Any] | None:
    """What ``.npz`` and ``.h5ad`` outputs record about the run; ``None`` for ``.npy``, which has no place for it (and
    then the model file is not hashed for nothing)."""
    from .._version import __version__

    if output.suffix.lower() == ".npy":
        return None
    return {
        "deepspot": {
            "backend": backend,
            "model": info.source,
            "model_sha256": session.model_hash,
            "deepspot_version": __version__,
            "family": info.family,
            "mode": info.mode,
            "precision": info.precision,
            "layout": layout,
            "inverse_transform": bool(inverse_transform or info.fold_scaler),
        }
    }


@contextlib.contextmanager
def _temporary_npy(folder: Path, n: int, g: int) -> Iterator[tuple[Path, np.memmap]]:
    with temporary_file(folder, temp_prefix("predictions"), ".tmp.npy") as path:
        yield path, _memmap_npy(path, n, g)


def _memmap_npy(path: Path, n: int, g: int) -> np.memmap:
    """An ``(n, g)`` float32 ``.npy`` memory map whose blocks are reserved on disk (a full disk is then an error
    here, not a SIGBUS later)."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, g))
    preallocate(path)
    return out


@contextlib.contextmanager
def prediction_file(
    output: Path,
    n: int,
    g: int,
    barcodes: Sequence[str] | None = None,
    genes: Sequence[str] | None = None,
    coords: dict[str, np.ndarray] | None = None,
    uns: dict[str, Any] | None = None,
    no_clobber: bool = False,
) -> Iterator[np.ndarray]:
    """Yield a writable ``(n, g)`` float32 memory map; on a clean exit put the finished file at ``output``.

    The free space for it is checked first: the predictions, and for ``.npz`` / ``.h5ad`` their temporary ``.npy``
    as well.
    """
    suffix = output.suffix.lower()
    folder = output.parent if str(output.parent) else Path(".")
    ensure_free_space(folder, n * g * 4 * (1 if suffix == ".npy" else 2), f"{n} x {g} predictions")
    if suffix == ".npy":
        with atomic_path(output, no_clobber=no_clobber) as tmp:
            out = _memmap_npy(tmp, n, g)
            yield out
            out.flush()
            del out
        return
    barcodes = [str(i) for i in range(n)] if barcodes is None else list(barcodes)
    genes = [f"gene_{j}" for j in range(g)] if genes is None else list(genes)
    with _temporary_npy(folder, n, g) as (tmp_npy, out):
        yield out
        out.flush()
        if suffix == ".npz":
            with (
                atomic_path(output, no_clobber=no_clobber) as tmp,
                zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf,
            ):
                zf.write(tmp_npy, "predictions.npy")  # copied in chunks: memory stays flat
                for key, values in (("barcodes", barcodes), ("genes", genes)):
                    with zf.open(f"{key}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, np.asarray(values, dtype=str), allow_pickle=False)
        else:
            from ..anndata_io import write_anndata

            write_anndata(output, out, barcodes=barcodes, genes=genes, obs_coords=coords, uns=uns, no_clobber=no_clobber)
        del out
