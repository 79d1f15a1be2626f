"""The forward modes of both families, as data.

Every other part of the package (the models, the exporter, the runtime, the tests) reads the modes from
:data:`MODES`, so a mode added here without an export spec or a test fails the suite.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ConfigError

FAMILIES = ("spot", "cell")


@dataclass(frozen=True)
class Bag:
    """One input bag of a forward mode.

    Attributes:
        name: Input name (``spot``, ``subspot``, ``neighbors`` or ``cell``).
        pool: How the bag's Phi embeddings are pooled over the bag axis: ``sum``, ``max``, ``none`` (concatenate;
            the bag must hold exactly one tile) or ``agg`` (the model's ``agg_neighbors``).
    """

    name: str
    pool: str

    @property
    def single(self) -> bool:
        """Whether the bag holds exactly one tile (its bag axis is fixed to 1)."""
        return self.pool == "none"


@dataclass(frozen=True)
class Mode:
    """A forward mode of one family.

    Attributes:
        family: ``spot`` or ``cell``.
        name: Short name users type (``neighbors``).
        reference: The reference code's name (``spot_neighbors``).
        bags: Input bags in concatenation order (spot or cell, then subspot, then neighbours).
        phi_order: Order in which the reference runs the bags through the Phi ensemble. It decides which
            dropout masks each bag draws, so training follows the reference only in this order.
    """

    family: str
    name: str
    reference: str
    bags: tuple[Bag, ...]
    phi_order: tuple[str, ...]

    @property
    def multiplier(self) -> int:
        """How many Phi embeddings of width ``phi2rho_size`` are concatenated into Rho's input."""
        return len(self.bags)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(bag.name for bag in self.bags)

    @property
    def has_neighbors(self) -> bool:
        return "neighbors" in self.input_names

    @property
    def key(self) -> str:
        """Unique name across families: ``spot/neighbors``."""
        return f"{self.family}/{self.name}"


def _mode(family: str, name: str, reference: str, bags: list[tuple[str, str]], phi_order: list[str]) -> Mode:
    return Mode(family, name, reference, tuple(Bag(n, p) for n, p in bags), tuple(phi_order))


MODES: tuple[Mode, ...] = (
    _mode("spot", "spot", "spot", [("spot", "sum")], ["spot"]),
    _mode("spot", "subspot", "spot_subspot", [("spot", "none"), ("subspot", "sum")], ["subspot", "spot"]),
    _mode("spot", "neighbors", "spot_neighbors", [("spot", "none"), ("neighbors", "max")], ["spot", "neighbors"]),
    _mode(
        "spot",
        "subspot_neighbors",
        "spot_subspot_neighbors",
        [("spot", "none"), ("subspot", "sum"), ("neighbors", "max")],
        ["subspot", "spot", "neighbors"],
    ),
    _mode("cell", "cell", "cell", [("cell", "none")], ["cell"]),
    _mode("cell", "neighbors", "cell_neighbors", [("cell", "none"), ("neighbors", "agg")], ["cell", "neighbors"]),
)

DEFAULT_MODE = {"spot": "subspot_neighbors", "cell": "neighbors"}


def check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ConfigError(f"unknown family {family!r}; expected one of: {', '.join(FAMILIES)}")
    return family


def get_mode(family: str, mode: str) -> Mode:
    """Return the mode of ``family`` called ``mode`` (short or reference name).

    Raises:
        ConfigError: The family or mode is unknown.
    """
    check_family(family)
    for m in MODES:
        if m.family == family and mode in (m.name, m.reference):
            return m
    names = ", ".join(m.name for m in MODES if m.family == family)
    raise ConfigError(f"unknown {family} mode {mode!r}; expected one of: {names} (or the reference names)")


def modes_of(family: str) -> tuple[Mode, ...]:
    check_family(family)
    return tuple(m for m in MODES if m.family == family)
