"""The indexed (whole-slide) layout: an encoder that runs Phi once per tile, and a head that gathers neighbours.

In the per-item layout every spot or cell carries copies of its neighbours' tiles, so the Phi ensemble runs again on
the same tile for every bag the tile appears in (45 times per cell for Xenium). On a slide each neighbour is another
item of the same slide, so its Phi embedding can be computed once and gathered by index:

1. the **encoder** maps each item's own tile ``(B, 1, D)`` to its Phi embedding ``(B, H)`` (the ensemble's lower
   median after ReLU), once per item, into a table of ``N x H``;
2. the **head** takes an item's own embedding ``(B, H)``, its sub-spot bag ``(B, S, D)`` where the mode has one
   (sub-spots belong to one spot only, so they are pooled there), and its neighbours' embeddings gathered from the
   table ``(B, K, H)``; it pools the neighbours as the model says and applies Rho.

Padding (index ``-1``, a zero row in the reference's loaders) gathers the embedding of an all-zero tile, which the
runtime computes with the encoder itself, so it is exactly what the per-item layout computes for a zero row.
Both modules reuse the per-item export module's building blocks, optimised or not, so both layouts share one
computation.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError, advice
from ..modes import Mode
from .graph import ExportModule, _cast, pool_bag
from .metadata import (  # noqa: F401  (the names live in the torch-free metadata module; re-exported here)
    ENCODER_FILE,
    ENCODER_INPUT,
    ENCODER_OUTPUT,
    HEAD_EMBEDDING,
    HEAD_FILE,
    HEAD_NEIGHBORS,
    OUTPUT,
    head_input_names,
    indexed_precision,
)


def check_indexed_mode(mode: Mode) -> None:
    """Only modes with neighbours have anything to gather."""
    if not mode.has_neighbors:
        raise ConfigError(
            f"mode {mode.name!r} ({mode.reference}) has no neighbours, so it has no indexed layout; use "
            + advice("the dense layout (layout='dense'; export_onnx exports it)", "--layout dense")
        )


class IndexedEncoder(nn.Module):
    """``tile (B, 1, D) -> embedding (B, H)``: the Phi ensemble's lower median of each item's own tile.

    The embedding is returned in ``table_dtype`` (``float32`` or ``float16``): the dtype the slide's table is kept in.
    """

    def __init__(self, dense: ExportModule, table_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.phi = dense.phi
        self.compute = dense.compute
        self.table_dtype = table_dtype

    def forward(self, tile: torch.Tensor) -> torch.Tensor:
        h = self.phi(tile.to(self.compute))  # (B, 1, H)
        return h.flatten(1).to(self.table_dtype)  # (B, H)


class IndexedHead(nn.Module):
    """``embedding (B, H)``, [``subspot (B, S, D)``], ``neighbor_embeddings (B, K, H)`` -> ``expression (B, G)``."""

    def __init__(self, dense: ExportModule):
        super().__init__()
        check_indexed_mode(dense.mode)
        self.mode = dense.mode
        self.phi = dense.phi
        self.rho = dense.rho
        self.scale_out = dense.scale_out
        self.compute = dense.compute
        self.io = dense.io
        self.neighbor_pool = dense.pools["neighbors"]
        self.has_subspot = "subspot" in dense.mode.input_names
        self.input_names = head_input_names(dense.mode)

    def forward(self, embedding: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        if self.has_subspot:
            subspot, neighbors = rest
            sub = pool_bag(self.phi(_cast(subspot, self.compute)), "sum")  # (B, H)
            parts = [_cast(embedding, self.compute), sub]
        else:
            (neighbors,) = rest
            parts = [_cast(embedding, self.compute)]
        parts.append(pool_bag(_cast(neighbors, self.compute), self.neighbor_pool))  # (B, K, H) -> (B, H)
        y = self.rho(torch.cat(parts, dim=1)).to(self.io)  # (B, m*H) -> (B, G)
        return y if self.scale_out is None else self.scale_out(y)


def build_indexed_modules(dense: ExportModule, table_dtype: str = "fp32") -> tuple[IndexedEncoder, IndexedHead]:
    """The encoder and head of the indexed layout, sharing the weights of a per-item export module.

    Args:
        dense: The per-item module (:func:`deepspot.export.build_export_module`), optimised or not, any precision.
        table_dtype: ``fp32`` or ``fp16``: the dtype of the embedding table kept for the whole slide.
    """
    check_indexed_mode(dense.mode)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16}
    if table_dtype not in dtypes:
        raise ConfigError(f"unknown table dtype {table_dtype!r}; expected fp32 or fp16")
    return IndexedEncoder(dense, dtypes[table_dtype]).eval(), IndexedHead(dense).eval()


# -- export ---------------------------------------------------------------------------------------------------------
def _trace(module: nn.Module, example: dict[str, torch.Tensor], outputs: list[str], axes: dict, opset: int):
    import io
    import warnings

    import onnx

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        with torch.no_grad():
            torch.onnx.export(
                module, tuple(example.values()), buffer, dynamo=False, input_names=list(example),
                output_names=outputs, dynamic_axes=axes, opset_version=opset, do_constant_folding=True,
            )  # fmt: skip
    return onnx.load_from_string(buffer.getvalue())


def example_slide(mode: Mode, input_size: int, n: int = 13, k: int = 5, s: int = 4, seed: int = 0) -> dict:
    """A small seeded slide that exercises every case: ``-1`` padding, repeated neighbours, an item that is its own
    neighbour and an item with no neighbours. Returns the indexed arrays and the equivalent dense bags."""
    import numpy as np

    from ..data import densify

    rng = np.random.default_rng(seed)
    own = rng.standard_normal((n, input_size), dtype=np.float32)
    index = rng.integers(-1, n, size=(n, k))
    index[0] = -1  # no neighbours at all
    index[1, :2] = 1  # its own neighbour
    index[2, :] = index[2, 0]  # repeated
    arrays = {"own": own, "neighbor_index": index}
    dense = {mode.bags[0].name: own[:, None, :], "neighbors": densify(own, index)}
    if "subspot" in mode.input_names:
        arrays["subspot"] = dense["subspot"] = rng.standard_normal((n, s, input_size), dtype=np.float32)
    return {"arrays": arrays, "dense": dense}


def export_indexed(
    model_or_checkpoint,
    output_dir,
    precision: str = "fp32",
    io_dtype: str | None = None,
    optimize: bool = True,
    fold_scaler: bool = False,
    table_dtype: str = "fp32",
    opset: int | None = None,
    validate: bool = True,
):
    """Export the indexed layout of a model with neighbours: ``DIR/encoder.onnx`` and ``DIR/head.onnx``.

    Both graphs carry the model's metadata, plus ``layout=indexed``, their ``role`` and a shared ``pair_id`` that
    ties them together (the runtime refuses an encoder and a head from different exports). The folder is written
    atomically (a temporary folder, then a rename) and validated first, like :func:`export_onnx`: on onnxruntime's
    CPU provider, on a slide with padding, repeated and self neighbours, against the PyTorch model's per-item output.

    Args:
        model_or_checkpoint: A model with neighbours, or the path of its checkpoint.
        output_dir: The folder to write; it must not exist yet.
        precision: ``fp32``, ``fp16`` or ``bf16`` compute.
        io_dtype: Dtype of the tiles and of the expression output (``fp32`` default).
        optimize: Fused Phi ensemble and folded Rho, as in the per-item export.
        fold_scaler: Append the scaler's inverse transform to the head.
        table_dtype: Dtype of the embeddings (``fp32`` or ``fp16``): what the slide's table holds.
        opset: ONNX opset (default: the per-item exporter's default).
        validate: Check parity on onnxruntime's CPU provider before putting the folder in place.

    Returns:
        The output folder.
    """
    import hashlib
    import json
    import shutil
    from pathlib import Path

    import onnx

    from ..errors import DeepSpotError
    from ..fileio import temporary_folder
    from .exporter import DEFAULT_OPSET, build_metadata, check_graph, check_opset, load_model, set_metadata
    from .graph import build_export_module
    from .specs import check_precision, resolve_io_dtype

    check_precision(precision)
    io_dtype = resolve_io_dtype(precision, io_dtype)
    opset = check_opset(DEFAULT_OPSET if opset is None else opset)
    out = Path(output_dir)
    if out.exists():
        raise DeepSpotError(f"{out}: already exists; the indexed layout is written to a new folder")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise DeepSpotError(f"{out}: output folder {parent} does not exist")

    model, source = load_model(model_or_checkpoint)
    check_indexed_mode(model.mode)
    dense = build_export_module(model, precision=precision, io_dtype=io_dtype, optimize=optimize,
                                fold_scaler=fold_scaler)  # fmt: skip
    encoder, head = build_indexed_modules(dense, table_dtype)
    d, h = model.input_size, model.phi2rho_size
    io = dense.io
    table = encoder.table_dtype
    enc_example = {ENCODER_INPUT: torch.randn(3, 1, d, dtype=io)}
    head_example = {HEAD_EMBEDDING: torch.randn(3, h).abs().to(table)}
    head_axes = {HEAD_EMBEDDING: {0: "batch"}, HEAD_NEIGHBORS: {0: "batch", 1: "n_neighbors"}, OUTPUT: {0: "batch"}}
    if head.has_subspot:
        head_example["subspot"] = torch.randn(3, 4, d, dtype=io)
        head_axes["subspot"] = {0: "batch", 1: "n_subspot"}
    head_example[HEAD_NEIGHBORS] = torch.randn(3, 5, h).abs().to(table)
    graphs = {
        ENCODER_FILE: _trace(encoder, enc_example, [ENCODER_OUTPUT], {ENCODER_INPUT: {0: "batch"},
                                                                      ENCODER_OUTPUT: {0: "batch"}}, opset),
        HEAD_FILE: _trace(head, head_example, [OUTPUT], head_axes, opset),
    }  # fmt: skip
    base = build_metadata(model, dense, source, opset)
    pair_id = hashlib.sha256(
        json.dumps([base["source_sha256"], precision, io_dtype, optimize, fold_scaler, table_dtype, opset]).encode()
    ).hexdigest()[:16]
    for name, graph in graphs.items():
        meta = dict(base, layout="indexed", role=name.split(".")[0], pair_id=pair_id, table_dtype=table_dtype,
                    embedding_size=str(h), input_names=json.dumps([i.name for i in graph.graph.input]))  # fmt: skip
        set_metadata(graph, meta, dense)
        check_graph(graph)

    tmp = temporary_folder(out)
    try:
        for name, graph in graphs.items():
            onnx.save_model(graph, str(tmp / name))
        if validate:
            validate_indexed(tmp, model, indexed_precision(dense.precision, table_dtype), fold_scaler)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def validate_indexed(folder, model, precision: str, fold_scaler: bool) -> float:
    """Run an exported encoder/head pair on onnxruntime's CPU provider over :func:`example_slide` and compare with
    the model's per-item output; return the max abs error.

    Raises:
        ExportValidationError: The error exceeds the precision's tolerance (the message states both).
    """
    from pathlib import Path

    import numpy as np

    from .specs import get_spec
    from .validate import ExportValidationError, session_from_onnx

    folder = Path(folder)
    enc = session_from_onnx(folder / ENCODER_FILE)
    head = session_from_onnx(folder / HEAD_FILE)
    io_type = np.float16 if enc.get_inputs()[0].type == "tensor(float16)" else np.float32
    slide = example_slide(model.mode, model.input_size)
    a = slide["arrays"]
    tiles = np.concatenate([np.zeros((1, model.input_size), np.float32), a["own"]])[:, None, :].astype(io_type)
    table = enc.run(None, {ENCODER_INPUT: tiles})[0]  # row 0: the zero tile, what index -1 gathers
    feed = {HEAD_EMBEDDING: table[1:], HEAD_NEIGHBORS: table[a["neighbor_index"] + 1]}
    if "subspot" in a:
        feed["subspot"] = a["subspot"].astype(io_type)
    got = head.run(None, feed)[0].astype(np.float32)
    with torch.no_grad():
        ref = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in slide["dense"].items()})
        if fold_scaler:
            ref = model.inverse_transform(ref)
    ref = ref.numpy()
    tol = get_spec(model.family, model.mode.name).tolerance(precision)
    err = float(np.max(np.abs(got - ref))) if np.isfinite(got).all() else float("inf")
    limit = tol.limit(float(np.max(np.abs(ref))))
    if not err <= limit:
        raise ExportValidationError(
            f"indexed export does not match the model: max abs error {err:.3g} > tolerance {limit:.3g} ({tol}); "
            "nothing was written"
        )
    return err
