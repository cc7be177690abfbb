"""Callbacks that take the image out of the loop: snapshots, TensorBoard images, the final output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from nst_lightning.image_io import check_writable, save_image


class ImageWriter(L.Callback):
    """Writes the stylised image: the final output, snapshots and TensorBoard images.

    Args:
        path: file the final image is written to (the format follows the extension).
        snapshot_every_n_steps: also write the image every N steps to ``<log dir>/snapshots/``
            (0 turns snapshots off).
        log_image_every_n_steps: send the image to TensorBoard every N steps (0 turns it off).
    """

    def __init__(
        self,
        path: str = "outputs/stylised.png",
        snapshot_every_n_steps: int = 0,
        log_image_every_n_steps: int = 10,
    ) -> None:
        self.path = Path(path)
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.log_image_every_n_steps = log_image_every_n_steps

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail before any computation if the output cannot be written.
        if trainer.is_global_zero:
            check_writable(self.path)

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return every > 0 and step > 0 and step % every == 0

    def _log_image(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                image = pl_module.output_image()[0].cpu()
                logger.experiment.add_image("image", image, global_step=trainer.global_step)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.log_image_every_n_steps > 0 and trainer.is_global_zero:
            self._log_image(trainer, pl_module)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        if self._due(step, self.log_image_every_n_steps):
            self._log_image(trainer, pl_module)
        if self._due(step, self.snapshot_every_n_steps) and trainer.log_dir is not None:
            save_image(pl_module.output_image(), Path(trainer.log_dir) / "snapshots" / f"step_{step:06d}.png")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.log_image_every_n_steps > 0 and not self._due(trainer.global_step, self.log_image_every_n_steps):
            self._log_image(trainer, pl_module)
        save_image(pl_module.output_image(), self.path)
        rank_zero_info(f"Wrote the stylised image to {self.path} (step {trainer.global_step})")
