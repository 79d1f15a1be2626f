"""Training: a plain, seeded PyTorch loop that follows the reference's Lightning training step for step.

:func:`fit` reproduces the reference's per-step losses and final weights bit for bit on the CPU: on its fixture
(unshuffled, without validation), and against Lightning 2.6's ``Trainer`` with shuffling and with validation data.
Two details make that possible (see ``MODEL_SPEC.md``): the model runs its bags through the Phi ensemble in the
reference's order (:attr:`deepspot.modes.Mode.phi_order`), and every training epoch and every validation run draws one
64-bit number from torch's global generator, as creating a ``DataLoader`` iterator does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DeepSetModel
from .checks import finite_at_least
from .errors import ConfigError, InputError, option
from .scaler import Scaler

MONITORS = ("val_loss", "train_loss")


@dataclass
class TrainConfig:
    """How to train.

    Attributes:
        epochs: Maximum number of epochs (the reference uses up to 10).
        batch_size: Items per optimisation step (the reference uses 1024).
        shuffle: Shuffle the training items every epoch (reproducible from the model's seed).
        val_fraction: Fraction of the items held out for validation when no separate validation data is given.
        normalize: Standardise the targets (mean and scale fitted on the training targets, stored in the model).
        early_stopping: Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.
        monitor: ``val_loss`` or ``train_loss`` (epoch means weighted by batch size, as Lightning logs them).
        patience: Epochs without improvement before stopping.
        min_delta: Smallest decrease that counts as an improvement.
        progress: Show a progress bar.
    """

    epochs: int = 10
    batch_size: int = 1024
    shuffle: bool = True
    val_fraction: float = 0.0
    normalize: bool = False
    early_stopping: bool = False
    monitor: str = "val_loss"
    patience: int = 3
    min_delta: float = 0.0
    progress: bool = True

    def __post_init__(self):
        if self.epochs < 1:
            raise ConfigError(f"epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"unknown monitor {self.monitor!r}; expected one of: {', '.join(MONITORS)}")
        if self.patience < 1:
            raise ConfigError(f"patience must be at least 1, got {self.patience}")
        finite_at_least(self.min_delta, "min_delta")


def check_optimizer(lr: float, weight_decay: float) -> None:
    """Refuse a learning rate or weight decay that AdamW cannot use (or that is not a finite number).

    Raises:
        ConfigError: ``lr`` or ``weight_decay`` is not a finite number >= 0.
    """
    finite_at_least(float(lr), option("lr"))  # 0 is allowed, as AdamW allows it: the weights stay as built
    finite_at_least(float(weight_decay), option("weight_decay"))


def _float32(value: Any, name: str, which: str) -> torch.Tensor:
    """A float32 tensor of ``value`` (a copy: bundles are memory-mapped read-only, and training needs the data in
    memory anyway); values beyond float32's range become inf here and are reported by :func:`_checked_data`."""
    if isinstance(value, torch.Tensor):
        return value.float()
    try:
        with np.errstate(over="ignore", invalid="ignore"):
            return torch.from_numpy(np.array(value, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise InputError(f"{which}{name!r} must hold numbers: {e}") from None


def _as_tensors(inputs: Mapping[str, Any], own: str, which: str = "") -> dict[str, torch.Tensor]:
    """Float32 tensors; the spot or cell bag (``own``) may be one tile per item, ``(N, D)``, as in a bundle. Other
    bags stay as given: a 2-D sub-spot or neighbour array is refused by the model's checks, not read as one tile."""
    out = {}
    for k, v in inputs.items():
        t = _float32(v, k, which)
        out[k] = t[:, None, :] if t.dim() == 2 and k == own else t
    return out


def _checked_data(
    model: DeepSetModel, inputs: Mapping[str, Any], target: Any, which: str
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Bags and targets as float32 tensors, checked before any work: names, shapes, rows, finite values, not empty.

    ``which`` prefixes the names in messages (``"validation "`` for validation data).
    """
    names = model.mode.input_names
    extra = [k for k in inputs if k not in names]
    if extra:  # before converting: a whole bundle passed as inputs holds 'target', 'barcode', ...
        takes = ", ".join(names)
        raise InputError(f"unexpected {which}input {extra[0]!r}: mode {model.mode.reference!r} takes {takes}")
    x = _as_tensors(inputs, model.mode.bags[0].name, which)
    y = _float32(target, "target", which)
    for name, t in x.items():
        if t.dim() != 3:
            raise InputError(f"{which}{name!r} must have 3 axes (N, bag, D), got shape {tuple(t.shape)}")
    model.parse_inputs(**{k: v[:1] for k, v in x.items()})  # names and shapes
    if y.dim() != 2 or y.shape[1] != model.output_size:
        raise InputError(f"{which}target must have shape (N, {model.output_size}), got {tuple(y.shape)}")
    if any(v.shape[0] != y.shape[0] for v in x.values()):
        raise InputError(f"{which}inputs and target have different numbers of items")
    if y.shape[0] == 0:
        raise InputError(f"the {which or 'training '}data holds no items")
    for name, t in list(x.items()) + [("target", y)]:
        if not torch.isfinite(t).all():
            row = int(torch.nonzero(~torch.isfinite(t.reshape(t.shape[0], -1)).all(dim=1))[0])
            original = np.asarray((target if name == "target" else inputs[name])[row], dtype=np.float64)
            what = "a value beyond float32's range" if np.isfinite(original).all() else "a non-finite value"
            raise InputError(f"{which}{name!r} holds {what} in row {row}")
    return x, y


def split_validation(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split of ``range(n)`` into training and validation positions (NumPy generator, not torch's)."""
    n_val = int(round(n * fraction))
    if fraction > 0 and (n_val < 1 or n_val >= n):
        raise ConfigError(f"val_fraction {fraction} of {n} items leaves an empty training or validation set")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def _iterator_draw() -> None:
    # Creating a DataLoader iterator draws its base seed from torch's global generator. The reference's loaders do
    # it for every training epoch and every validation run; we make the same draws so dropout masks follow its own.
    torch.empty((), dtype=torch.int64).random_()


def _epoch_order(n: int, shuffle: bool) -> torch.Tensor | None:
    # The training loader's draw; with shuffling, RandomSampler then draws the seed of its permutation.
    _iterator_draw()
    if not shuffle:
        return None
    seed = int(torch.empty((), dtype=torch.int64).random_().item())
    gen = torch.Generator()
    gen.manual_seed(seed)
    return torch.randperm(n, generator=gen)


def _batches(n: int, batch_size: int, order: torch.Tensor | None):
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield slice(start, stop) if order is None else order[start:stop]


def epoch_mean(losses: list[float], n: int, batch_size: int) -> float:
    """An epoch's loss as Lightning logs it: the mean of the per-batch losses weighted by each batch's size (a short
    last batch counts for its items only). Early stopping compares these."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    return float(np.average(losses, weights=sizes))


def evaluate(model: DeepSetModel, inputs: Mapping[str, torch.Tensor], target: torch.Tensor, batch_size: int):
    """Per-batch losses of ``model`` in eval mode (no gradients, no dropout)."""
    was_training = model.training
    model.eval()
    losses = []
    with torch.no_grad():
        for idx in _batches(target.shape[0], batch_size, None):
            pred = model(**{k: v[idx] for k, v in inputs.items()})
            losses.append(float(model.loss_func(pred, target[idx]).item()))
    model.train(was_training)
    return losses


def fit(
    model: DeepSetModel,
    inputs: Mapping[str, Any],
    target: Any,
    config: TrainConfig | None = None,
    val_inputs: Mapping[str, Any] | None = None,
    val_target: Any = None,
) -> dict[str, Any]:
    """Train ``model`` in place with AdamW(``lr``, ``weight_decay``) and return its history.

    Args:
        model: A freshly built model (its constructor seeded torch; training continues from that state).
        inputs: Training bags by name (``spot``, ``subspot``, ``neighbors``, ``cell``), arrays or tensors.
        target: Training targets ``(N, G)``.
        config: How to train; defaults to :class:`TrainConfig`'s defaults.
        val_inputs: Separate validation bags (with ``val_target``, and ``config.val_fraction`` 0); otherwise
            ``config.val_fraction`` of the items is held out.
        val_target: Separate validation targets.

    Raises:
        InputError: Training or validation data that the model cannot take (names, shapes, rows, gene count,
            values that are not finite float32 numbers, no items), before any step.
        ConfigError: A bad configuration, or a loss that stops being finite (training diverged).

    Returns:
        The history: per-step ``train_loss`` and ``val_loss``, per-epoch means, and why training stopped. It is also
        stored on ``model.history``; with ``normalize`` the fitted scaler is stored on ``model.scaler``.
    """
    config = config or TrainConfig()
    check_optimizer(model.config["lr"], model.config["weight_decay"])
    x, y = _checked_data(model, inputs, target, "")
    if (val_inputs is None) != (val_target is None):
        raise ConfigError("separate validation data needs both val_inputs and val_target")
    if val_inputs is not None:
        if config.val_fraction > 0:
            raise ConfigError("give either separate validation data or val_fraction, not both")
        xv, yv = _checked_data(model, val_inputs, val_target, "validation ")
    elif config.val_fraction > 0:
        train_idx, val_idx = split_validation(y.shape[0], config.val_fraction, model.config["random_seed"])
        xv = {k: v[val_idx] for k, v in x.items()}
        yv = y[val_idx]
        x = {k: v[train_idx] for k, v in x.items()}
        y = y[train_idx]
    else:
        xv, yv = None, None
    if config.early_stopping and config.monitor == "val_loss" and xv is None:
        raise ConfigError("early stopping on val_loss needs validation data (val_fraction or separate data)")

    if config.normalize:
        model.scaler = Scaler.fit(y.numpy())
        y = torch.from_numpy(model.scaler.transform(y.numpy()))
        if yv is not None:
            yv = torch.from_numpy(model.scaler.transform(yv.numpy()))

    optimizer = torch.optim.AdamW(model.parameters(), lr=model.config["lr"], weight_decay=model.config["weight_decay"])
    n = y.shape[0]
    steps_per_epoch = math.ceil(n / config.batch_size)
    history: dict[str, Any] = {
        "train_loss": [],
        "val_loss": [],
        "epoch_train_loss": [],
        "epoch_val_loss": [],
        "steps_per_epoch": steps_per_epoch,
        "config": asdict(config),
        "stopped": "max_epochs",
    }
    best, bad_epochs = math.inf, 0
    progress = _progress(config.progress, config.epochs * steps_per_epoch)
    with progress:
        task = progress.add_task("training", total=config.epochs * steps_per_epoch, loss=float("nan"))
        for epoch in range(config.epochs):
            model.train()
            order = _epoch_order(n, config.shuffle)
            epoch_losses = []
            for idx in _batches(n, config.batch_size, order):
                pred = model(**{k: v[idx] for k, v in x.items()})
                loss = model.loss_func(pred, y[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_losses.append(float(loss.detach().item()))
                _check_loss(epoch_losses[-1], "training", epoch, model.config["lr"])
                progress.update(task, advance=1, loss=epoch_losses[-1])
            history["train_loss"].extend(epoch_losses)
            history["epoch_train_loss"].append(epoch_mean(epoch_losses, n, config.batch_size))
            if xv is not None:
                _iterator_draw()  # Lightning's validation loader, after the epoch's last step (its sanity check draws none)
                val_losses = evaluate(model, xv, yv, config.batch_size)
                history["epoch_val_loss"].append(epoch_mean(val_losses, yv.shape[0], config.batch_size))
                _check_loss(history["epoch_val_loss"][-1], "validation", epoch, model.config["lr"])
                history["val_loss"].extend(val_losses)
            if config.early_stopping:
                current = history["epoch_val_loss" if config.monitor == "val_loss" else "epoch_train_loss"][-1]
                if current < best - config.min_delta:
                    best, bad_epochs = current, 0
                else:
                    bad_epochs += 1
                    if bad_epochs >= config.patience:
                        history["stopped"] = f"early_stopping (epoch {epoch + 1})"
                        break
    history["epochs"] = len(history["epoch_train_loss"])
    model.eval()
    model.history = history
    return history


def _check_loss(loss: float, which: str, epoch: int, lr: float) -> None:
    """Stop at the first loss that is not a finite number: the weights are lost, and more epochs would waste time."""
    if not math.isfinite(loss):
        raise ConfigError(
            f"training diverged: the {which} loss is {loss} in epoch {epoch + 1}; try a lower {option('lr')} "
            f"(got {lr:g})"
        )


def _progress(enabled: bool, total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
        console=Console(stderr=True),  # stdout is the command's result line
    )


def smooth_curve(values: list[float] | np.ndarray, alpha: float = 0.2) -> np.ndarray:
    """Exponential smoothing as the reference's plot does it: ``s_i = alpha * x_i + (1 - alpha) * s_{i-1}``."""
    out = np.empty(len(values), dtype=np.float64)
    for i, v in enumerate(values):
        out[i] = v if i == 0 else alpha * v + (1 - alpha) * out[i - 1]
    return out


def loss_curves(history: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The curves the loss plot draws: raw and smoothed training loss, and the validation loss interpolated onto the
    training steps (as the reference's ``plot_loss`` does), raw and smoothed."""
    train = np.asarray(history["train_loss"], dtype=np.float64)
    steps = np.arange(1, len(train) + 1)
    curves = {"steps": steps, "train": train, "train_smooth": smooth_curve(train)}
    val = np.asarray(history.get("val_loss", []), dtype=np.float64)
    if len(val) and len(train):
        val_steps = np.arange(len(val)) * (len(train) // len(val) + 1)
        val_full = np.interp(steps, val_steps, val)
        curves["val"] = val_full
        curves["val_smooth"] = smooth_curve(val_full)
    return curves


def plot_loss(history: Mapping[str, Any], path: str | Path) -> Path:
    """Write the training (and validation) loss curves, raw and smoothed, as a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .fileio import atomic_path

    c = loss_curves(history)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot(c["steps"], c["train"], label="Original Training Loss", color="blue", alpha=0.4)
    ax.plot(c["steps"], c["train_smooth"], label="Smoothed Training Loss", color="blue")
    if "val" in c:
        ax.plot(c["steps"], c["val"], label="Original Validation Loss", color="orange", alpha=0.4, linestyle="--")
        ax.plot(c["steps"], c["val_smooth"], label="Smoothed Validation Loss", color="orange", linestyle="--")
    ax.set_title("Training and Validation Loss (with Smoothing)")
    ax.set_xlabel("Steps")
    ax.set_ylabel("Loss")
    ax.legend()
    ax.grid(True)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
