"""The callback of a watched command-line run (``--watch``): a server job's progress records, kept in memory."""

from __future__ import annotations

import io
import time
from typing import Any

import lightning as L
import torch

from nst_lightning.io.image_io import tensor_to_pil
from nst_lightning.run.callbacks import Background
from nst_lightning.serve.progress import JobProgress
from nst_lightning.serve.watch import Hub

PREVIEW_SECONDS = 1.0
"""The least time between two images sent to the page (besides the first step's and the last)."""


class WatchFeed(JobProgress):
    """:class:`~nst_lightning.serve.progress.JobProgress`'s records (the start, each step's lagged losses, the
    images) handed to a :class:`~nst_lightning.serve.watch.Hub` instead of a job's folder; the image is encoded
    to PNG on a worker thread (:class:`~nst_lightning.run.callbacks.Background`), at most once a
    :data:`PREVIEW_SECONDS`, at the first step and at the end."""

    def __init__(self, hub: Hub, preview_seconds: float = PREVIEW_SECONDS) -> None:
        super().__init__(folder=".", preview_every_n_steps=0)
        self.hub = hub
        self.preview_seconds = preview_seconds
        self._images = Background()
        self._last = 0.0  # time.monotonic() of the last image handed over
        self._sent: int | None = None  # its step

    def _write(self, *records: dict[str, Any]) -> None:
        self.hub.add(*records)

    def _preview(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._sent == step:
            return
        self._sent, self._last = step, time.monotonic()
        hub = self.hub

        def encode(image: torch.Tensor) -> None:
            if bool(torch.isfinite(image).all()):
                buffer = io.BytesIO()
                tensor_to_pil(image).save(buffer, format="PNG", compress_level=1)
                hub.set_image(buffer.getvalue(), step)

        self._images.submit(encode, pl_module.output_image())

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        due = trainer.global_step == 1 or time.monotonic() - self._last >= self.preview_seconds
        if trainer.is_global_zero and due:
            self._preview(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._images.finish()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._images.abandon()
