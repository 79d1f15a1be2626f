"""Whole-slide inference in the indexed layout: Phi once per tile, neighbours gathered by index.

Two passes over a bundle that holds ``neighbor_index`` (``(N, K)``, ``-1`` for a zero row) instead of neighbour
features:

1. the **encoder** runs every item's own tile through the Phi ensemble, batch by batch, into a table of
   embeddings; row 0 of the table is the embedding of an all-zero tile (computed by the same encoder), which is
   what index ``-1`` gathers, exactly as the reference's zero padding;
2. the **head** gathers each batch's neighbour embeddings from the table (in the prefetch thread, overlapping the
   runner's work), adds the item's own embedding and its sub-spots, and applies the pooling and Rho.

The table (``(N + 1) x H``, fp32 or fp16) is the only thing kept for the whole slide. It lives in memory when it
takes at most a quarter of the memory available, and otherwise in a memory-mapped temporary file beside the output
(``table="memory"`` / ``"mmap"`` force either). Everything else streams, so memory does not grow with the slide
beyond the table.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .._pages import release_rows
from ..checks import available_memory
from ..data import MAX_BAG
from ..errors import CheckpointError, ConfigError, InputError, advice, option_value
from ..fileio import ensure_free_space, preallocate, temp_prefix, temporary_file
from ..export.metadata import (
    ENCODER_FILE,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    HEAD_EMBEDDING,
    HEAD_FILE,
    HEAD_NEIGHBORS,
    OUTPUT,
)
from .base import ModelInfo, Runner, TensorSpec, check_feed, conform_feed
from .gather_graph import ITEM_INDEX
from .stream import _progress, batches, predict

TABLE_CHOICES = ("auto", "memory", "mmap", "device")
TABLE_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class ModuleRunner(Runner):
    """Runs one of the indexed layout's torch modules (encoder or head) behind the runner contract.

    Args:
        module: The module; called with its inputs as keyword-free positional arguments in ``inputs`` order.
        inputs: Input specs in call order.
        output: The output's name.
        info: Model metadata.
        device: ``cpu`` or ``cuda[:K]``.
        backend: Backend name in reports.
        output_width: The output's size per item (the embedding size for the encoder, G for the head): with it, the
            runner streams through the overlapping pipeline on a GPU.
    """

    def __init__(self, module, inputs: dict[str, TensorSpec], output: str, info: ModelInfo, device: str = "cpu",
                 backend: str = "torch", output_width: int | None = None):  # fmt: skip
        import torch

        self.backend = backend
        super().__init__(info, backend)
        self._module = module
        self._specs = inputs
        self._output = output
        self._device = torch.device(device)
        self._output_width = output_width

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self._output,)

    @property
    def device(self) -> str:
        return str(self._device)

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        return self._specs

    def activate_impl(self) -> None:
        self._module = self._module.to(self._device).eval()

    def deactivate_impl(self) -> None:
        pass

    def _forward(self, inputs: dict) -> dict:
        """The module on device tensors (the pipeline's compute step, and :meth:`infer`'s)."""
        return {self._output: self._module(*[inputs[name] for name in self._specs]).float()}

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            inputs = {name: torch.from_numpy(feed[name]).to(self._device, non_blocking=True) for name in self._specs}
            y = self._forward(inputs)[self._output]
        return {self._output: y.cpu().numpy()}

    def pipeline_adapter(self, batch_size: int):
        if self._device.type != "cuda" or not self.is_active or self._output_width is None:
            return None
        from .torch_runner import TorchCudaAdapter, _pinned_allocate

        outputs = {self._output: ((self._output_width,), np.dtype(np.float32))}
        return TorchCudaAdapter(self._device, self._forward, outputs), _pinned_allocate


class DeviceGatherHeadRunner(ModuleRunner):
    """The torch head on a GPU, gathering neighbour embeddings on the device.

    Gathering on the host and copying ``(B, K, H)`` embeddings to the GPU for every batch moves K times more data
    than the head computes on (44 x 4 KiB per Xenium cell), and bounds the GPU by the host's memory bandwidth. This
    runner takes the slide's table once (:meth:`load_table`) and then ``neighbor_index`` in place of
    ``neighbor_embeddings``, so only the index crosses the bus.
    """

    def __init__(self, module, inputs: dict[str, TensorSpec], output: str, info: ModelInfo, device: str = "cuda",
                 backend: str = "torch-cuda", output_width: int | None = None):  # fmt: skip
        specs = {}
        for name, spec in inputs.items():
            if name == HEAD_NEIGHBORS:
                specs["neighbor_index"] = TensorSpec("neighbor_index", ("batch", "n_neighbors"), "int64")
            else:
                specs[name] = spec
        super().__init__(module, specs, output, info, device, backend, output_width)
        self._table = None

    def load_table(self, table: np.ndarray) -> None:
        """Copy the slide's embedding table (row 0: the zero tile's embedding) to the device, once per slide."""
        import torch

        self._table = torch.from_numpy(np.ascontiguousarray(table)).to(self._device)

    def deactivate_impl(self) -> None:
        self._table = None

    def _forward(self, inputs: dict) -> dict:
        if self._table is None:
            raise RuntimeError(f"{self.name}: load_table() the slide's embeddings before infer()")
        gathered = {name: self._table[t + 1] if name == "neighbor_index" else t for name, t in inputs.items()}
        return super()._forward(gathered)  # (B, K) indices -> (B, K, H) embeddings


@dataclass
class IndexedPipeline:
    """An encoder runner and a head runner of one model, and what they share.

    Attributes:
        encoder: ``tile (B, 1, D) -> embedding (B, H)``.
        head: ``embedding``, [``subspot``], ``neighbor_embeddings`` -> ``expression``.
        info: Model metadata (``layout == "indexed"``).
        embedding_size: ``H``.
        table_dtype: ``fp32`` or ``fp16``.
    """

    encoder: Runner
    head: Runner
    info: ModelInfo
    embedding_size: int
    table_dtype: str = "fp32"

    @property
    def backend(self) -> str:
        return self.head.backend

    def feature_dtypes(self) -> dict[str, str]:
        """The graphs' types for the bundle's feature arrays: the own tile's (the encoder's input) and the
        sub-spots' (the head's), float16 in an export with fp16 inputs."""
        own = self.info.mode_spec.bags[0].name
        dtypes = {own: next(iter(self.encoder.get_input_metadata().values())).dtype}
        head = self.head.get_input_metadata()
        if "subspot" in head:
            dtypes["subspot"] = head["subspot"].dtype
        return dtypes

    def __enter__(self) -> "IndexedPipeline":
        self.encoder.activate()
        self.head.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.encoder.deactivate()
        self.head.deactivate()


def pipeline_from_model(model, device: str = "cpu", precision: str = "fp32", optimize: bool = True,
                        table_dtype: str = "fp32", device_gather: bool | None = None) -> IndexedPipeline:  # fmt: skip
    """The ``torch`` backend of the indexed layout: the exporter's encoder and head modules, from a model or path.

    ``device_gather`` (default: on a GPU) keeps the table on the device and gathers neighbours there.
    """
    from ..export import build_export_module
    from ..export.indexed import build_indexed_modules
    from ..export.metadata import head_input_names
    from .torch_runner import load_model

    source = str(model) if isinstance(model, (str, Path)) else ""
    model = load_model(model)
    dense = build_export_module(model, precision=precision, optimize=optimize)
    encoder, head = build_indexed_modules(dense, table_dtype)
    info = ModelInfo.from_model(model, source=source, precision=precision)
    info.layout = "indexed"
    d, h = model.input_size, model.phi2rho_size
    table = "float16" if table_dtype == "fp16" else "float32"
    enc_specs = {ENCODER_INPUT: TensorSpec(ENCODER_INPUT, ("batch", 1, d))}
    head_specs = {}
    for name in head_input_names(model.mode):
        shape = {HEAD_EMBEDDING: ("batch", h), "subspot": ("batch", "n_subspot", d),
                 HEAD_NEIGHBORS: ("batch", "n_neighbors", h)}[name]  # fmt: skip
        head_specs[name] = TensorSpec(name, shape, "float32" if name == "subspot" else table)
    backend = "torch-cuda" if device.startswith("cuda") else "torch"
    # On a GPU the table goes to the device once and neighbours are gathered there; on the CPU the prefetch thread
    # gathers them while the head runs.
    device_gather = backend == "torch-cuda" if device_gather is None else device_gather
    head_runner = DeviceGatherHeadRunner if device_gather else ModuleRunner
    return IndexedPipeline(
        ModuleRunner(encoder, enc_specs, "embedding", info, device, backend, output_width=h),
        head_runner(head, head_specs, OUTPUT, info, device, backend, output_width=model.output_size),
        info, h, table_dtype,
    )  # fmt: skip


def pipeline_from_folder(folder, backend: str | None = None, options=None, allow_fallback: bool = False,
                         device_gather: bool | None = None):  # fmt: skip
    """The indexed layout exported by ``deepspot export --layout indexed``: two ONNX graphs on one backend.

    ``device_gather`` (default: on ``ort-cuda``) binds the slide's table to the head once and gathers in the graph
    (:class:`~deepspot.runtime.gather_graph.OrtGatherHead`); onnxruntime backends only.

    Raises:
        CheckpointError: A graph is missing, was not exported in the indexed layout, or the two graphs come from
            different exports (their ``pair_id`` differs).
    """
    from ..export import model_info, read_model_metadata
    from ..metacheck import check_size
    from .backends import load_runner

    folder = Path(folder)
    paths = {role: folder / name for role, name in (("encoder", ENCODER_FILE), ("head", HEAD_FILE))}
    metas = {}
    for role, path in paths.items():
        if not path.is_file():
            raise CheckpointError(f"{folder}: no {path.name}; an indexed export holds {ENCODER_FILE} and {HEAD_FILE}")
        meta = read_model_metadata(path)
        if meta.get("layout") != "indexed" or meta.get("role") != role:
            how = advice("deepspot.export.indexed.export_indexed", "deepspot export --layout indexed")
            raise CheckpointError(f"{path}: not the {role} of an indexed export ({how})")
        metas[role] = meta
    pairs = [metas[role].get("pair_id") for role in ("encoder", "head")]
    if not all(isinstance(p, str) and p for p in pairs):
        raise CheckpointError(f"{folder}: a graph has no pair_id, so nothing shows that the two come from one export")
    if pairs[0] != pairs[1]:
        raise CheckpointError(f"{folder}: {ENCODER_FILE} and {HEAD_FILE} come from different exports (pair_id differs)")
    table_dtype = metas["head"].get("table_dtype", "fp32")
    if table_dtype not in TABLE_DTYPES:
        raise CheckpointError(f"{folder}: unknown table_dtype {str(table_dtype)[:16]!r} (fp32 or fp16)")
    h = check_size(metas["head"].get("embedding_size"), "embedding_size", str(paths["head"]))
    encoder = load_runner(paths["encoder"], backend, options, allow_fallback)
    head = load_runner(paths["head"], backend, options, allow_fallback)
    if device_gather is None:
        device_gather = head.backend == "ort-cuda"
    if device_gather:
        from .gather_graph import OrtGatherHead
        from .ort import OrtRunner

        if not isinstance(head, OrtRunner):
            raise ConfigError(f"the table on the device needs an onnxruntime backend or torch, not {head.backend}")
        head = OrtGatherHead(head)
    encoder_out = {t.name: t.shape for t in model_info(paths["encoder"]).outputs}.get(ENCODER_OUTPUT)
    head_in = {t.name: t.shape for t in model_info(paths["head"]).inputs}.get(HEAD_EMBEDDING)
    widths = {"encoder output": encoder_out, "head input": head_in}
    for what, shape in widths.items():
        width = None if not shape else shape[-1]
        if isinstance(width, int) and width != h:
            raise CheckpointError(f"{folder}: the {what} is {width} wide, the metadata says embedding_size={h}")
    info = head.info
    info.layout = "indexed"
    return IndexedPipeline(encoder, head, info, h, table_dtype)


def is_indexed_folder(model: Any) -> bool:
    return isinstance(model, (str, Path)) and Path(model).is_dir() and (Path(model) / HEAD_FILE).is_file()


def table_location(n: int, h: int, dtype: np.dtype, choice: str = "auto") -> str:
    """``memory`` or ``mmap``: in memory when the table takes at most a quarter of the available memory."""
    if choice not in TABLE_CHOICES:
        raise ConfigError(f"unknown table location {choice!r}; expected one of: {', '.join(TABLE_CHOICES)}")
    if choice != "auto":
        return choice
    return "memory" if (n + 1) * h * np.dtype(dtype).itemsize <= available_memory() // 4 else "mmap"


def table_phrase(location: str) -> str:
    """``in memory``, ``in mmap`` or ``on the device``, for reports."""
    return "on the device" if location == "device" else f"in {location}"


@contextlib.contextmanager
def embedding_table(n: int, h: int, dtype: np.dtype, location: str, folder: Path | None) -> Iterator[np.ndarray]:
    """An ``(n + 1, h)`` table in memory, or in a memory-mapped temporary file in ``folder`` (deleted afterwards)."""
    if location == "memory":
        yield np.empty((n + 1, h), dtype=dtype)
        return
    folder = folder or Path(tempfile.gettempdir())  # the system's temporary folder by default
    ensure_free_space(folder, (n + 1) * h * np.dtype(dtype).itemsize, "the embedding table")
    with temporary_file(folder, temp_prefix("deepspot-embeddings"), ".tmp.npy") as name:
        table = np.lib.format.open_memmap(name, mode="w+", dtype=dtype, shape=(n + 1, h))
        preallocate(name)  # a full disk is an error now, not a SIGBUS while the table is written
        yield table


def check_indexed_inputs(
    arrays: Mapping[str, np.ndarray],
    info: ModelInfo,
    source: str = "input",
    max_bag: int = MAX_BAG,
    dtypes: Mapping[str, Any] | None = None,
) -> int:
    """Check an indexed bundle's arrays against the model: own tiles, sub-spots, the index; return ``N``.

    Values must be finite once cast to the graphs' input types (``dtypes`` by bundle array; float32 by default)."""
    from ..data import check_bag_size, check_neighbor_index
    from .stream import report_nonfinite

    mode = info.mode_spec
    own = mode.bags[0].name
    tiles = {own: arrays[own]} | ({"subspot": arrays["subspot"]} if "subspot" in mode.input_names else {})
    n = tiles[own].shape[0]
    for name, a in tiles.items():
        if a.dtype.kind != "f":
            raise InputError(f"{source}: {name!r} must be floating point, got {a.dtype}")
        if a.shape[-1] != info.input_size:
            raise InputError(f"{source}: {name!r} has {a.shape[-1]} features, the model expects {info.input_size}")
        if a.shape[0] != n:
            raise InputError(f"{source}: {name!r} has {a.shape[0]} rows, {own!r} has {n}")
        if a.ndim == 3 and name == "subspot":
            check_bag_size(name, a.shape[1], source, max_bag)
        report_nonfinite(a, name, source, (dtypes or {}).get(name, np.float32))
    check_neighbor_index(arrays["neighbor_index"], n, source=source, max_bag=max_bag)
    return int(n)


def predict_indexed(
    pipeline: IndexedPipeline,
    arrays: Mapping[str, np.ndarray],
    batch_size: int = 256,
    out: np.ndarray | None = None,
    inverse_transform: bool = False,
    progress: bool = False,
    table: str = "auto",
    table_folder: Path | None = None,
    timings: dict[str, float] | None = None,
    check_finite: bool = False,
) -> tuple[np.ndarray, str]:
    """Run both passes over a slide; write into ``out`` (allocated if ``None``); return it and the table location.

    Args:
        pipeline: Encoder and head runners, active.
        arrays: ``spot``/``cell`` ``(N, D)`` or ``(N, 1, D)``, ``subspot`` where the mode has one, ``neighbor_index``.
        batch_size: Items per batch in both passes.
        out: ``(N, G)`` float32 output, e.g. a memory map.
        inverse_transform: Map predictions to the original scale with the model's scaler.
        progress: Show progress bars with items/s.
        table: Where the embedding table lives on the host: ``auto``, ``memory`` or ``mmap`` (``device``: as
            ``auto``; whether the head gathers from a copy on the device is the pipeline's choice).
        table_folder: Folder of the memory-mapped table (default: the system's temporary folder).
        timings: Filled with the seconds of each phase: ``encoder`` (pass 1), ``table`` (the finished table copied
            to the device; about 0 where the encoder writes it there or the head gathers on the host) and ``head``
            (pass 2).
        check_finite: Raise at the first prediction that is NaN or inf (see :func:`~.stream.predict`).
    """
    info = pipeline.info
    mode = info.mode_spec
    own_name = mode.bags[0].name
    own = arrays[own_name]
    own = own[:, None, :] if own.ndim == 2 else own  # (N, 1, D)
    index = arrays["neighbor_index"]
    n, h = own.shape[0], pipeline.embedding_size
    dtype = TABLE_DTYPES[pipeline.table_dtype]
    device_gather = hasattr(pipeline.head, "load_table")
    # The encoder writes the table where the head reads it (no embedding crosses the bus), when both bind device
    # buffers: the onnxruntime GPU backends (and ort-cpu with IO binding, which runs the same code on the host).
    on_device = (device_gather and hasattr(pipeline.head, "device_table")
                 and getattr(pipeline.encoder, "io_binding", False))  # fmt: skip
    location = table_location(n, h, dtype, "auto" if table == "device" else table)
    clock = {"start": time.perf_counter()}
    with contextlib.nullcontext() if on_device else embedding_table(n, h, dtype, location, table_folder) as emb:
        # Pass 1: every tile once. Row 0 is the zero tile's embedding: what index -1 gathers.
        zero = np.zeros((1, 1, info.input_size), dtype=np.float32)
        if on_device:
            address, row = pipeline.head.device_table(n + 1, h)
            pipeline.encoder.infer_into({ENCODER_INPUT: zero}, ENCODER_OUTPUT, address)
            _encode_on_device(pipeline.encoder, own, batch_size, address + row, row, progress)
        else:  # into the table on the host: batch by batch, or through the encoder's pipeline (torch-cuda)
            emb[0] = pipeline.encoder.infer({ENCODER_INPUT: zero})[ENCODER_OUTPUT][0]
            predict(pipeline.encoder, {ENCODER_INPUT: own}, batch_size, out=emb[1:], progress=progress)

        # Pass 2: gather neighbours (in the prefetch thread, or on the device), pool, Rho.
        head_inputs = pipeline.head.get_input_metadata()
        table_type = np.dtype(dtype).name
        if ITEM_INDEX in head_inputs:  # the head gathers the item's own embedding too: only indices cross the bus
            inputs = {ITEM_INDEX: np.arange(n, dtype=np.int64), "neighbor_index": index}
        else:
            inputs = {HEAD_EMBEDDING: emb[1:], "neighbor_index": index}
        if "subspot" in mode.input_names:
            inputs["subspot"] = arrays["subspot"]

        pool_while_gathering = neighbor_pool(info) == "max"

        def gather(start: int, stop: int, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            idx = feed.pop("neighbor_index").astype(np.int64, copy=False) + 1  # a small int type would wrap
            if pool_while_gathering and idx.shape[1] > 1:
                # Max-pool as the rows are gathered, one neighbour column at a time (B x H stays in cache), instead
                # of writing the (B, K, H) bag for the head to read back: the head gets a bag of one, and pooling a
                # bag of one is the identity. np.maximum propagates NaN as torch.amax does, so the result is exact.
                pooled = np.take(emb, idx[:, 0], axis=0)
                for k in range(1, idx.shape[1]):
                    np.maximum(pooled, np.take(emb, idx[:, k], axis=0), out=pooled)
                feed[HEAD_NEIGHBORS] = pooled[:, None, :].astype(table_type, copy=False)  # (B, 1, H)
            else:
                feed[HEAD_NEIGHBORS] = np.take(emb, idx, axis=0).astype(table_type, copy=False)  # (B, K, H)
            return feed

        clock["encoder"] = time.perf_counter()
        if device_gather and not on_device:
            pipeline.head.load_table(emb)
        clock["table"] = time.perf_counter()
        # Batch by batch, or through the head's overlapping pipeline where it has one (ort-cuda).
        out = predict(pipeline.head, inputs, batch_size, out=out, inverse_transform=inverse_transform,
                      progress=progress, prepare=None if device_gather else gather,
                      check_finite=check_finite)  # fmt: skip
        clock["head"] = time.perf_counter()
    if timings is not None:
        marks = list(clock.values())
        timings.update({phase: b - a for phase, a, b in zip(list(clock)[1:], marks, marks[1:])})
    return out, "device" if device_gather else location


def _encode_on_device(encoder, own: np.ndarray, batch_size: int, address: int, row: int, progress: bool) -> None:
    """Pass 1 into the table on the device, item ``i`` at ``address + i * row``: through the encoder's overlapping
    pipeline where it has one (ort-cuda: the next batch's copy to the device runs while this one computes), else batch
    by batch."""
    from .pipeline import run_pipeline

    specs = encoder.get_input_metadata()
    check_feed(conform_feed({ENCODER_INPUT: own[:1]}, specs, where=encoder.name), specs, where=encoder.name)
    pipelined = encoder.pipeline_adapter(batch_size)
    with _progress(progress, own.shape[0]) as bar:
        if pipelined is None:
            for start, stop, feed in batches({ENCODER_INPUT: own}, batch_size):
                encoder.infer_into(feed, ENCODER_OUTPUT, address + start * row, check_inputs=False)
                bar(stop - start)
            return
        adapter = pipelined[0]
        adapter.sink = lambda slot: address + slot.start * row
        try:
            dtypes = {ENCODER_INPUT: specs[ENCODER_INPUT].dtype}
            for start, stop, _ in run_pipeline({ENCODER_INPUT: own}, adapter, batch_size, dtypes=dtypes):
                bar(stop - start)
        finally:
            adapter.sink = None


def neighbor_pool(info: ModelInfo) -> str:
    """How the model pools its neighbours' embeddings: ``max``, ``mean`` or ``sum`` (``agg`` resolved)."""
    bag = next(b for b in info.mode_spec.bags if b.name == "neighbors")
    return str(info.config.get("agg_neighbors", "max")) if bag.pool == "agg" else bag.pool


def load_pipeline(model, backend: str | None = None, options=None, allow_fallback: bool = False,
                  batch_size: int = 256, table_dtype: str = "fp32", table: str = "auto") -> IndexedPipeline:  # fmt: skip
    """The indexed pipeline of a model: an indexed export folder on an ONNX/TensorRT backend, or a checkpoint (or
    in-memory model) on ``torch`` / ``torch-cuda``.

    ``table``: ``device`` keeps the slide's embedding table where the head runs and gathers there; ``memory`` or
    ``mmap`` gather on the host; ``auto`` gathers on the device on ``ort-cuda`` and ``torch-cuda``.

    Raises:
        ConfigError: A per-item ``.onnx`` or ``.plan`` (it has no encoder), or a backend that cannot run the source.
        BackendUnavailableError: The backend cannot run here (see :func:`~deepspot.runtime.backends.select_backend`).
    """
    from .artifacts import artifact_kind
    from .backends import RunnerOptions, get_backend, select_backend

    if table not in TABLE_CHOICES:
        raise ConfigError(f"unknown table location {table!r}; expected one of: {', '.join(TABLE_CHOICES)}")
    device_gather = None if table == "auto" else table == "device"
    options = options or RunnerOptions()
    options.batch_size = batch_size
    if is_indexed_folder(model):
        return pipeline_from_folder(model, backend, options, allow_fallback, device_gather)
    if isinstance(model, (str, Path)) and Path(model).is_dir():
        raise CheckpointError(f"{model}: a folder without {HEAD_FILE}; expected an indexed export or a checkpoint")
    kind = artifact_kind(model)
    if kind != "model":
        raise ConfigError(
            f"{model}: a per-item graph cannot run the indexed layout (chosen because the bundle holds "
            "neighbor_index); "
            + advice("export it with deepspot.export.indexed.export_indexed", "export with --layout indexed")
            + f", or pass {option_value('layout', 'dense')} to gather neighbour bags per batch"
        )
    requested = backend or "torch"
    if get_backend(requested).runs != "model":
        raise ConfigError(f"backend {requested!r} runs ONNX graphs; export the indexed layout for it first")
    if options.tf32:
        raise ConfigError("tf32 in the indexed layout needs an indexed export on ort-cuda or tensorrt; the torch "
                          "pipeline computes in fp32")  # fmt: skip
    if options.io not in (None, "fp32"):
        raise ConfigError(f"io={options.io} is for the dense layout on the torch backends; the torch indexed pipeline "
                          "takes fp32 features (an fp16 bundle's are cast batch by batch)")  # fmt: skip
    selection = select_backend(requested, allow_fallback, kind="model")
    device = f"cuda:{options.device}" if selection.backend == "torch-cuda" else "cpu"
    pipeline = pipeline_from_model(model, device, options.precision or "fp32", table_dtype=table_dtype,
                                   device_gather=device_gather)  # fmt: skip
    pipeline.head.selection = selection
    return pipeline


#: Batches after which :func:`dense_from_index` gives back the pages of the memory-mapped tiles it gathered (they
#: would otherwise make the whole slide's features resident by the end).
RELEASE_EVERY = 16


def dense_from_index(arrays: Mapping[str, np.ndarray], mode) -> tuple[dict[str, np.ndarray], Any]:
    """Per-item inputs of an indexed bundle for a per-item graph: the own tile and sub-spots as they are, and the
    neighbour bags gathered from ``neighbor_index`` batch by batch (zeros for ``-1``) in the prefetch thread."""
    own_name = mode.bags[0].name
    own = arrays[own_name]
    flat = own.reshape(own.shape[0], -1)
    inputs = {own_name: own[:, None, :] if own.ndim == 2 else own, "neighbor_index": arrays["neighbor_index"]}
    if "subspot" in mode.input_names:
        inputs["subspot"] = arrays["subspot"]

    done = [0]

    def gather(start: int, stop: int, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        idx = feed.pop("neighbor_index")
        done[0] += 1
        if done[0] % RELEASE_EVERY == 0:  # neighbours lie anywhere: give back every page gathered so far, now and then
            release_rows(flat, 0, flat.shape[0])
        # Indexing, not np.take: a .npz member memory-mapped in place is not aligned (np.savez puts it at any
        # offset), and np.take then copies the whole array on every call (O(N) per batch: quadratic in the slide),
        # faulting all of its pages into this process.
        rows = flat[np.maximum(idx, 0)].astype(np.float32, copy=False)  # (B, K, D)
        rows[idx < 0] = 0.0  # the reference's zero padding
        feed["neighbors"] = rows
        return feed

    return inputs, gather
