"""``RunGuard``: a run is never lost and never stalls silently.

* **Signals.** Once the optimisation runs, the first Ctrl-C (SIGINT) or SIGTERM lets the current
  step finish, then stops the run with :class:`~nst_lightning.errors.Interrupted`: the
  :class:`~nst_lightning.run.callbacks.ImageWriter` writes the image to ``output.path`` and this callback
  a checkpoint, ``interrupted.ckpt``, next to the run's other checkpoints, from which ``--ckpt_path``
  resumes with the same image and L-BFGS state. A second signal quits at once (files are written
  atomically, so none is left truncated). Lightning's own SIGTERM handler, which would end the run
  with exit status 0 and no image, is replaced for the duration of the optimisation; Lightning puts
  the previous handlers back when ``fit`` ends.
* **Checkpoints**: the interruption's is written with the trainer's CheckpointIO (atomic, and read with
  ``weights_only=True``, where it is :class:`~nst_lightning.run.checkpoint.AtomicCheckpointIO`, as the
  command line makes it).
* **Stalls.** An image that no longer moves (L-BFGS's gradient below its tolerance, or no descent
  step found) ends the run early with a warning; a rising loss and a loss that no longer improves
  are reported.
"""

from __future__ import annotations

import collections
import math
import os
import signal
import threading
import warnings
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch

from nst_lightning.core.lbfgs import DeviceLBFGS
from nst_lightning.errors import Interrupted
from nst_lightning.run.checks import check_guard
from nst_lightning.run.losslog import LOSS, LoggedStep, LossLog
from nst_lightning.run.model import image_model

INTERRUPTED_CHECKPOINT = "interrupted.ckpt"
# A loss that improves by less than this fraction over ``stall_steps`` steps has stalled.
STALL_IMPROVEMENT = 1e-3
# A loss that grows by more than this fraction in one step is reported (once per run).
RISE_REPORTED = 0.1
# Steps in a row without any change of the image before the run is ended.
STILL_STEPS = 2
# A loss that fell by less than this fraction over the last ``LEVEL_STEPS`` steps has levelled off: an image
# that stops changing then is finished, not stuck.
LEVELLED = 1e-2
LEVEL_STEPS = 20
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _say(message: str) -> None:
    """Print from a signal handler: a plain write, which cannot collide with a print in progress."""
    try:
        os.write(2, f"\n{message}\n".encode())
    except OSError:
        pass


# What a rising loss means, by the optimiser that made the step, and what to change.
_RISE_ADVICE = {
    "lbfgs": (
        "L-BFGS without a line search overshot; it usually recovers, but if this recurs set "
        "model.lbfgs_line_search to strong_wolfe or lower model.lr"
    ),
    "strong_wolfe": "the L-BFGS line search accepted a worse point; lower model.lr if this recurs",
    "adam": "Adam's steps are too large for this image; lower model.lr if this recurs",
    "backtrack": None,  # DeviceLBFGS undoes a step that raised the loss at the next step: nothing to report
}


def optimizer_kind(optimizer: torch.optim.Optimizer | None) -> str:
    """``lbfgs``, ``strong_wolfe`` (torch's L-BFGS without and with its line search), ``backtrack``
    (:class:`~nst_lightning.core.lbfgs.DeviceLBFGS`), ``adam`` or ``other``."""
    if isinstance(optimizer, DeviceLBFGS):
        return "backtrack"
    if isinstance(optimizer, torch.optim.LBFGS):
        return "strong_wolfe" if optimizer.defaults.get("line_search_fn") else "lbfgs"
    return "adam" if isinstance(optimizer, torch.optim.Adam) else "other"


class LossWatch:
    """The bookkeeping behind the stall and rise reports: feed it each step's loss, get messages back.

    ``optimizer`` is what :func:`optimizer_kind` says of the run's optimiser: the rise report names
    what went wrong with it.
    """

    def __init__(self, stall_steps: int, optimizer: str = "lbfgs") -> None:
        self.stall_steps = stall_steps
        self.optimizer = optimizer
        self.best = math.inf
        self.best_step = 0
        self.previous: float | None = None
        self.stall_reported = False
        self.rise_reported = False
        self.recent: collections.deque[float] = collections.deque(maxlen=LEVEL_STEPS + 1)

    def update(self, step: int, loss: float) -> list[str]:
        """Messages for the loss of ``step`` (the loss at the point where that step started)."""
        messages = []
        previous, self.previous = self.previous, loss
        self.recent.append(loss)
        # Relative to the loss's size, whatever its sign: a rise is a rise.
        advice = _RISE_ADVICE.get(self.optimizer, "lower model.lr if this recurs")
        rise = previous is not None and loss - previous > RISE_REPORTED * abs(previous) + 1e-12
        if rise and advice is not None and not self.rise_reported:
            self.rise_reported = True
            messages.append(f"the loss rose at step {step}, from {previous:.4g} to {loss:.4g}: {advice}")
        if loss < self.best - STALL_IMPROVEMENT * abs(self.best) or self.best == math.inf:
            self.best, self.best_step = loss, step
        elif self.stall_steps and not self.stall_reported and step - self.best_step >= self.stall_steps:
            self.stall_reported = True
            messages.append(
                f"the loss has improved by less than {STALL_IMPROVEMENT:.1%} in the last {step - self.best_step} "
                f"steps (step {step}, loss {loss:.4g}): the image has nearly converged and more steps change little; "
                "use fewer trainer.max_steps, or change model.lr or the loss weights"
            )
        return messages

    def levelled_off(self) -> float | None:
        """How much the loss fell over the last ``LEVEL_STEPS`` steps (a fraction), where that is under
        ``LEVELLED``; ``None`` where it fell more, or fewer steps were seen."""
        if len(self.recent) <= LEVEL_STEPS or not math.isfinite(self.recent[0]) or self.recent[0] == 0:
            return None
        fall = (self.recent[0] - self.recent[-1]) / abs(self.recent[0])
        return fall if fall < LEVELLED else None


class RunGuard(L.Callback):
    """Keeps a run from being lost or from stalling silently (see the module's docstring).

    Args:
        stall_steps: warn when the loss has improved by less than 0.1% over this many steps
            (0 turns the check off).
    """

    def __init__(self, stall_steps: int = 50) -> None:
        check_guard(stall_steps=stall_steps)
        self.stall_steps = stall_steps
        # Where the interruption's checkpoint goes; None: checkpoint_dir/interrupted.ckpt. A batch
        # sets a fixed place per pair, where the next run of the same command finds it.
        self.interrupted_path: Path | None = None
        self.signal_received: int | None = None
        self._armed = False
        self._handlers: dict[int, Any] = {}
        self._watch: LossWatch | None = None
        self._image_before: torch.Tensor | None = None
        self._still = 0
        self._new_scales: list[int] = []  # the steps at which a coarse-to-fine run moved to its next scale

    # ------------------------------------------------------------------ checkpoints

    @staticmethod
    def checkpoint_dir(trainer: L.Trainer) -> Path:
        """Where the run's checkpoints go: ModelCheckpoint's folder, else ``<log dir>/checkpoints``."""
        callback = trainer.checkpoint_callback
        if callback is not None and getattr(callback, "dirpath", None):
            return Path(callback.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    # ------------------------------------------------------------------ signals

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signal_received is None and self._armed:
            self.signal_received = signum
            _say(
                f"nst-lightning: {name} received: finishing the current step, then writing the image and a "
                "checkpoint (press Ctrl-C again to quit at once)"
            )
            return
        _say(f"nst-lightning: {name} received again: quitting at once")
        raise SystemExit(128 + signum)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signal_received = signal.SIGTERM if trainer.received_sigterm else None
        if threading.current_thread() is threading.main_thread():
            for signum in _SIGNALS:
                self._handlers[signum] = signal.signal(signum, self._on_signal)
        self._armed = True
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        self._watch = LossWatch(self.stall_steps, optimizer_kind(optimizer))
        self._still = 0
        self._new_scales = []

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Lightning restores the handlers it found when fit started; this only covers a Trainer whose
        # signal connector did not (a handler of ours left in place would outlive the run).
        self._armed = False
        if threading.current_thread() is threading.main_thread():
            for signum, previous in self._handlers.items():
                if signal.getsignal(signum) == self._on_signal and previous is not None:
                    signal.signal(signum, previous)
        self._handlers = {}

    # ------------------------------------------------------------------ steps

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        model = image_model(pl_module)
        image = model.current_image() if model is not None else None
        if image is not None:
            if self._image_before is None or self._image_before.shape != image.shape:
                self._image_before = image.detach().clone()
            else:
                self._image_before.copy_(image.detach())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        self._check_progress(trainer, pl_module, outputs, step)
        done = 0 <= trainer.max_steps <= step
        if self.signal_received is not None and not done:
            raise Interrupted(self.signal_received, step, trainer.max_steps)

    def on_losses(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[LoggedStep]) -> None:
        """The loss watch reads each step's loss from the module's :class:`~nst_lightning.run.losslog.LossLog`, a few
        steps late: the reports name the step they are about."""
        for row in rows:
            if self._new_scales and row.step >= self._new_scales[0]:  # a coarse-to-fine run's next scale:
                del self._new_scales[0]
                if self._watch is not None:
                    self._watch = LossWatch(self.stall_steps, self._watch.optimizer)  # a new loss to watch
            if self._watch is not None and trainer.is_global_zero:
                # A row is the loss where its step started: reported as of the end of that step, as before.
                for message in self._watch.update(row.step + 1, row.loss):
                    warnings.warn(message, stacklevel=2)

    def _check_progress(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, step: int) -> None:
        model = image_model(pl_module)
        image = model.current_image() if model is not None else None
        if image is not None and self._image_before is not None and image.shape != self._image_before.shape:
            self._new_scales.append(step - 1)  # the rows of that step on are the new scale's
        losses = getattr(pl_module, "losses", None)
        if not isinstance(losses, LossLog):  # a module without a loss log: read the loss now
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if isinstance(loss, torch.Tensor):
                self.on_losses(trainer, pl_module, [LoggedStep(step - 1, 0.0, {LOSS: float(loss)})])
        if image is None or self._image_before is None or image.shape != self._image_before.shape:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        if isinstance(optimizer, DeviceLBFGS):  # it counts the steps that left the image as it was
            self._still = int(optimizer.still_steps())
        else:
            self._still = self._still + 1 if torch.equal(image.detach(), self._image_before) else 0
        if self._still < STILL_STEPS:
            return
        trainer.should_stop = True
        if isinstance(losses, LossLog):
            losses.drain(trainer, pl_module)  # the loss watch up to this step, for the message
        if trainer.is_global_zero:
            warnings.warn(self._still_message(trainer, image, step, self._watch), stacklevel=2)

    @staticmethod
    def _still_message(trainer: L.Trainer, image: torch.Tensor, step: int, watch: LossWatch | None = None) -> str:
        optimizer = trainer.optimizers[0]
        tolerance = optimizer.defaults.get("tolerance_grad")
        grad = image.grad
        levelled = watch.levelled_off() if watch is not None else None
        if tolerance is not None and grad is not None and float(grad.abs().max()) <= tolerance:
            why = f"the gradient is below L-BFGS's tolerance ({tolerance:g}): the image has converged"
        elif levelled is not None:
            why = (
                f"the loss had levelled off (down {levelled:.2%} over the last {LEVEL_STEPS} steps) and no lower "
                "point was found within float32's precision: the image is finished"
            )
        elif isinstance(optimizer, (torch.optim.LBFGS, DeviceLBFGS)):
            why = (
                "L-BFGS found no step that lowers the loss (its line search failed or its direction went uphill); "
                "a lower model.lr or a new run may help"
            )
        else:
            why = "the gradient is zero"
        return f"the image has not changed in the last {STILL_STEPS} steps (step {step}): {why}; ending the run early"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._armed = False
        if not isinstance(exception, Interrupted) or not trainer.is_global_zero:
            return
        path = self.interrupted_path or self.checkpoint_dir(trainer) / INTERRUPTED_CHECKPOINT
        try:
            trainer.save_checkpoint(path, weights_only=False)
        except Exception as err:  # noqa: BLE001 - report it in the interruption's message, keep the exit code
            exception.checkpoint_error = str(err)
        else:
            exception.checkpoint = path
