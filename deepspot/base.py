"""What DeepSpot and DeepCell share: the constructor's bookkeeping, input checks and the forward pass."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .checks import check_memory, check_seed
from .errors import ConfigError, InputError
from .layers import Phi, Rho, phi_bag, rho_mean
from .modes import Mode, get_mode
from .scaler import Scaler
from .utils import fix_seed


#: Off while a model is rebuilt from saved weights: its initial weights are replaced at once, so seeding every global
#: generator (and cuDNN's flags, and the environment) as the reference's constructor does would only be a side effect.
_SEED_ON_BUILD = contextvars.ContextVar("deepspot_seed_on_build", default=True)


@contextlib.contextmanager
def building_from_weights() -> Iterator[None]:
    """Construct models without :func:`~deepspot.utils.fix_seed` and put torch's CPU generator back afterwards (the
    initial weights draw from it): for loading, which leaves the caller's global random state as it was."""
    token = _SEED_ON_BUILD.set(False)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        _SEED_ON_BUILD.reset(token)


class DeepSetModel(nn.Module):
    """An ensemble of Phi networks, pooled over bags, followed by an ensemble of Rho networks.

    Subclasses set ``family``, ``phi_attr`` (the state-dict name of the Phi ensemble, ``phi_spot`` or ``phi_cell``)
    and ``losses``, and call :meth:`_build` from their constructor with every constructor argument.
    """

    family: str = ""
    phi_attr: str = ""
    losses: Mapping[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {}

    def _build(self, config: dict[str, Any], context: str, scaler: Any) -> None:
        self.mode: Mode = get_mode(self.family, context)
        if config["loss_func"] not in self.losses:
            raise ConfigError(
                f"unknown {self.family} loss {config['loss_func']!r}; expected one of: {', '.join(self.losses)}"
            )
        for name in ("input_size", "output_size", "phi2rho_size", "n_ensemble"):
            if int(config[name]) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {config[name]!r}")
        for name in ("n_ensemble_phi", "n_ensemble_rho"):
            if config[name] is not None and int(config[name]) < 1:
                raise ConfigError(f"{name} must be a positive integer or unset, got {config[name]!r}")
        for name in ("p", "p_phi", "p_rho"):
            if config[name] is not None and not 0.0 <= float(config[name]) < 1.0:
                raise ConfigError(f"{name} must lie in [0, 1), got {config[name]!r}")
        check_seed(int(config["random_seed"]), "random_seed")  # before fix_seed, which NumPy would refuse
        self._check_memory(config)
        # Store the canonical reference name of the mode, whichever name the caller used.
        config[f"{self.family}_context"] = self.mode.reference
        self.config: dict[str, Any] = config
        self.scaler: Scaler | None = Scaler.from_object(scaler)
        self.loss_func = self.losses[config["loss_func"]]
        self.genes: list[str] | None = None  # gene names, set by training or import
        self.history: dict[str, Any] | None = None  # training history, set by training

        # Unlike the reference's `x or default`, only None means "unset": an explicit 0 is kept.
        self.p_phi = config["p"] if config["p_phi"] is None else config["p_phi"]
        self.p_rho = config["p"] if config["p_rho"] is None else config["p_rho"]
        self.n_ensemble_phi = config["n_ensemble"] if config["n_ensemble_phi"] is None else config["n_ensemble_phi"]
        self.n_ensemble_rho = config["n_ensemble"] if config["n_ensemble_rho"] is None else config["n_ensemble_rho"]

        # Seeding first, then Phi, then Rho: the reference's order, which fixes the initial weights.
        if _SEED_ON_BUILD.get():
            fix_seed(config["random_seed"])
        h = config["phi2rho_size"]
        phis = nn.ModuleList(Phi(config["input_size"], h, self.p_phi) for _ in range(self.n_ensemble_phi))
        setattr(self, self.phi_attr, phis)
        self.rho = nn.ModuleList(
            Rho(h * self.mode.multiplier, config["output_size"], self.p_rho) for _ in range(self.n_ensemble_rho)
        )

    def _check_memory(self, config: dict[str, Any]) -> None:
        """Refuse, before allocating, weights larger than the memory available (fp32, gradients not counted)."""
        if torch.empty(0).is_meta:
            return  # built on the meta device (to check a file's shapes): nothing is allocated
        d, g, h = int(config["input_size"]), int(config["output_size"]), int(config["phi2rho_size"])
        n_phi, n_rho = (config["n_ensemble"] if config[f"n_ensemble_{x}"] is None else config[f"n_ensemble_{x}"]
                        for x in ("phi", "rho"))  # fmt: skip
        weights = int(n_phi) * (d + 1) * h + int(n_rho) * (h * self.mode.multiplier + 1) * g
        check_memory(4 * weights, f"the weights of a {self.family} model of input_size {d}, output_size {g} and "
                                  f"phi2rho_size {h}")  # fmt: skip

    # -- properties ---------------------------------------------------------------------------------------------
    @property
    def phi(self) -> nn.ModuleList:
        return getattr(self, self.phi_attr)

    @property
    def input_size(self) -> int:
        return int(self.config["input_size"])

    @property
    def output_size(self) -> int:
        return int(self.config["output_size"])

    @property
    def phi2rho_size(self) -> int:
        return int(self.config["phi2rho_size"])

    def pool_of(self, bag_name: str) -> str:
        """The pooling that this model applies to a bag (resolves ``agg`` to ``agg_neighbors``)."""
        for bag in self.mode.bags:
            if bag.name == bag_name:
                return self.config.get("agg_neighbors", "max") if bag.pool == "agg" else bag.pool
        raise KeyError(bag_name)

    # -- inputs -------------------------------------------------------------------------------------------------
    def parse_inputs(
        self, x: torch.Tensor | Sequence[torch.Tensor] | None = None, **bags: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Name and check the inputs of a forward call.

        Accepts what the reference accepts (one tensor for single-bag modes, or a list in the reference's order:
        spot/cell, subspot, neighbours) or keyword tensors. Every check failure is an :class:`InputError`
        (a ``ValueError``) that names the input and the expected shape.
        """
        names = self.mode.input_names
        if x is not None and bags:
            raise InputError("pass the bags either positionally or by keyword, not both")
        if isinstance(x, Mapping):
            raise InputError(f"pass a dict of bags as keyword arguments, model(**bags); mode {self.mode.reference!r} "
                             f"takes {', '.join(names)}")  # fmt: skip
        if x is not None:
            if isinstance(x, torch.Tensor):
                if len(names) != 1:
                    raise InputError(
                        f"mode {self.mode.reference!r} takes {len(names)} bags ({', '.join(names)}); got one tensor"
                    )
                bags = {names[0]: x}
            else:
                x = list(x)
                if len(x) != len(names):
                    raise InputError(
                        f"mode {self.mode.reference!r} takes {len(names)} bags ({', '.join(names)}); got {len(x)}"
                    )
                bags = dict(zip(names, x))
        missing = [n for n in names if n not in bags]
        if missing:
            raise InputError(f"missing input {missing[0]!r}: mode {self.mode.reference!r} takes {', '.join(names)}")
        extra = [n for n in bags if n not in names]
        if extra:
            raise InputError(f"unexpected input {extra[0]!r}: mode {self.mode.reference!r} takes {', '.join(names)}")

        batch = None
        weights = next(self.parameters()).dtype
        for bag in self.mode.bags:
            t = bags[bag.name]
            if not isinstance(t, torch.Tensor):
                raise InputError(f"input {bag.name!r} must be a torch.Tensor, got {type(t).__name__}"
                                 + (" (torch.from_numpy(a) makes one)" if hasattr(t, "__array__") else ""))
            if not t.is_floating_point():
                raise InputError(f"input {bag.name!r} must be floating point, got {t.dtype}")
            if t.dtype != weights and not torch.is_autocast_enabled(t.device.type):
                # torch.from_numpy keeps NumPy's float64; torch would fail deep in a matrix product.
                raise InputError(f"input {bag.name!r} is {t.dtype}, the model's weights are {weights}: pass "
                                 f"{bag.name}.to({weights}), or convert the model")  # fmt: skip
            expected = f"(B, 1, {self.input_size})" if bag.single else f"(B, {bag.name[0].upper()}, {self.input_size})"
            if t.dim() != 3:
                raise InputError(f"input {bag.name!r} must have shape {expected}, got {tuple(t.shape)}")
            if t.shape[2] != self.input_size:
                raise InputError(
                    f"input {bag.name!r} has {t.shape[2]} features, expected {self.input_size}: shape {expected}"
                )
            if bag.single and t.shape[1] != 1:
                raise InputError(f"input {bag.name!r} must have shape {expected}, got {tuple(t.shape)}")
            if t.shape[1] < 1:
                raise InputError(f"input {bag.name!r} has an empty bag: shape {tuple(t.shape)}, expected {expected}")
            if batch is None:
                batch = t.shape[0]
            elif t.shape[0] != batch:
                raise InputError(
                    f"input {bag.name!r} has batch size {t.shape[0]}, but {self.mode.bags[0].name!r} has {batch}"
                )
        return {n: bags[n] for n in names}

    # -- forward ------------------------------------------------------------------------------------------------
    def embed(self, bags: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Phi step: every bag through the Phi ensemble in the reference's order, concatenated: ``(B, m*H)``."""
        pooled = {name: phi_bag(bags[name], self.phi, self.pool_of(name)) for name in self.mode.phi_order}
        return torch.cat([pooled[name] for name in self.mode.input_names], dim=1)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Rho step: the mean of the Rho ensemble, ``(B, m*H) -> (B, G)``."""
        return rho_mean(h, self.rho)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor] | None = None, **bags: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(self.parse_inputs(x, **bags)))

    def inverse_transform(self, x):
        """Map predictions back to the original scale through the stored scaler (unchanged without one)."""
        return x if self.scaler is None else self.scaler.inverse_transform(x)

    def extra_repr(self) -> str:
        return f"mode={self.mode.reference!r}"
