"""The export-ready module: a DeepSpot/DeepCell forward pass in a form that exports to plain ONNX and runs fast.

:func:`build_export_module` turns a trained model into an :class:`ExportModule` for one forward mode. Two variants:

- **optimised** (default): the Phi ensemble is one matrix product ``D -> E*H`` (the E weight matrices stacked;
  computed in column blocks that stay in cache, see :class:`FusedPhi`), the lower median is a pruned min/max
  network, Phi's ReLU is applied once after the median (ReLU is monotone, so it commutes with any order statistic,
  exactly), the Rho ensemble is folded into one linear layer (the mean of E
  linear layers applied to the same input is the linear layer with the mean weights and bias), and dropout and
  Rho's ReLU (which only ever sees non-negative Phi outputs) are gone. A folded scaler is folded into that linear
  layer too when computing in float32.
- **unoptimised**: the model's own Phi and Rho modules, run one by one as the reference does; only ``torch.median``
  is replaced by the same min/max network, because it does not export.

Both take the bags positionally in spec order (or by name) and return ``expression``, ``(B, G)``. The runtime uses
this module directly to get the same computation without writing ONNX.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, InputError, option, option_value
from ..modes import get_mode
from .median import lower_median_of, median_network
from .specs import TORCH_DTYPES, check_precision, resolve_io_dtype


def fuse_phi_ensemble(phis: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """The E Phi linear layers stacked into one: weight ``(E*H, D)`` and bias ``(E*H,)``.

    Member ``e`` occupies rows ``e*H`` to ``(e+1)*H``, so splitting the product's last axis into E chunks of H gives
    the members back in order.
    """
    linears = [phi.model[0] for phi in phis]
    weight = torch.cat([lin.weight.detach() for lin in linears], dim=0)
    bias = torch.cat([lin.bias.detach() for lin in linears], dim=0)
    return weight, bias


def fold_rho_ensemble(rhos: Sequence[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one linear layer equal to the mean of the Rho ensemble: the mean weight ``(G, m*H)`` and bias ``(G,)``.

    Averaged in float64, so the folded layer is the exactly rounded mean; what remains is float32 rounding of the
    reordered sums when it runs (measured by the tests and the benchmark).
    """
    linears = [rho.model[2] for rho in rhos]
    # A running float64 sum: one buffer instead of E float64 copies (at visium-uni size, 60 MB instead of 600 MB).
    weight = torch.zeros(linears[0].weight.shape, dtype=torch.float64)
    bias = torch.zeros(linears[0].bias.shape, dtype=torch.float64)
    with torch.no_grad():
        for lin in linears:
            weight.add_(lin.weight.detach())
            bias.add_(lin.bias.detach())
    return weight / len(linears), bias / len(linears)


#: Width of one column block of the fused Phi (see :class:`FusedPhi`).
PHI_BLOCK_WIDTH = 128


def phi_blocks(width: int, block_width: int = PHI_BLOCK_WIDTH) -> int:
    """How many column blocks a Phi of ``width`` outputs per member is computed in: ``width / block_width`` where
    that divides evenly, else one."""
    return width // block_width if width > block_width and width % block_width == 0 else 1


class FusedPhi(nn.Module):
    """The Phi ensemble as linear layers over column blocks, each followed by the lower median over members and a
    ReLU: ``(.., D) -> (.., H)``.

    The median is elementwise, so it can be taken one block of output columns at a time. Block ``g`` stacks columns
    ``g*c`` to ``(g+1)*c`` of every member (``c`` = :data:`PHI_BLOCK_WIDTH`): one product ``D -> E*c``, split into
    the E members, then the min/max network. At the CPU batch (256 spots, 2,304 sub-spot tiles) one block's product
    is about 12 MB and stays in the last-level cache while the network's ~43 elementwise passes read it; the whole
    ``E*H`` product (47 MB) would go to memory and back on every pass. Measured on a 2-core EPYC with a 32 MB L3,
    visium-uni on onnxruntime: 6.6 % faster than one block (paired runs; 2 blocks gain nothing, 8 gain 4.7 %). The
    products compute the same dot products, so the result is the same.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, n_members: int, blocks: int | None = None):
        super().__init__()
        self.n_members = n_members
        median_network(n_members)  # made now, not while torch.compile traces the forward
        self.width = weight.shape[0] // n_members
        self.blocks = phi_blocks(self.width) if blocks is None else int(blocks)
        if self.blocks < 1 or self.width % self.blocks:
            raise ConfigError(f"cannot split Phi's {self.width} outputs into {self.blocks} equal blocks")
        self.block_width = self.width // self.blocks
        w = weight.reshape(n_members, self.width, -1)
        b = bias.reshape(n_members, self.width)
        cols = [slice(g * self.block_width, (g + 1) * self.block_width) for g in range(self.blocks)]
        # Block g: member e's columns of the block at rows e*c to (e+1)*c, so a split of the product gives members.
        self.weights = nn.ParameterList(
            nn.Parameter(w[:, c].reshape(-1, w.shape[-1]).clone(), requires_grad=False) for c in cols
        )
        self.biases = nn.ParameterList(nn.Parameter(b[:, c].reshape(-1).clone(), requires_grad=False) for c in cols)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        # On (B*T, D) a product and its bias are one ONNX Gemm (the bias added in the product's epilogue); on
        # (B, T, D) they export as MatMul and Add, a whole extra pass over the (B, T, E*c) product.
        x = x.reshape(-1, x.shape[-1])
        out = []
        for weight, bias in zip(self.weights, self.biases):
            members = torch.split(F.linear(x, weight, bias), self.block_width, dim=-1)  # E x (B*T, c)
            # ReLU after the median instead of before it: equal (ReLU is monotone) and E times fewer elements.
            out.append(torch.relu(lower_median_of(members)))
        h = torch.cat(out, dim=-1) if len(out) > 1 else out[0]
        return h.reshape(*lead, self.width)


class PhiEnsemble(nn.Module):
    """The model's own Phi modules (``Linear -> Dropout -> ReLU``), one after the other, then the lower median."""

    def __init__(self, phis: nn.ModuleList):
        super().__init__()
        self.members = phis
        median_network(len(phis))  # made now, not while torch.compile traces the forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lower_median_of([phi(x) for phi in self.members])


class RhoEnsemble(nn.Module):
    """The model's own Rho modules, one after the other, averaged: ``(B, m*H) -> (B, G)``."""

    def __init__(self, rhos: nn.ModuleList):
        super().__init__()
        self.members = rhos

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.stack([rho(h) for rho in self.members], dim=1).mean(dim=1)


class InverseScale(nn.Module):
    """The scaler's inverse transform, ``x * scale + offset`` (either may be absent)."""

    def __init__(self, scale: torch.Tensor | None, offset: torch.Tensor | None):
        super().__init__()
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            x = x * self.scale
        if self.offset is not None:
            x = x + self.offset
        return x


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Only a real change of dtype: a same-dtype `.to` would still be traced into a no-op Cast node.
    return x if x.dtype == dtype else x.to(dtype)


def pool_bag(h: torch.Tensor, op: str) -> torch.Tensor:
    """Pool Phi embeddings ``(B, T, H)`` over the bag axis; ``none`` takes the bag's single tile: ``(B, H)``."""
    if op == "sum":
        return h.sum(dim=1)
    if op == "mean":
        return h.mean(dim=1)
    if op == "max":
        # onnxruntime's ReduceMax (CPU, 1.32) keeps a NaN only when it comes first along the axis; torch.max returns
        # NaN for any NaN. The bag's sum finds them: Phi's outputs are ReLU'd (>= 0 or NaN), so the sum is NaN exactly
        # where a NaN is (+inf + +inf stays +inf). One float reduction: `isnan(h).any(1)` exports as IsNaN, a Cast
        # and a ReduceSum over the whole (B, T, H) bag, four times slower on onnxruntime's CPU provider.
        return torch.where(torch.isnan(h.sum(dim=1)), float("nan"), h.amax(dim=1))
    if op == "none":
        # The bag axis of a `none` bag is fixed at 1, so flattening it is the reference's reshape to (B, T*H).
        return h.flatten(1)
    raise ConfigError(f"unknown pooling {op!r}")


class ExportModule(nn.Module):
    """A model's forward pass in one mode, ready for ``torch.onnx.export``. Built by :func:`build_export_module`.

    Call it with the bags positionally in spec order (``spot, subspot, neighbors``) or by name; it returns
    ``expression``, ``(B, G)``, in the io dtype.

    Attributes:
        family: ``spot`` or ``cell``.
        mode: The forward mode.
        input_names: Bag names in call order.
        pools: Pooling per bag.
        precision: Compute dtype name (``fp32``, ``fp16``, ``bf16``).
        io_dtype: Dtype name of the inputs and the output.
        optimize: Whether the optimised variant was built.
        fold_scaler: Whether the output is on the original scale.
    """

    def __init__(
        self,
        model: nn.Module,
        precision: str = "fp32",
        io_dtype: str | None = None,
        optimize: bool = True,
        fold_scaler: bool = False,
    ):
        super().__init__()
        self.family = model.family
        self.mode = model.mode
        self.input_names = model.mode.input_names
        self.pools = {name: model.pool_of(name) for name in self.input_names}
        self.precision = check_precision(precision)
        self.io_dtype = resolve_io_dtype(precision, io_dtype)
        self.optimize = bool(optimize)
        self.fold_scaler = bool(fold_scaler)
        self.compute = TORCH_DTYPES[self.precision]
        self.io = TORCH_DTYPES[self.io_dtype]
        if fold_scaler and model.scaler is None:
            raise ConfigError("cannot fold the scaler: the model has no scaler")
        self.scale_out: InverseScale | None = None

        if optimize:
            weight, bias = fuse_phi_ensemble(model.phi)
            self.phi = FusedPhi(weight, bias, len(model.phi))
            self.rho = self._folded_rho(model)
        else:
            self.phi = PhiEnsemble(copy.deepcopy(model.phi))
            self.rho = RhoEnsemble(copy.deepcopy(model.rho))
        if fold_scaler and not (optimize and self.precision == "fp32"):
            self.scale_out = self._inverse_scale(model.scaler, self.io)
        self.phi.to(self.compute)
        self.rho.to(self.compute)
        self.eval()

    def _folded_rho(self, model: nn.Module) -> nn.Linear:
        weight, bias = fold_rho_ensemble(model.rho)  # float64
        if self.fold_scaler and self.precision == "fp32":
            # diag(scale) @ W and scale * b + offset: the inverse transform costs nothing at run time. Only in
            # float32; in fp16 the scaler is applied after the cast back, where original-scale values fit better.
            scaler = model.scaler
            if scaler.scale is not None:
                scale = torch.as_tensor(scaler.scale, dtype=torch.float64)
                weight = weight * scale[:, None]
                bias = bias * scale
            if scaler.offset is not None:
                bias = bias + torch.as_tensor(scaler.offset, dtype=torch.float64)
        rho = nn.Linear(weight.shape[1], weight.shape[0], device="meta")  # no random init, replaced just below
        rho.weight = nn.Parameter(weight.float(), requires_grad=False)
        rho.bias = nn.Parameter(bias.float(), requires_grad=False)
        return rho

    @staticmethod
    def _inverse_scale(scaler, dtype: torch.dtype) -> InverseScale:
        scale = None if scaler.scale is None else torch.as_tensor(scaler.scale, dtype=dtype)
        offset = None if scaler.offset is None else torch.as_tensor(scaler.offset, dtype=dtype)
        return InverseScale(scale, offset)

    def _bags(self, args: tuple[torch.Tensor, ...], kwargs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if args and kwargs:
            raise InputError("pass the bags either positionally or by name, not both")
        if kwargs:
            missing = [n for n in self.input_names if n not in kwargs]
            extra = [n for n in kwargs if n not in self.input_names]
            if missing or extra:
                raise InputError(f"mode {self.mode.key} takes {', '.join(self.input_names)}; got {', '.join(kwargs)}")
            return [kwargs[n] for n in self.input_names]
        if len(args) != len(self.input_names):
            raise InputError(f"mode {self.mode.key} takes {len(self.input_names)} bags ({', '.join(self.input_names)})")
        return list(args)

    def forward(self, *args: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        bags = self._bags(args, kwargs)
        pooled = []
        for name, x in zip(self.input_names, bags):
            h = self.phi(_cast(x, self.compute))  # (B, T, H)
            pooled.append(pool_bag(h, self.pools[name]))  # (B, H)
        h = torch.cat(pooled, dim=1) if len(pooled) > 1 else pooled[0]  # (B, m*H), spot/cell, subspot, neighbours
        y = _cast(self.rho(h), self.io)  # (B, G)
        return y if self.scale_out is None else self.scale_out(y)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode.key!r}, precision={self.precision!r}, io_dtype={self.io_dtype!r}, "
            f"optimize={self.optimize}, fold_scaler={self.fold_scaler}"
        )


def check_mode(model: nn.Module, mode: str | None) -> None:
    """Refuse a mode other than the model's own: the width of Rho's input depends on it.

    Raises:
        ConfigError: Unknown mode, or a different mode (the message names the model's mode).
    """
    if mode is None:
        return
    requested = get_mode(model.family, mode)
    if requested != model.mode:
        raise ConfigError(
            f"the model was built for mode {model.mode.name!r} ({model.mode.reference}), not {requested.name!r}: "
            f"Rho's input width depends on the mode; export it with {option_value('mode', model.mode.name)} or leave "
            f"{option('mode')} out"
        )


def build_export_module(
    model: nn.Module,
    mode: str | None = None,
    precision: str = "fp32",
    io_dtype: str | None = None,
    optimize: bool = True,
    fold_scaler: bool = False,
) -> ExportModule:
    """The export-ready module of ``model`` in its mode, without writing ONNX.

    Args:
        model: A DeepSpot or DeepCell (its weights are copied; the model itself is left unchanged).
        mode: Must be the model's own mode if given (short or reference name).
        precision: Compute precision, ``fp32``, ``fp16`` or ``bf16``.
        io_dtype: Dtype of inputs and output, ``fp32`` (default) or the compute precision.
        optimize: Build the optimised variant (fused Phi, folded Rho, no dropout or identity ReLU).
        fold_scaler: Append the scaler's inverse transform, so the output is on the original scale.

    Returns:
        An :class:`ExportModule` in eval mode, taking the bags in spec order and returning ``expression``.

    Raises:
        ConfigError: Wrong mode, unknown precision or io dtype, or ``fold_scaler`` without a scaler.
    """
    check_mode(model, mode)
    return ExportModule(model, precision=precision, io_dtype=io_dtype, optimize=optimize, fold_scaler=fold_scaler)
