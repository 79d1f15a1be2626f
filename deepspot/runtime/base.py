"""The runner contract every backend honours, and the model metadata that travels with a runner.

A runner wraps one graph (a PyTorch module, an ONNX session or a TensorRT engine). Like Polygraphy's runners it is
built cheaply, does its expensive work in :meth:`Runner.activate`, maps a feed of named NumPy arrays to named NumPy
outputs in :meth:`Runner.infer`, and frees what it holds in :meth:`Runner.deactivate`; it is also a context manager.
Runners never hard-code input names: they read them from the graph, so a pipeline of two graphs (an encoder and a
head, as in the indexed layout) is two runners driven in turn, with no change to this contract.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import ConfigError, InputError, option
from ..modes import Mode, get_mode
from ..scaler import Scaler

OUTPUT_NAME = "expression"


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one graph input or output.

    Attributes:
        name: Tensor name.
        shape: One entry per axis: an int for a fixed size, a string (the axis name) or ``None`` for a dynamic one.
        dtype: NumPy dtype name.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: str = "float32"

    @property
    def rank(self) -> int:
        return len(self.shape)

    def is_dynamic(self, axis: int) -> bool:
        return not isinstance(self.shape[axis], int) or self.shape[axis] < 0


@dataclass
class ModelInfo:
    """What a runner knows about the model behind its graph.

    Attributes:
        family: ``spot`` or ``cell``.
        mode: Short mode name.
        input_size: Features per tile ``D``.
        output_size: Number of genes ``G``.
        genes: Gene names, if known.
        scaler: The target scaler, if the model has one.
        fold_scaler: Whether the graph already applies the scaler's inverse transform.
        precision: The graph's compute precision (``fp32``, ``fp16``, ``bf16``).
        config: The model's constructor arguments.
        source: The file the runner was built from.
        layout: ``dense`` (one graph, neighbour features by value) or ``indexed`` (an encoder and a head graph).
    """

    family: str
    mode: str
    input_size: int
    output_size: int
    genes: list[str] | None = None
    scaler: Scaler | None = None
    fold_scaler: bool = False
    precision: str = "fp32"
    config: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    layout: str = "dense"

    @property
    def mode_spec(self) -> Mode:
        return get_mode(self.family, self.mode)

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.mode_spec.input_names

    def input_specs(self) -> dict[str, TensorSpec]:
        """Input specs of the dense graph of this mode: ``(B, 1, D)`` for single tiles, ``(B, T, D)`` for bags."""
        return {
            bag.name: TensorSpec(bag.name, ("batch", 1 if bag.single else f"{bag.name}_bag", self.input_size))
            for bag in self.mode_spec.bags
        }

    def check_inverse_transform(self, model: Any) -> None:
        """Refuse ``--inverse-transform`` for a model with no scaler (``model`` names it in the message)."""
        if self.scaler is None and not self.fold_scaler:
            raise ConfigError(f"{model}: the model has no scaler, so there is no original scale to map back to; "
                              f"leave out {option('inverse_transform')}")  # fmt: skip

    def inverse_transform(self, pred: np.ndarray) -> np.ndarray:
        """Map predictions to the original scale, unless the graph already did (or there is no scaler)."""
        if self.fold_scaler or self.scaler is None:
            return pred
        return self.scaler.inverse_transform(pred)

    @classmethod
    def from_model(cls, model, source: str = "", precision: str = "fp32") -> "ModelInfo":
        """Describe a :class:`~deepspot.base.DeepSetModel`."""
        return cls(
            family=model.family,
            mode=model.mode.name,
            input_size=model.input_size,
            output_size=model.output_size,
            genes=None if model.genes is None else [str(g) for g in model.genes],
            scaler=model.scaler,
            precision=precision,
            config=dict(model.config),
            source=str(source),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "mode": self.mode,
            "input_size": self.input_size,
            "output_size": self.output_size,
            "genes": self.genes,
            "scaler": None if self.scaler is None else self.scaler.to_dict(),
            "fold_scaler": self.fold_scaler,
            "precision": self.precision,
            "config": self.config,
            "source": self.source,
            "layout": self.layout,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelInfo":
        d = dict(d)
        scaler = d.pop("scaler", None)
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known, scaler=None if scaler is None else Scaler.from_dict(scaler))


def check_feed(feed: Mapping[str, np.ndarray], specs: Mapping[str, TensorSpec], where: str = "runner") -> int:
    """Check a feed's names, ranks, fixed axes and batch sizes against the graph's inputs; return the batch size.

    Raises:
        InputError: The first problem found, naming the input and the expected shape.
    """
    missing = [n for n in specs if n not in feed]
    if missing:
        raise InputError(f"{where}: missing input {missing[0]!r}; the graph takes {', '.join(specs)}")
    extra = [n for n in feed if n not in specs]
    if extra:
        raise InputError(f"{where}: unexpected input {extra[0]!r}; the graph takes {', '.join(specs)}")
    batch = None
    for name, spec in specs.items():
        shape = np.shape(feed[name])
        if len(shape) != spec.rank:
            raise InputError(f"{where}: input {name!r} must have rank {spec.rank} {spec.shape}, got shape {shape}")
        for axis, size in enumerate(spec.shape):
            if not spec.is_dynamic(axis) and shape[axis] != size:
                raise InputError(f"{where}: input {name!r} has size {shape[axis]} on axis {axis}, expected {size}")
        if spec.rank == 3 and shape[1] == 0:  # a bag axis: onnxruntime fails deep in a Reshape, torch names it
            raise InputError(f"{where}: input {name!r} has an empty bag, shape {shape}: every item needs a tile")
        if batch is None:
            batch = shape[0]
        elif shape[0] != batch:
            raise InputError(f"{where}: input {name!r} has batch size {shape[0]}, the others have {batch}")
    return int(batch or 0)


def conform_feed(feed: Mapping[str, np.ndarray], specs: Mapping[str, TensorSpec], where: str = "runner") -> dict:
    """Accept what a bundle accepts: a single tile as ``(N, D)`` (made ``(N, 1, D)``, a view), and floating-point
    arrays of another precision, cast to the graph's dtype with a check that no value becomes inf on the way.

    Raises:
        InputError: A non-floating-point input, or a value the graph's dtype cannot represent.
    """
    if not isinstance(feed, Mapping):
        raise InputError(f"{where}: the feed must map input names to arrays ({', '.join(specs)}), not "
                         f"{type(feed).__name__}")  # fmt: skip
    out = dict(feed)
    for name, spec in specs.items():
        if name not in out:
            continue
        try:
            a = np.asarray(out[name])
        except (TypeError, ValueError, RuntimeError) as e:  # a CUDA tensor, one that requires grad, ragged lists
            raise InputError(f"{where}: input {name!r} is no array NumPy can read ({str(e).splitlines()[0]}); pass "
                             "a NumPy array (a torch tensor as t.detach().cpu().numpy())") from None  # fmt: skip
        if a.ndim == 2 and spec.rank == 3 and spec.shape[1] == 1:
            a = a[:, None, :]
        if a.dtype != np.dtype(spec.dtype) and np.dtype(spec.dtype).kind == "f":
            if a.dtype.kind != "f":
                raise InputError(f"{where}: input {name!r} must be floating point, got {a.dtype}")
            with np.errstate(over="ignore", invalid="ignore"):
                cast = a.astype(spec.dtype)
            overflow = ~np.isfinite(cast) & np.isfinite(a)
            if overflow.any():
                row = int(np.argmax(overflow.reshape(len(a), -1).any(axis=1)))
                raise InputError(
                    f"{where}: {name!r} holds a value beyond {spec.dtype}'s range (it would become inf) in row {row}"
                )
            a = cast
        out[name] = a
    return out


class Runner(abc.ABC):
    """One graph on one backend: ``activate()``, ``infer(feed) -> outputs``, ``deactivate()``.

    Subclasses implement :meth:`activate_impl`, :meth:`infer_impl`, :meth:`deactivate_impl`, :meth:`get_input_metadata`
    and :attr:`output_names`. Every runner returns host ``float32`` NumPy arrays keyed by output name, whatever its
    device or precision.

    Attributes:
        backend: Registry name of the backend (``torch``, ``ort-cpu``, ...).
        info: Metadata of the model behind the graph (``None`` for a bare graph).
        last_inference_time: Seconds spent in the last :meth:`infer` call.
    """

    backend: str = ""

    def __init__(self, info: ModelInfo | None = None, name: str | None = None):
        self.info = info
        self.name = name or self.backend
        self.is_active = False
        self.last_inference_time: float | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------
    def activate(self) -> "Runner":
        """Build the session or engine (loading weights, compiling); calling it on an active runner is a no-op."""
        if not self.is_active:
            self.activate_impl()
            self.is_active = True
        return self

    def deactivate(self) -> None:
        """Free the session or engine and its buffers."""
        if self.is_active:
            self.deactivate_impl()
            self.is_active = False

    def __enter__(self) -> "Runner":
        return self.activate()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is None:
            self.deactivate()
            return
        try:
            self.deactivate()
        except Exception as cleanup:  # noqa: BLE001
            # The error raised in the block is the one to see. Freeing after it can fail too (a CUDA error is sticky:
            # every later call on the context fails), and would otherwise replace it.
            if hasattr(exc, "add_note"):  # Python 3.11+
                exc.add_note(f"freeing {self.name} afterwards failed too: {type(cleanup).__name__}: {cleanup}")

    # -- inference ----------------------------------------------------------------------------------------------
    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.get_input_metadata())

    @property
    @abc.abstractmethod
    def output_names(self) -> tuple[str, ...]:
        """Names of the graph's outputs."""

    @property
    def device(self) -> str:
        """Where the graph runs: ``cpu`` or ``cuda:K``."""
        return "cpu"

    def infer(self, feed: Mapping[str, np.ndarray], check_inputs: bool = True) -> dict[str, np.ndarray]:
        """Run the graph on one batch.

        Args:
            feed: Input arrays by name; C-contiguous arrays of the graph's input dtype avoid a copy. As in a bundle, a
                single tile may be ``(N, D)``, and float64 is cast to the graph's dtype (refused where a value
                would overflow it).
            check_inputs: Check names, ranks and fixed axes first (cheap; the streaming path checks once up front).

        Returns:
            Output arrays by name, ``float32``, on the host.
        """
        if not self.is_active:
            raise RuntimeError(f"{self.name}: activate() the runner (or use it as a context manager) before infer()")
        specs = self.get_input_metadata()
        if check_inputs:
            feed = conform_feed(feed, specs, where=self.name)
            check_feed(feed, specs, where=self.name)
        start = time.perf_counter()
        # Graphs exported with fp16 I/O take float16; everything else float32. No copy when it already fits.
        feed = {k: np.ascontiguousarray(v, dtype=specs[k].dtype if k in specs else None) for k, v in feed.items()}
        out = self.infer_impl(feed)
        self.last_inference_time = time.perf_counter() - start
        return out

    @abc.abstractmethod
    def get_input_metadata(self) -> dict[str, TensorSpec]:
        """Specs of the graph's inputs, in the graph's order (cheap: runners cache them)."""

    def pipeline_adapter(self, batch_size: int):
        """A :class:`~deepspot.runtime.pipeline.DeviceAdapter` that overlaps copies and compute on a GPU, with the
        host buffer allocator to pair with it, or ``None`` where the runner has none (the CPU backends)."""
        return None

    @abc.abstractmethod
    def activate_impl(self) -> None: ...

    @abc.abstractmethod
    def infer_impl(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def deactivate_impl(self) -> None: ...

    def __repr__(self) -> str:
        state = "active" if self.is_active else "inactive"
        return f"{type(self).__name__}(name={self.name!r}, device={self.device!r}, {state})"
