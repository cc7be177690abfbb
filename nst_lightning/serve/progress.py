"""A server job's progress: written by its run (the ``JobProgress`` callback), read by the server (steps, ETA)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import Any

import lightning as L
import torch

from nst_lightning.io.files import file_stamp
from nst_lightning.io.image_io import save_image
from nst_lightning.run.guard import INTERRUPTED_CHECKPOINT
from nst_lightning.run.losslog import LoggedStep
from nst_lightning.run.runlog import final_losses

PROGRESS_FILE = "progress.jsonl"
PREVIEW_FILE = "preview.png"
LOG_FILE = "run.log"
# An event stream with nothing to say sends a comment this often, so that no client or proxy between takes it for
# a dead connection (read timeouts of 30-60 s are common).
KEEPALIVE_SECONDS = 15.0
KEEPALIVE = ": keep-alive\n\n"


class JobProgress(L.Callback):
    """Appends one JSON line per step (``step``, ``max_steps``, ``loss``, ``time``; ``cost`` and ``work_left``
    where the module reckons them; the last step again with the finished image's loss and ``final``, once the fit
    ends) to ``folder/progress.jsonl``
    (those of a few steps at once, as the module's :class:`~nst_lightning.run.losslog.LossLog` hands them on)
    and writes the current image to ``folder/preview.png`` (atomically) every ``preview_every_n_steps`` steps,
    at the first step and at the end. The server reads both; the run itself is the command line's.

    Args:
        folder: the job's folder.
        preview_every_n_steps: how often the preview image is written (0: only at the first and last step).
    """

    def __init__(self, folder: str, preview_every_n_steps: int = 5) -> None:
        self.folder = Path(folder)
        self.preview_every_n_steps = preview_every_n_steps
        self._previewed: int | None = None  # the step of the last preview

    def _write(self, *records: dict[str, Any]) -> None:
        with open(self.folder / PROGRESS_FILE, "a", encoding="utf-8") as file:
            file.write("".join(json.dumps(record) + "\n" for record in records))
            file.flush()
            os.fsync(file.fileno())

    def _preview(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._previewed == trainer.global_step:
            return
        self._previewed = trainer.global_step
        image = pl_module.output_image()
        if bool(torch.isfinite(image).all()):
            save_image(image, self.folder / PREVIEW_FILE)
            self._write({"preview": trainer.global_step, "time": time.time()})

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._write({"start": trainer.global_step, "max_steps": trainer.max_steps, "time": time.time()})

    def on_losses(self, trainer: L.Trainer, pl_module: L.LightningModule, rows: list[LoggedStep]) -> None:
        """The steps' records, from the module's loss log (a few steps late, at once), the step being the number of
        steps done: a row is the loss where its step started. Where the module reckons its work (``work``), a
        record has its step's ``cost`` and the ``work_left`` after it too, for :func:`eta_seconds`."""
        if not trainer.is_global_zero:
            return
        work, end = getattr(pl_module, "work", None), trainer.max_steps
        records = []
        for row in rows:
            record = {
                "step": row.step + 1,
                "max_steps": end,
                "time": row.time,
                "loss": row.loss if math.isfinite(row.loss) else None,
            }
            if callable(work) and end > 0:
                record.update(cost=work(row.step, row.step + 1), work_left=work(row.step + 1, end))
            records.append(record)
        self._write(*records)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        every = self.preview_every_n_steps
        if step == 1 or (every > 0 and step % every == 0):
            self._preview(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self._preview(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The last step's record again, with the finished image's loss (the summary's "final loss"): the records
        before hold the loss where each step started, so the page would end a step behind the terminal. After
        every ``on_train_end``, the lagged losses' last hand-on among them."""
        final = final_losses(trainer).get("total")
        if trainer.is_global_zero and final is not None and math.isfinite(final):
            end = {"step": trainer.global_step, "max_steps": trainer.max_steps, "time": time.time(), "loss": final}
            self._write({**end, "final": True})


# The last read of each job's progress file, by its stamp: the page's event streams, the worker and GET /api/jobs
# poll it several times a second, and it changes once a step.
_READ: dict[Path, tuple[tuple[int, int], list[dict[str, Any]]]] = {}
_READ_KEPT = 64


def read_progress(folder: Path) -> list[dict[str, Any]]:
    """The complete lines of a job's ``progress.jsonl`` (a line being written is left for the next read); the
    list is shared between callers until the file changes: read it, do not change it."""
    path = folder / PROGRESS_FILE
    stamp = file_stamp(path)
    if stamp is None:
        _READ.pop(path, None)
        return []
    if path in _READ and _READ[path][0] == stamp:
        return _READ[path][1]
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    if len(_READ) >= _READ_KEPT:  # a long-lived server's finished jobs need no copy
        _READ.clear()
    _READ[path] = stamp, records
    return records


def eta_seconds(records: list[dict[str, Any]]) -> float | None:
    """Seconds left, from the pace of the steps since the run (or its resumption) started: where the records
    reckon the work (a coarse-to-fine run's larger scales cost many times its first's a step), the current
    scale's pace times the work left; else the mean pace times the steps left."""
    start = next((r for r in reversed(records) if "start" in r), None)
    steps = [r for r in records if "step" in r and start is not None and r["time"] >= start["time"]]
    if start is None or not steps:
        return None
    last = steps[-1]
    if last.get("final"):  # the run is over (a guard may stop it before max_steps)
        return 0.0
    if "work_left" in last:
        scale = list(itertools.takewhile(lambda r: r.get("cost") == last["cost"], reversed(steps)))
        began = steps[-len(scale) - 1]["time"] if len(scale) < len(steps) else start["time"]
        work = sum(r["cost"] for r in scale)
        return max(0.0, (last["time"] - began) / work * last["work_left"]) if work > 0 else None
    done = last["step"] - start["start"]
    if done < 1:
        return None
    pace = (last["time"] - start["time"]) / done
    return max(0.0, pace * (last["max_steps"] - last["step"]))


def elapsed_seconds(records: list[dict[str, Any]]) -> float | None:
    """Seconds from the start of the run (or its resumption) to its latest step."""
    start = next((r for r in reversed(records) if "start" in r), None)
    last = next((r for r in reversed(records) if "step" in r), None)
    if start is None or last is None or last["time"] < start["time"]:
        return None
    return last["time"] - start["time"]


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest ``interrupted.ckpt`` of the job's runs, from which the job resumes."""
    found = list((folder / "lightning_logs").glob(f"version_*/checkpoints/{INTERRUPTED_CHECKPOINT}"))
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


NO_REASON = "the run stopped without a reason: see run.log in the job's folder"


def last_error(folder: Path) -> str:
    """The run's own one-line reason (``nst-lightning: error: ...``) from its log, or a general one."""
    try:
        lines = (folder / LOG_FILE).read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for prefix in ("nst-lightning: error: ", "nst-lightning: interrupted: "):
        found = [line[len(prefix) :] for line in lines if line.startswith(prefix)]
        if found:
            return found[-1].replace(str(folder) + os.sep, "")
    return NO_REASON


def sse(name: str, data: Any) -> str:
    """One Server-Sent Event."""
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


async def job_events(
    job_id: str,
    read: Callable[[], list[dict[str, Any]]],
    state_of: Callable[[], Awaitable[str | None]],
    shown: Callable[[], Awaitable[dict[str, Any]]],
    finished: Collection[str],
    stop: Callable[[], Awaitable[bool]],
    poll: float = 0.25,
) -> AsyncIterator[str]:
    """A run's Server-Sent Events, from its progress records (``read()``: a job's :func:`read_progress`, a watched
    run's records in memory): ``progress`` (new steps and losses, the time so far and the ETA), ``preview`` (a new
    preview image), ``state`` (``shown()``: the job, each time ``state_of()`` changes;
    ``{"id": job_id, "state": "deleted"}`` when it gives None). Ends once the state is one of ``finished``, or
    ``stop()`` is true (the client left). A server job and a watched command-line run (``--watch``) stream this."""
    current, sent_steps, sent_previews = None, 0, 0
    while not await stop():
        state = await state_of()
        if state is None:
            yield sse("state", {"id": job_id, "state": "deleted"})
            return
        records = await asyncio.to_thread(read)
        steps = [r for r in records if "step" in r]
        previews = [r for r in records if "preview" in r]
        if len(steps) > sent_steps:
            last = steps[-1]
            losses = [[r["step"], r.get("loss")] for r in steps[sent_steps:]]
            yield sse(
                "progress",
                {
                    "step": last["step"],
                    "max_steps": last["max_steps"],
                    "loss": last.get("loss"),
                    "eta_s": eta_seconds(records),
                    "elapsed_s": elapsed_seconds(records),
                    "losses": losses,
                },
            )
            sent_steps = len(steps)
        if len(previews) > sent_previews:
            sent_previews = len(previews)
            yield sse("preview", {"step": previews[-1]["preview"]})
        if state != current:
            current = state
            yield sse("state", await shown())
        if state in finished:
            return
        await asyncio.sleep(poll)


async def with_keepalive(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The Server-Sent Events of ``events``, with a comment line (:data:`KEEPALIVE`, which clients ignore) after
    each :data:`KEEPALIVE_SECONDS` in which ``events`` gave nothing."""
    iterator = events.__aiter__()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(iterator.__anext__())
            done, _ = await asyncio.wait({pending}, timeout=KEEPALIVE_SECONDS)
            if not done:
                yield KEEPALIVE
                continue
            finished, pending = pending, None
            try:
                event = finished.result()
            except StopAsyncIteration:
                return
            yield event
    finally:
        if pending is not None:  # the client left while the stream waited: stop waiting with it
            pending.cancel()
