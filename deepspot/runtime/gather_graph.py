"""The indexed head with its gathers inside the graph, so that the embedding table can stay on the GPU.

The head graph of an indexed export takes the item's own embedding ``(B, H)`` and its neighbours' embeddings
``(B, K, H)``, gathered from the slide's table on the host. On a GPU that sends K + 1 embeddings per item over the
bus (45 x 4 KiB per Xenium cell), far more than the head computes on. :func:`gather_head` rewrites the head (an
``onnx.ModelProto``, no PyTorch) so that it takes the table and two indices instead:

- ``embedding_table`` ``(rows, H)``: the whole table, row 0 the zero tile's embedding; bound once per slide;
- ``item_index`` ``(B,)`` int64: the items' rows in the slide (0-based; the graph adds 1, past the zero row);
- ``neighbor_index`` ``(B, K)`` int64: as in the bundle, ``-1`` for a missing neighbour (row 0 after the +1);

and computes ``Gather(table, item_index + 1)`` and ``Gather(table, neighbor_index + 1)`` where the two embedding
inputs were. Everything after them is the exported head, unchanged, so the result is the host-gather path's.
The indices are checked on the host before they are used (``check_neighbor_index``); onnxruntime's CUDA Gather does
not check bounds.
"""

from __future__ import annotations

import numpy as np

from ..errors import CheckpointError
from ..export.metadata import HEAD_EMBEDDING, HEAD_NEIGHBORS
from ._onnxruntime import import_ort
from .base import TensorSpec
from .ort import OrtRunner

TABLE_INPUT = "embedding_table"
ITEM_INDEX = "item_index"
NEIGHBOR_INDEX = "neighbor_index"


def gather_head(head):
    """A copy of the indexed head ``head`` (``onnx.ModelProto``) that gathers its embeddings from a table input.

    Raises:
        CheckpointError: The graph does not have the indexed head's embedding inputs.
    """
    import onnx
    from onnx import TensorProto, helper

    graph_inputs = {i.name: i for i in head.graph.input}
    missing = [name for name in (HEAD_EMBEDDING, HEAD_NEIGHBORS) if name not in graph_inputs]
    if missing:
        raise CheckpointError(f"not the head of an indexed export: no input {missing[0]!r}")
    own, neighbors = graph_inputs[HEAD_EMBEDDING].type.tensor_type, graph_inputs[HEAD_NEIGHBORS].type.tensor_type
    if own.elem_type != neighbors.elem_type or len(own.shape.dim) != 2 or len(neighbors.shape.dim) != 3:
        raise CheckpointError("the indexed head's embedding inputs do not have the shapes (B, H) and (B, K, H)")
    width = own.shape.dim[1]

    model = onnx.ModelProto()
    model.CopyFrom(head)
    graph = model.graph
    taken = {n for node in graph.node for n in (*node.input, *node.output)} | set(graph_inputs)
    one, item_row, neighbor_row = (_fresh(taken, base) for base in ("gather_one", "item_row", "neighbor_row"))

    kept = [i for i in graph.input if i.name not in (HEAD_EMBEDDING, HEAD_NEIGHBORS)]
    table = helper.make_tensor_value_info(TABLE_INPUT, own.elem_type, ["table_rows", None])
    table.type.tensor_type.shape.dim[1].CopyFrom(width)
    new_inputs = [
        table,
        helper.make_tensor_value_info(ITEM_INDEX, TensorProto.INT64, ["batch"]),
        *kept,
        helper.make_tensor_value_info(NEIGHBOR_INDEX, TensorProto.INT64, ["batch", "n_neighbors"]),
    ]
    del graph.input[:]
    graph.input.extend(new_inputs)
    nodes = [
        helper.make_node("Constant", [], [one], value=helper.make_tensor(one, TensorProto.INT64, [], [1])),
        helper.make_node("Add", [ITEM_INDEX, one], [item_row]),
        helper.make_node("Gather", [TABLE_INPUT, item_row], [HEAD_EMBEDDING], axis=0),
        helper.make_node("Add", [NEIGHBOR_INDEX, one], [neighbor_row]),
        helper.make_node("Gather", [TABLE_INPUT, neighbor_row], [HEAD_NEIGHBORS], axis=0),
    ]
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    onnx.checker.check_model(model)
    return model


def _fresh(taken: set[str], base: str) -> str:
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


class OrtGatherHead(OrtRunner):
    """The indexed head on onnxruntime with the slide's table bound once (in GPU memory on ``ort-cuda``) and the
    item's own embedding and its neighbours' gathered in the graph (:func:`gather_head`): per batch only
    ``item_index``, ``neighbor_index`` and the sub-spots cross the bus.

    Always uses IO binding: on ``ort-cuda`` the table is an ``OrtValue`` in GPU memory; on ``ort-cpu`` the same code
    binds host memory, which is how it is tested without a GPU. Ran on an NVIDIA H200 (the GPU suite's indexed parity
    and ``xenium-slide`` rows, 2026-11-29).

    Args:
        source: The head's runner as :func:`~deepspot.runtime.backends.load_runner` built it (inactive).
    """

    def __init__(self, source: OrtRunner):
        super().__init__(source.path, source.backend, source.info, source.providers, source.device_id,
                         source.threads, source.cuda_graph, io_binding=True, name=source.name,
                         batch_size=source.batch_size)  # fmt: skip
        self.selection = getattr(source, "selection", None)
        self._table = None
        self._device_made = False  # the table was made by device_table (for the encoder to write), not load_table

    def activate_impl(self) -> None:
        if self._model_bytes is None:  # rewritten once; with CUDA graphs each slide activates the runner again
            import onnx

            self._model_bytes = gather_head(onnx.load(str(self.path))).SerializeToString()
        super().activate_impl()

    def get_input_metadata(self) -> dict[str, TensorSpec]:
        return {name: spec for name, spec in super().get_input_metadata().items() if name != TABLE_INPUT}

    def load_table(self, table: np.ndarray) -> None:
        """Copy the slide's embedding table (row 0: the zero tile's embedding) to the device, once per slide."""
        dtype = self._new_slide()
        table = np.ascontiguousarray(table, dtype=dtype)
        self._bind_table(import_ort().OrtValue.ortvalue_from_numpy(table, self.device_type, self.device_id))
        self._device_made = False

    def device_table(self, rows: int, width: int) -> tuple[int, int]:
        """A table of ``rows x width`` for this slide, made on the device and bound as the head's: returns its
        address and the bytes per row, for the encoder to write each batch's embeddings into
        (:meth:`~deepspot.runtime.ort.OrtRunner.infer_into`). Every row must be written before the head runs.

        A slide of the size of the last one reuses its table (the encoder rewrites every row): the CUDA graphs captured
        on its address stay valid, and the head keeps its session instead of making and capturing a new one, which
        costs more than a whole slide's head pass (a benchmark's repeats, a cohort's slides of one size)."""
        table = self._table
        if self.is_active and self._device_made and table is not None and tuple(table.shape()) == (rows, width):
            dtype = np.dtype(super().get_input_metadata()[TABLE_INPUT].dtype)
            return table.data_ptr(), width * dtype.itemsize
        dtype = self._new_slide()
        value = import_ort().OrtValue.ortvalue_from_shape_and_type((rows, width), dtype, self.device_type,
                                                                   self.device_id)  # fmt: skip
        self._bind_table(value)
        self._device_made = True
        return value.data_ptr(), width * dtype.itemsize

    def _new_slide(self) -> np.dtype:
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate() the runner before giving it a table")
        if self._io.graphs is not None and self._io.graphs.graphs:
            # A captured CUDA graph replays on the addresses it was captured with: the previous slide's table. The
            # next slide gets a new session, whose graphs are captured on its own table.
            self.deactivate_impl()
            self.activate_impl()
        return np.dtype(super().get_input_metadata()[TABLE_INPUT].dtype)

    def _bind_table(self, value) -> None:
        self._table = value
        self._io.bind_constant(TABLE_INPUT, value)

    def deactivate_impl(self) -> None:
        self._table = None
        self._device_made = False
        super().deactivate_impl()

    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._table is None:
            raise RuntimeError(f"{self.name}: load_table() the slide's embeddings before infer()")
        return super().infer_impl(feed)
