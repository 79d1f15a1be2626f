"""One declarative export spec per forward mode, in a registry built from :data:`deepspot.modes.MODES`.

A spec says what an exported graph of that mode looks like from outside: input and output names, which axes are
dynamic and what they are called, how to build example inputs, and the validation tolerance for each precision.
The exporter, the validator and the test matrix all read the registry, so a mode added to ``MODES`` is exported,
validated and tested without further code, and a mode without a spec fails the suite.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from ..checks import PRECISIONS
from ..errors import ConfigError, option_value
from ..modes import MODES, Bag, Mode, get_mode

OUTPUT_NAME = "expression"
BATCH_AXIS = "batch"
IO_DTYPES = ("fp32", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Tolerance:
    """Validation tolerance: ``max |onnx - torch| <= rel * (1 + max |torch|)`` over an output.

    Relative to the output's own magnitude, because expression on the original scale (a folded scaler) can be in
    the thousands while standardised expression is of order one.
    """

    rel: float

    def limit(self, reference_max_abs: float) -> float:
        """The largest allowed absolute error for an output whose largest magnitude is ``reference_max_abs``."""
        return self.rel * (1.0 + float(reference_max_abs))

    def __str__(self) -> str:
        return f"{self.rel:.0e} x (1 + max|reference|)"


# fp32: rounding only (the folded Rho and the fused Phi reorder sums); measured errors are ~1% of it. fp16 and bf16
# round weights, inputs and every intermediate: about ten units of roundoff (2^-11 and 2^-8), some 60 times the
# fp16 error measured on visium-uni sizes and on the reference fixtures. The reference is always the float32 model.
DEFAULT_TOLERANCES: Mapping[str, Tolerance] = MappingProxyType(
    {"fp32": Tolerance(1e-5), "fp16": Tolerance(5e-3), "bf16": Tolerance(4e-2)}
)


@dataclass(frozen=True)
class ExportSpec:
    """How one forward mode looks as an ONNX graph.

    Attributes:
        mode: The forward mode (family, bags, pooling).
        tolerances: Validation tolerance per precision.
        validation_cases: ``(batch, bag size)`` pairs that validation runs, deliberately different from each other
            and from the shapes used to trace, so that a shape baked into the graph shows up.
        trace_case: ``(batch, bag size)`` of the example inputs the exporter traces with.
    """

    mode: Mode
    tolerances: Mapping[str, Tolerance] = field(default_factory=lambda: DEFAULT_TOLERANCES)
    validation_cases: tuple[tuple[int, int], ...] = ((1, 1), (7, 5))
    trace_case: tuple[int, int] = (2, 3)

    @property
    def key(self) -> str:
        """``family/mode``, the registry key."""
        return self.mode.key

    @property
    def input_names(self) -> tuple[str, ...]:
        """Graph input names in the reference's concatenation order (spot/cell, subspot, neighbours)."""
        return self.mode.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return (OUTPUT_NAME,)

    def bag_axis_name(self, bag: Bag) -> str | None:
        """Name of a bag's dynamic tile axis (``n_subspot``), or ``None`` where the bag holds exactly one tile."""
        return None if bag.single else f"n_{bag.name}"

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """Named dynamic axes per input and output, as ``torch.onnx.export`` takes them.

        The batch axis is dynamic everywhere, every bag axis is dynamic except for bags pooled with ``none`` (fixed
        at 1), and the feature axis is always fixed.
        """
        axes: dict[str, dict[int, str]] = {}
        for bag in self.mode.bags:
            axes[bag.name] = {0: BATCH_AXIS}
            if not bag.single:
                axes[bag.name][1] = self.bag_axis_name(bag)
        axes[OUTPUT_NAME] = {0: BATCH_AXIS}
        return axes

    def input_shapes(self, input_size: int) -> dict[str, tuple[int | str, ...]]:
        """Symbolic input shapes, ``{"spot": ("batch", 1, 1024), "subspot": ("batch", "n_subspot", 1024)}``."""
        return {
            bag.name: (BATCH_AXIS, 1 if bag.single else self.bag_axis_name(bag), input_size) for bag in self.mode.bags
        }

    def output_shapes(self, output_size: int) -> dict[str, tuple[int | str, ...]]:
        return {OUTPUT_NAME: (BATCH_AXIS, output_size)}

    def example_inputs(
        self,
        input_size: int,
        batch: int = 2,
        bag_size: int = 3,
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
        zero_rows: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Seeded standard-normal inputs in spec order; single-tile bags get one tile whatever ``bag_size`` is.

        Args:
            input_size: Features per tile.
            batch: Batch size.
            bag_size: Tiles per multi-tile bag.
            dtype: Dtype of the returned tensors.
            seed: Seed of a private generator (the global one is left alone).
            zero_rows: Make the last tile of every multi-tile bag of the first item a zero row, as the reference's
                data loaders pad short neighbour bags; a zero row is a real input and must be handled like one.
        """
        generator = torch.Generator().manual_seed(seed)
        inputs = {}
        for bag in self.mode.bags:
            tiles = 1 if bag.single else bag_size
            x = torch.randn(batch, tiles, input_size, generator=generator)
            if zero_rows and not bag.single and tiles > 1:
                x[0, -1] = 0.0
            inputs[bag.name] = x.to(dtype)
        return inputs

    def tolerance(self, precision: str) -> Tolerance:
        check_precision(precision)
        return self.tolerances[precision]


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}")
    return precision


def resolve_io_dtype(precision: str, io_dtype: str | None) -> str:
    """The dtype of the graph's inputs and outputs: float32 unless asked otherwise, and then only the compute dtype.

    Raises:
        ConfigError: Unknown dtype, or an io dtype that differs from a non-fp32 compute precision.
    """
    check_precision(precision)
    if io_dtype is None:
        return "fp32"
    if io_dtype not in IO_DTYPES:
        raise ConfigError(f"unknown io dtype {io_dtype!r}; expected one of: {', '.join(IO_DTYPES)}")
    if io_dtype != "fp32" and io_dtype != precision:
        raise ConfigError(f"{option_value('io_dtype', io_dtype, '--io')} needs {option_value('precision', io_dtype)} "
                          f"(got {option_value('precision', precision)})")  # fmt: skip
    return io_dtype


EXPORT_SPECS: Mapping[str, ExportSpec] = MappingProxyType({mode.key: ExportSpec(mode) for mode in MODES})


def get_spec(family: str, mode: str) -> ExportSpec:
    """The export spec of ``family``'s ``mode`` (short or reference name).

    Raises:
        ConfigError: Unknown family or mode, or a mode without a spec.
    """
    m = get_mode(family, mode)
    try:
        return EXPORT_SPECS[m.key]
    except KeyError:
        raise ConfigError(f"mode {m.key} has no export spec") from None
