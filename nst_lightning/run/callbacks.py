"""Callbacks that take the image out of the loop: snapshots, TensorBoard images, the final output."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from nst_lightning.errors import ConfigError, ImageError, Interrupted, NSTError, NumericalError
from nst_lightning.io.console import detail, note
from nst_lightning.io.files import check_new_output, check_replaceable, check_room, remove_file
from nst_lightning.io.image_io import check_writable, estimate_image_bytes, save_image, save_image_elsewhere
from nst_lightning.run.checks import check_output
from nst_lightning.run.guard import RunGuard
from nst_lightning.run.model import image_model


def partial_path(path: str | Path) -> Path:
    """Where the image of a run that did not finish goes: ``result.png`` -> ``result.partial.png``.
    The final path only ever holds a finished image."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


# Images a step may have waiting for the worker thread before the loop waits for it: a bound on the host memory.
PENDING_IMAGES = 4


def host_copy(image: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """A copy of ``image`` on the host, started without waiting for the device: (the copy, a CUDA event that has
    passed once the copy is complete, or None where it already is)."""
    image = image.detach()
    if image.device.type != "cuda":
        return image.to("cpu", copy=True), None
    host = torch.empty(image.shape, dtype=image.dtype, pin_memory=True)
    host.copy_(image, non_blocking=True)
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(image.device))  # the stream the copy is on
    return host, event


class Background:
    """One worker thread for the images of a run (PNG encoding, files, TensorBoard images), off the loop's thread.
    The loop hands over a host copy (:func:`host_copy`); an error of the worker is raised on the loop's thread, at
    the next :meth:`submit` or :meth:`check`, or at :meth:`finish`."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def submit(self, work: Callable[[torch.Tensor], Any], image: torch.Tensor) -> None:
        """Runs ``work(host copy of image)`` on the worker thread."""
        self.check()
        while len(self._pending) >= PENDING_IMAGES:
            self._pending.pop(0).result()
        host, event = host_copy(image)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nst-images")
        self._pending.append(self._pool.submit(self._run, work, host, event))

    @staticmethod
    def _run(work: Callable[[torch.Tensor], Any], host: torch.Tensor, event: Any) -> None:
        if event is not None:
            event.synchronize()
        work(host)

    def check(self) -> None:
        """Raises the error of work that failed (the work not yet done is left to run)."""
        done = [future for future in self._pending if future.done()]
        self._pending = [future for future in self._pending if not future.done()]
        for future in done:
            future.result()

    def finish(self) -> None:
        """Waits for all the work handed over, stops the thread, then raises the first error (if any)."""
        pending, self._pending = self._pending, []
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for future in pending:
            future.result()

    def abandon(self) -> None:
        """Drops the work not started yet and returns at once (a file being written is finished, atomically)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self._pending = None, []


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
        save_every_n_steps: also write the image so far every N steps to :func:`partial_path`
            (``result.partial.png``, atomically: it can be watched; removed once ``path`` holds the finished
            image); 0 turns it off. ``path`` itself only ever holds a finished image.
        bit_depth: 8, or 16 bits per channel for print work (a PNG or TIFF ``path``; :mod:`nst_lightning.io.image16`).
    """

    def __init__(
        self,
        path: str = "outputs/stylised.png",
        snapshot_every_n_steps: int = 0,
        log_image_every_n_steps: int = 10,
        overwrite: bool = False,
        save_every_n_steps: int = 0,
        bit_depth: int = 8,
    ) -> None:
        check_output(
            path=path,
            snapshot_every_n_steps=snapshot_every_n_steps,
            log_image_every_n_steps=log_image_every_n_steps,
            save_every_n_steps=save_every_n_steps,
            bit_depth=bit_depth,
        )
        self.save_every_n_steps = save_every_n_steps
        self.bit_depth = bit_depth
        self.path = Path(path)
        self.snapshot_every_n_steps = snapshot_every_n_steps
        self.log_image_every_n_steps = log_image_every_n_steps
        self.overwrite = overwrite
        self._final_handled = False  # the finished image was written (or its failure reported)
        self._background = Background()  # snapshots and TensorBoard images

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
        (and for the checkpoint the L-BFGS history), see :func:`~nst_lightning.io.files.check_room`."""
        model = image_model(pl_module)
        size = model.output_size() if model is not None else None
        if model is None or size is None:
            return  # a model that does not say its size: none to go by
        width, height = size
        image = estimate_image_bytes(width, height, self.path) * (2 if self.bit_depth == 16 else 1)
        needs: dict[Path, int] = {self.path.parent: image * (2 if self.save_every_n_steps else 1)}
        steps = max(trainer.max_steps, 1)
        log_dir = Path(trainer.log_dir) if trainer.log_dir is not None else None
        if log_dir is not None and self.snapshot_every_n_steps > 0:
            needs[log_dir / "snapshots"] = (steps // self.snapshot_every_n_steps) * estimate_image_bytes(width, height)
        if log_dir is not None and self.log_image_every_n_steps > 0 and trainer.loggers:
            needs[log_dir] = (steps // self.log_image_every_n_steps + 1) * estimate_image_bytes(width, height)
        if trainer.checkpoint_callback is not None:
            folder = RunGuard.checkpoint_dir(trainer)
            try:
                checkpoint = model.checkpoint_bytes(steps)
            except ConfigError:  # an image too small for the layers: the module's setup says so, better
                checkpoint = 0
            needs[folder] = needs.get(folder, 0) + checkpoint
        check_room(needs, "the run's image, snapshots and checkpoint")

    @staticmethod
    def _due(step: int, every: int) -> bool:
        return every > 0 and step > 0 and step % every == 0

    def _log_image(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The image to TensorBoard, PNG-encoded on the worker thread."""
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                experiment, step = logger.experiment, trainer.global_step

                def add(image: torch.Tensor, experiment: Any = experiment, step: int = step) -> None:
                    experiment.add_image("image", image[0], global_step=step)

                self._background.submit(add, pl_module.output_image())

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
            path = Path(trainer.log_dir) / "snapshots" / f"step_{step:06d}.png"
            self._background.submit(lambda image: save_image(image, path), pl_module.output_image())
        if self._due(step, self.save_every_n_steps) and not 0 <= trainer.max_steps <= step:
            partial, depth = self.partial_path, self.bit_depth
            self._background.submit(lambda image: save_image(image, partial, depth), pl_module.output_image())
        self._background.check()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if self.log_image_every_n_steps > 0 and not self._due(trainer.global_step, self.log_image_every_n_steps):
            self._log_image(trainer, pl_module)
        self._background.finish()  # the snapshots and TensorBoard images written, or their error raised
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
            save_image(image, self.path, self.bit_depth)
        except ImageError as err:
            folders = [trainer.log_dir, None] if trainer.log_dir is not None else [None]  # None: the temporary folder
            kept = save_image_elsewhere(image, self.path.name, folders, self.bit_depth)
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
        if not isinstance(exception, Exception):
            self._background.abandon()  # "quit now"
            return
        try:
            self._background.finish()  # the snapshots already handed over are written
        except Exception as err:  # noqa: BLE001 - the run's own error is the one to report
            rank_zero_warn(f"an image of the run could not be written: {err}")
        if not trainer.is_global_zero or self._final_handled:
            return
        model = image_model(pl_module)
        image = None if model is None else model.current_image()  # None before the run has an image
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
            save_image(pl_module.output_image(), self.partial_path, self.bit_depth)
        except NSTError as err:
            rank_zero_warn(f"could not write the {what}: {err}")
            return
        note(f"Wrote the {what} to {self.partial_path} (step {step} of {max_steps}; {self.path} is left as it was)")
        if isinstance(exception, Interrupted):
            exception.image = self.partial_path
