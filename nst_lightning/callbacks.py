"""Callbacks that take the image out of the loop: snapshots, TensorBoard images, the final output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from nst_lightning.errors import ConfigError, Interrupted, NSTError, NumericalError
from nst_lightning.image_io import check_writable, save_image


class ImageWriter(L.Callback):
    """Writes the stylised image: the final output, snapshots and TensorBoard images.

    When a run ends early the image is written all the same, once at least one step is done: after
    an interruption (the partial image), a numerical fault (the last image whose loss was finite) or
    any other error (the current image, if finite). Every file is written atomically.

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
        for name, value in (
            ("snapshot_every_n_steps", snapshot_every_n_steps),
            ("log_image_every_n_steps", log_image_every_n_steps),
        ):
            if value < 0:
                raise ConfigError(f"output.{name} must be 0 (off) or a number of steps, got {value}")
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
        step, max_steps = trainer.global_step, trainer.max_steps
        early = f" of {max_steps}: the run ended early" if 0 <= step < max_steps else ""
        rank_zero_info(f"Wrote the stylised image to {self.path} (step {step}{early})")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Keeps the work of a run that ends with an error or an interruption (see the class docstring).

        A second Ctrl-C (``SystemExit``) or a bare ``KeyboardInterrupt`` means "quit now": nothing is written.
        """
        if not trainer.is_global_zero or not isinstance(exception, Exception):
            return
        image = getattr(pl_module, "image", None)
        step = trainer.global_step
        if image is None or step < 1:
            return  # nothing computed yet: an existing output stays as it is
        if not bool(torch.isfinite(image).all()):
            rank_zero_warn(f"the image of step {step} is not finite: {self.path} was left as it was")
            return
        if isinstance(exception, Interrupted):
            what = "partial image (interrupted)"
        elif isinstance(exception, NumericalError):
            what = "last image whose loss was finite"
        else:
            what = "partial image (the run failed)"
        try:
            save_image(pl_module.output_image(), self.path)
        except NSTError as err:
            rank_zero_warn(f"could not write the {what}: {err}")
            return
        rank_zero_info(f"Wrote the {what} to {self.path} (step {step} of {trainer.max_steps})")
        if isinstance(exception, Interrupted):
            exception.image = self.path
