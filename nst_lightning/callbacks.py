"""Callbacks that take the image out of the loop: snapshots, TensorBoard images, the final output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from nst_lightning.checkpoint import estimate_checkpoint_bytes
from nst_lightning.checks import check_output
from nst_lightning.console import detail, note
from nst_lightning.errors import ConfigError, ImageError, Interrupted, NSTError, NumericalError
from nst_lightning.files import check_new_output, check_replaceable, check_room, remove_file
from nst_lightning.guard import RunGuard
from nst_lightning.image_io import check_writable, estimate_image_bytes, save_image, save_image_elsewhere


def partial_path(path: str | Path) -> Path:
    """Where the image of a run that did not finish goes: ``result.png`` -> ``result.partial.png``.
    The final path only ever holds a finished image."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


class ImageWriter(L.Callback):
    """Writes the stylised image: the final output, snapshots and TensorBoard images.

    When a run ends early the image is written all the same, once at least one step is done, to
    :func:`partial_path` (``result.partial.png``), never to ``path``: after an interruption (the
    partial image), a numerical fault (the last image whose loss was finite) or any other error (the
    current image, if finite). A run whose steps are all done but which fails afterwards (say, its
    last checkpoint cannot be written) writes its finished image to ``path``. Where the final image
    cannot be written (a full disk), it is kept in the run's log folder or the system's temporary
    folder and the error says where. Every file is written atomically; before the run starts, the
    disks must have room for its images and checkpoint.

    Args:
        path: file the final image is written to (the format follows the extension).
        snapshot_every_n_steps: also write the image every N steps to ``<log dir>/snapshots/``
            (0 turns snapshots off).
        log_image_every_n_steps: send the image to TensorBoard every N steps (0 turns it off).
        overwrite: replace ``path`` if it exists (``--overwrite``); otherwise an existing file is refused
            before the run starts.
    """

    def __init__(
        self,
        path: str = "outputs/stylised.png",
        snapshot_every_n_steps: int = 0,
        log_image_every_n_steps: int = 10,
        overwrite: bool = False,
    ) -> None:
        check_output(
            path=path, snapshot_every_n_steps=snapshot_every_n_steps, log_image_every_n_steps=log_image_every_n_steps
        )
        self.path = Path(path)
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.log_image_every_n_steps = log_image_every_n_steps
        self.overwrite = overwrite
        self._final_handled = False  # the finished image was written (or its failure reported)

    @property
    def partial_path(self) -> Path:
        return partial_path(self.path)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Fail before any computation if the output cannot be written, or the disks have no room.
        self._final_handled = False
        if trainer.is_global_zero:
            check_new_output(self.path, self.overwrite)
            check_writable(self.path)
            check_replaceable(self.partial_path, "output")
            self._check_room(trainer, pl_module)

    def _check_room(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The run's images and checkpoint must fit on their disks: estimated from the image size
        (and for the checkpoint the L-BFGS history), see :func:`~nst_lightning.files.check_room`."""
        images = getattr(pl_module, "images", None)  # what the data module handed the module
        if images is None:
            return  # another module or data module: no size to go by
        width, height = images.content_size()
        image = estimate_image_bytes(width, height, self.path)
        needs: dict[Path, int] = {self.path.parent: image}
        steps = max(trainer.max_steps, 1)
        log_dir = Path(trainer.log_dir) if trainer.log_dir is not None else None
        if log_dir is not None and self.snapshot_every_n_steps > 0:
            needs[log_dir / "snapshots"] = (steps // self.snapshot_every_n_steps) * estimate_image_bytes(width, height)
        if log_dir is not None and self.log_image_every_n_steps > 0 and trainer.loggers:
            needs[log_dir] = (steps // self.log_image_every_n_steps + 1) * estimate_image_bytes(width, height)
        hparams = getattr(pl_module, "hparams", None)
        if trainer.checkpoint_callback is not None and hparams is not None and "lbfgs_history_size" in hparams:
            folder = RunGuard.checkpoint_dir(trainer)
            try:
                size = estimate_checkpoint_bytes(height, width, hparams, steps)
            except ConfigError:  # an image too small for the layers: the module's setup says so, better
                size = 0
            needs[folder] = needs.get(folder, 0) + size
        check_room(needs, "the run's image, snapshots and checkpoint")

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
        self._final_handled = True
        self._save_final(trainer, pl_module.output_image())
        step, max_steps = trainer.global_step, trainer.max_steps
        early = f" of {max_steps}: the run ended early" if 0 <= step < max_steps else ""
        detail(f"wrote the stylised image to {self.path} (step {step}{early})")

    def _save_final(self, trainer: L.Trainer, image: torch.Tensor) -> None:
        """Writes the finished image to ``path`` and drops a partial image of an earlier, interrupted
        run of this output. Where ``path`` cannot be written, the image goes to the first folder
        that takes it (the run's log folder, the system's temporary folder) and the
        :class:`ImageError` says where; a finished image is never just lost."""
        try:
            save_image(image, self.path)
        except ImageError as err:
            folders = [trainer.log_dir, None] if trainer.log_dir is not None else [None]  # None: the temporary folder
            kept = save_image_elsewhere(image, self.path.name, folders)
            if kept is not None:
                raise ImageError(f"{err}; the finished image was saved to {kept} instead: move it from there") from None
            raise ImageError(
                f"{err}; it could not be saved anywhere else either: free some space and rerun the same command, "
                "with --ckpt_path and the run's last checkpoint if one was written"
            ) from None
        remove_file(self.partial_path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Keeps the work of a run that ends with an error or an interruption (see the class docstring).

        A second Ctrl-C (``SystemExit``) or a bare ``KeyboardInterrupt`` means "quit now": nothing is written.
        """
        if not trainer.is_global_zero or not isinstance(exception, Exception) or self._final_handled:
            return
        image = getattr(pl_module, "image", None)
        step, max_steps = trainer.global_step, trainer.max_steps
        if image is None or step < 1:
            return  # nothing computed yet: an existing output stays as it is
        if not bool(torch.isfinite(image).all()):
            rank_zero_warn(f"the image of step {step} is not finite: nothing was written")
            return
        finished = not isinstance(exception, (Interrupted, NumericalError)) and (
            0 <= max_steps <= step or trainer.should_stop
        )
        if finished:  # every step is done: the image is complete, only what came after failed
            self._final_handled = True
            failure = " ".join(str(exception).split()) or type(exception).__name__
            try:
                self._save_final(trainer, pl_module.output_image())
            except NSTError as err:
                rank_zero_warn(f"the run's {step} steps are done, but {err}")
                return
            note(
                f"The run's {step} steps are done: wrote the complete image to {self.path}; what failed afterwards: "
                f"{failure}"
            )
            return
        if isinstance(exception, Interrupted):
            what = "partial image (interrupted)"
        elif isinstance(exception, NumericalError):
            what = "last image whose loss was finite"
        else:
            what = "partial image (the run failed)"
        try:
            save_image(pl_module.output_image(), self.partial_path)
        except NSTError as err:
            rank_zero_warn(f"could not write the {what}: {err}")
            return
        note(
            f"Wrote the {what} to {self.partial_path} (step {step} of {max_steps}; {self.path} is left as it was)"
        )
        if isinstance(exception, Interrupted):
            exception.image = self.partial_path
