"""``LossLog``: each step's losses kept on the device and handed on a few steps later, off the loop's critical path.

Reading a loss on the host waits for the device to finish everything queued before it: ten ``self.log`` calls a
step were ten such waits. Here a step's losses go into a row of a small tensor on the device (no wait); every
``every`` steps the rows are copied to the host without blocking (into pinned memory, on CUDA) and, once that copy
is done (a later step, or the end of the run), handed on, each under its own step number:

* to the trainer's loggers (``logger.log_metrics(values, step=row.step)``): TensorBoard still holds every step;
* to every callback (and the module) with an ``on_losses(trainer, pl_module, rows)`` method, rows being
  :class:`LoggedStep`: the guard's loss watch, the web app's progress, any check that only needs to know a few
  steps late (a non-finite loss at step k, say);
* to the progress bar, as the latest ``loss``.

At the end of a run, and when it fails or is interrupted, every row recorded is handed on first.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import Tensor

LOSS = "loss"
"""The name of the total loss (what the progress bar shows)."""
FLUSH_EVERY = 10
"""Steps recorded on the device before their copy to the host starts (the first step's goes at once)."""


@dataclass(frozen=True)
class LoggedStep:
    """One step's losses, read back on the host: the step (``global_step`` where it started), when it was recorded
    (``time.time()``) and its values by name (``loss``, ``loss/content``, ..., ``closure_evaluations``)."""

    step: int
    time: float
    values: dict[str, float]

    @property
    def loss(self) -> float:
        return self.values[LOSS]


def step_values(losses: Mapping[str, Tensor], evaluations: int | Tensor) -> dict[str, Tensor | int]:
    """The values a step logs: the objective's ``losses`` (``total`` as ``loss``, the others as ``loss/<name>``) and
    the closure evaluations it made."""
    values: dict[str, Tensor | int] = {LOSS: losses["total"]}
    values.update({f"loss/{name}": value for name, value in losses.items() if name != "total"})
    values["closure_evaluations"] = evaluations
    return values


@dataclass
class _Copy:
    """Rows on their way to the host: ``host`` is ready once ``event`` (None: already) has passed."""

    host: Tensor | None
    event: Any
    columns: list[str]
    steps: list[tuple[int, float, dict[str, float]]]  # step, time, the values that were host numbers already


class LossLog(L.Callback):
    """Keeps each step's losses on the device and hands them on a few steps later (see the module docstring).

    The module records a step with :meth:`record`; a StyleTransfer returns its log from ``configure_callbacks``, so
    every Trainer that fits it hands the rows on.

    Args:
        every: steps recorded before their copy to the host starts.
    """

    def __init__(self, every: int = FLUSH_EVERY) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.every = every
        self.latest: LoggedStep | None = None
        self._reset()

    def _reset(self) -> None:
        self._columns: list[str] = []  # the names of the values kept on the device, in row order
        self._buffer: Tensor | None = None  # every x columns, on the device
        self._rows: list[tuple[int, float, dict[str, float]]] = []  # the rows of the buffer filled so far
        self._copies: deque[_Copy] = deque()
        self._started = False  # a copy was started this run (the first step's goes at once)

    # ------------------------------------------------------------------ recording (the loop's thread, no wait)

    def record(self, step: int, values: Mapping[str, Tensor | float]) -> None:
        """Keeps the values of ``step``: tensors (one element each) on their device, numbers as they are."""
        tensors = {name: value for name, value in values.items() if isinstance(value, Tensor)}
        numbers = {name: float(value) for name, value in values.items() if not isinstance(value, Tensor)}
        columns = list(tensors)
        device = next(iter(tensors.values())).device if tensors else None
        if columns != self._columns or (self._buffer is not None and self._buffer.device != device):
            self._start_copy()  # another objective or device: the rows so far go, a new buffer
            self._columns = columns
            self._buffer = torch.empty(self.every, len(columns), device=device) if columns else None
        if self._buffer is not None:
            row = torch.stack([value.detach().reshape(()).float() for value in tensors.values()])
            self._buffer[len(self._rows)].copy_(row)
        self._rows.append((step, time.time(), numbers))
        if len(self._rows) == self.every or not self._started:
            self._start_copy()

    def _start_copy(self) -> None:
        """Starts copying the rows filled so far to the host (without waiting for it)."""
        if not self._rows:
            return
        self._started = True
        event, host = None, None
        if self._buffer is not None:
            rows = self._buffer[: len(self._rows)]
            if rows.device.type == "cuda":
                host = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
                host.copy_(rows, non_blocking=True)
                event = torch.cuda.Event()
                event.record(torch.cuda.current_stream(rows.device))  # the stream the copy is on
            else:
                host = rows.to("cpu", copy=True)
        self._copies.append(_Copy(host, event, self._columns, self._rows))
        self._rows = []

    def _arrived(self, wait: bool) -> list[LoggedStep]:
        """The rows whose copy is done (with ``wait``: every row recorded, waiting for the device)."""
        if wait:
            self._start_copy()
        arrived = []
        while self._copies:
            copy = self._copies[0]
            if copy.event is not None:
                if not wait and not copy.event.query():
                    break
                copy.event.synchronize()
            self._copies.popleft()
            table = copy.host.tolist() if copy.host is not None else [[] for _ in copy.steps]
            for (step, when, numbers), row in zip(copy.steps, table, strict=True):
                arrived.append(LoggedStep(step, when, {**dict(zip(copy.columns, row, strict=True)), **numbers}))
        return arrived

    # ------------------------------------------------------------------ handing on

    def drain(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[LoggedStep]:
        """Hands on every row recorded so far now, waiting for the device (a check that cannot wait, the run's end)."""
        return self._hand_on(trainer, pl_module, self._arrived(wait=True))

    def _hand_on(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[LoggedStep]) -> list[LoggedStep]:
        if not rows:
            return rows
        self.latest = rows[-1]
        every = max(int(trainer.log_every_n_steps or 1), 1)
        for logger in trainer.loggers:
            for row in rows:
                if (row.step + 1) % every == 0:
                    logger.log_metrics(row.values, step=row.step)
            logger.save()
        for listener in [*trainer.callbacks, pl_module]:
            on_losses = getattr(listener, "on_losses", None)
            if callable(on_losses):
                on_losses(trainer, pl_module, rows)
        return rows

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()
        self.latest = None

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._hand_on(trainer, pl_module, self._arrived(wait=False))
        if self.latest is not None and math.isfinite(self.latest.loss):
            # A host number, as a CPU tensor: the bar's value never waits for the device.
            pl_module.log(LOSS, torch.tensor(self.latest.loss), prog_bar=True, logger=False, batch_size=1)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.drain(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            self.drain(trainer, pl_module)
        except Exception:  # noqa: BLE001 - the run's own error is the one to report (a device fault, say)
            self._reset()
