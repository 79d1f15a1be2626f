"""Rebuild ``lightning_trajectory.npz``: the reference's training path, shuffled and with validation data, as
PyTorch Lightning runs it. Needs the full install plus ``pip install 'lightning==2.6.*'`` (not a test dependency):
``python tests/data/make_lightning_trajectory.py``.

The reference fixture ``trajectory_spot_subspot_neighbors_seed2024.npz`` (made by the reference code) covers training
without shuffling or validation. This file covers the two things it does not, each a draw from torch's global
generator that moves every later dropout mask: the shuffled epoch's permutation seed, and the validation loader's
iterator seed after each epoch. The module below does what the reference's Lightning module does in a step (the
model's loss on a batch, AdamW); ``deepspot.train.fit`` must reproduce its losses and weights bit for bit on the CPU
family that made the file (``made_on``), and within a few ulps on another.
"""

from __future__ import annotations

import platform
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from deepspot.spot import DeepSpot

HERE = Path(__file__).resolve().parent
REFERENCE = HERE.parents[1].parent / "shared" / "fixtures" / "reference"
INPUTS = ("spot", "subspot", "neighbors")
EPOCHS, BATCH, N_VAL = 3, 16, 20  # validation batches of 16 and 4


class Module(L.LightningModule):
    def __init__(self, model: DeepSpot):
        super().__init__()
        self.model, self.train_losses, self.val_losses, self.epoch_means = model, [], [], {"train": [], "val": []}

    def _loss(self, batch):
        *bags, target = batch
        return self.model.loss_func(self.model(**dict(zip(INPUTS, bags))), target)

    def training_step(self, batch, _):
        loss = self._loss(batch)
        self.train_losses.append(loss.item())
        self.log("train_loss", loss, on_epoch=True)
        return loss

    def validation_step(self, batch, _):
        loss = self._loss(batch)
        self.log("val_loss", loss)
        if not self.trainer.sanity_checking:
            self.val_losses.append(loss.item())

    def on_validation_epoch_end(self):  # the epoch's logged value: what EarlyStopping compares
        if not self.trainer.sanity_checking:
            self.epoch_means["val"].append(self.trainer.callback_metrics["val_loss"].item())

    def on_train_epoch_end(self):
        self.epoch_means["train"].append(self.trainer.callback_metrics["train_loss_epoch"].item())

    def configure_optimizers(self):
        c = self.model.config
        return torch.optim.AdamW(self.parameters(), lr=c["lr"], weight_decay=c["weight_decay"])


def cpu_vendor() -> str:
    with open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id"))


def main() -> None:
    with np.load(REFERENCE / "trajectory_spot_subspot_neighbors_seed2024.npz") as z:
        data = {k: z[k] for k in (*INPUTS, "target")}
    val = {f"val_{k}": (v[:N_VAL] * 0.5).astype(np.float32) for k, v in data.items()}  # other items than training's
    model = DeepSpot(input_size=12, output_size=5, phi2rho_size=8, random_seed=2024)
    module = Module(model)
    tensors = lambda prefix: TensorDataset(*(torch.from_numpy((val if prefix else data)[prefix + k])  # noqa: E731
                                             for k in (*INPUTS, "target")))  # fmt: skip
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(module, DataLoader(tensors(""), batch_size=BATCH, shuffle=True), DataLoader(tensors("val_"), BATCH))
    np.savez(
        HERE / "lightning_trajectory.npz",
        **val,
        train_loss=np.float32(module.train_losses),
        val_loss=np.float32(module.val_losses),
        epoch_train_loss=np.float32(module.epoch_means["train"]),
        epoch_val_loss=np.float32(module.epoch_means["val"]),
        **{f"final/{k}": v.numpy() for k, v in model.state_dict().items()},
        made_on=f"{cpu_vendor()} ({platform.processor() or platform.machine()}), lightning {L.__version__}, "
        f"torch {torch.__version__}",
    )


if __name__ == "__main__":
    main()
