"""The per-frame runs of a video: the work folder (frames in and out, flows, settings), resume, progress, summary.

Each frame is one ``fit`` of the same Trainer, module and data module, built once (the extractor loaded and the
style targets computed once; per frame :meth:`~nst_lightning.run.module.StyleTransfer.restart` and the data module's
``set_content`` swap in the frame and its start, and one TensorBoard run holds every frame's steps one after the
other): the first frame cold (the config's init, ``steps_first`` iterations), every later frame
started from the previous stylised frame warped by the optical flow, with ``steps`` iterations and the
temporal term of :meth:`~nst_lightning.core.objective.Objective.set_temporal` (Ruder et al. 2016). Every file of
the work folder is written atomically and the previous frame is always read back from its PNG, so a run
killed at any point resumes at the first frame without a stylised PNG and produces the same frames.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import lightning as L
import numpy as np
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from tqdm import tqdm

from nst_lightning.errors import ImageError
from nst_lightning.io.files import atomic_write, file_kind
from nst_lightning.io.image_io import open_rgb, save_image
from nst_lightning.run.callbacks import ImageWriter, partial_path
from nst_lightning.run.data import StyleTransferDataModule
from nst_lightning.run.module import StyleTransfer
from nst_lightning.run.runlog import RunLogger
from nst_lightning.video.flow import optical_flow, reliability, warp

WORK_SUFFIX = ".parts"
"""The work folder of OUT is OUT + this (``clip.mp4.parts/``): kept until OUT is written, so a run can resume."""
SETTINGS_FILE = "settings.json"
LOGS_FILE = "logs.txt"


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0).float().div(255.0)


def save_pixels(pixels: np.ndarray, path: Path) -> None:
    """An (H, W, 3) uint8 array written losslessly and atomically (PNG,
    :func:`~nst_lightning.io.image_io.save_image`)."""
    save_image(to_tensor(pixels), path)


def write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """:func:`~nst_lightning.io.files.atomic_write`, whose ``OSError`` (a full disk...) names ``path``."""
    try:
        atomic_write(path, write)
    except OSError as err:
        if err.filename is None:
            err.filename = str(path)
        raise


def read_pixels(path: Path) -> np.ndarray:
    """An image file as an (H, W, 3) uint8 array."""
    return np.asarray(open_rgb(path), dtype=np.uint8)


class WorkFolder:
    """``OUT.parts/``: ``input/`` (the decoded frames at the stylisation size), ``flow/`` (forward and backward
    flow per frame pair, computed once), ``stylised/`` (finished frames, each with a JSON record of its losses and
    time), with ``settings.json`` saying what made them and ``logs.txt`` where the TensorBoard run is."""

    def __init__(self, output: Path) -> None:
        self.root = output.with_name(output.name + WORK_SUFFIX)

    def _file(self, kind: str, index: int, suffix: str = ".png") -> Path:
        return self.root / kind / f"{index + 1:06d}{suffix}"

    def input(self, index: int) -> Path:
        return self._file("input", index)

    def stylised(self, index: int) -> Path:
        return self._file("stylised", index)

    def flow(self, index: int) -> Path:
        return self._file("flow", index, ".npz")

    def record(self, index: int) -> Path:
        return self._file("stylised", index, ".json")

    def logs(self, base: Path) -> Path:
        """The video's TensorBoard run: the next free ``base/version_N`` for a new work folder, recorded in it
        (``logs.txt``), so that a resumed run, and every process of a ``--devices`` run, logs on into it."""
        record = self.root / LOGS_FILE
        if file_kind(record) == "file":
            return Path(record.read_text().strip())
        taken = [int(p.name[8:]) for p in base.glob("version_*") if p.name[8:].isdigit()] if base.is_dir() else []
        logs = base / f"version_{max(taken, default=-1) + 1}"
        write_file(record, lambda handle: handle.write(f"{logs}\n".encode()))
        return logs

    def claim(self, settings: Mapping[str, Any]) -> bool:
        """Takes the folder for a run with ``settings``: True when it holds a run of the same settings to resume,
        False when it is new. One of other settings (or not ours) is refused: its frames are someone's work."""
        saved = self.root / SETTINGS_FILE
        kind = file_kind(self.root)
        if kind == "missing":
            write_file(saved, lambda handle: handle.write(json.dumps(settings, indent=1).encode()))
            return False
        try:
            before = json.loads(saved.read_text()) if kind == "folder" else None
        except (OSError, ValueError):
            before = None
        if before != json.loads(json.dumps(settings)):
            raise ImageError(
                f"{self.root} holds the frames of another video run (other input, styles or settings): rerun that "
                "command to resume it, or remove the folder to start over"
            )
        return True

    def first_unfinished(self, count: int, start: int = 0) -> int:
        """The first frame from ``start`` on without its stylised image (``count`` when every one is done)."""
        return next((i for i in range(start, count) if file_kind(self.stylised(i)) != "file"), count)

    def drop_from(self, index: int, count: int) -> None:
        """Removes the stylised frames from ``index`` on (each depends on the one before) and partial images."""
        for i in range(index, count):
            for path in (self.stylised(i), self.record(i), partial_path(self.stylised(i))):
                path.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def frame_flows(work: WorkFolder, index: int) -> tuple[np.ndarray, np.ndarray]:
    """(forward flow from frame ``index - 1`` to ``index``, backward flow from ``index`` to ``index - 1``) of the
    input frames, computed once and kept in the work folder."""
    path = work.flow(index)
    if file_kind(path) == "file":
        with np.load(path) as saved:
            return saved["forward"], saved["backward"]
    previous, current = read_pixels(work.input(index - 1)), read_pixels(work.input(index))
    forward, backward = optical_flow(previous, current), optical_flow(current, previous)
    write_file(path, lambda handle: np.savez(handle, forward=forward, backward=backward))
    return forward, backward


@dataclass
class FrameResult:
    """One stylised frame: its index, iterations, seconds and final losses."""

    index: int
    steps: int
    seconds: float
    losses: dict[str, float] = field(default_factory=dict)


@dataclass
class VideoPlan:
    """How the frames are stylised (what the command line decided)."""

    frames: int
    steps_first: int
    steps: int
    temporal_weight: float
    independent: bool
    """Every frame like the first: cold, ``steps_first`` iterations, no temporal term (the flickering baseline)."""
    data: dict[str, Any]
    """The data module's settings; ``content`` is set per frame."""
    trainer: dict[str, Any]
    """Trainer arguments of the run (accelerator, precision)."""
    logs: Path
    """TensorBoard: one run for the whole video, every frame's steps after the frames before."""
    cold: tuple[int, ...] = (0,)
    """The frames that start cold like the first: the first frame of each segment (``--devices``)."""

    def warm(self, index: int) -> bool:
        """Whether frame ``index`` starts from the previous stylised frame (with the temporal term)."""
        return index not in self.cold and not self.independent

    def frame_steps(self, index: int) -> int:
        return self.steps if self.warm(index) else self.steps_first

    def first_step(self, index: int) -> int:
        """Frame ``index``'s first step in the video's TensorBoard run: the steps of every frame before it."""
        cold = sum(1 for i in range(index) if not self.warm(i))
        return cold * self.steps_first + (index - cold) * self.steps


class VideoLogger(RunLogger):
    """The video's one TensorBoard run (``logs``): each step logged at ``offset`` + the Trainer's step (the steps of
    the frames before this process's first), so a resumed run or a segment of ``--devices`` carries on the same
    curves; the settings logged once, and the event file kept open from one frame's fit to the next."""

    def __init__(self, logs: Path, offset: int) -> None:
        super().__init__(save_dir=logs.parent, name=None, version=logs.name)
        self.offset = offset
        self._settings_logged = False

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        if not self._settings_logged:
            self._settings_logged = True
            super().log_hyperparams(params, *args, **kwargs)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + self.offset)

    def log_frame(self, image: torch.Tensor, index: int, step: int) -> None:
        """A finished frame: the image and its number, at its last step."""
        self.experiment.add_image("frame", image[0], global_step=step + self.offset)
        self.log_metrics({"frame": index + 1}, step)
        self.experiment.flush()  # a run killed later keeps it

    def finalize(self, status: str) -> None:
        if status == "success":  # a frame's fit: the next one logs on into the same event file
            self.experiment.flush()
            return
        super().finalize(status)

    def close(self) -> None:
        super().finalize("success")


class FrameRunner:
    """Runs the frames of a :class:`VideoPlan` in order with one module, one data module and one Trainer (fitted
    again for each frame), writing each frame as it finishes."""

    def __init__(self, module: StyleTransfer, plan: VideoPlan, work: WorkFolder) -> None:
        self.module, self.plan, self.work = module, plan, work
        self.trainer: L.Trainer | None = None
        self.logger: VideoLogger | None = None
        self.data: StyleTransferDataModule | None = None
        self.writer: ImageWriter | None = None

    def _trainer(self, index: int) -> L.Trainer:
        """The Trainer, built at the first frame this process runs."""
        if self.trainer is None:
            self.data = StyleTransferDataModule(**{**self.plan.data, "content": str(self.work.input(index))})
            self.writer = ImageWriter(str(self.work.stylised(index)), log_image_every_n_steps=0, overwrite=True)
            self.logger = VideoLogger(self.plan.logs, self.plan.first_step(index))
            self.trainer = L.Trainer(
                max_steps=0,
                logger=self.logger,
                callbacks=[self.writer],
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                log_every_n_steps=1,
                **{"devices": 1, **self.plan.trainer},
            )
        return self.trainer

    def close(self) -> None:
        """Closes the TensorBoard run (after the last frame, or a failure)."""
        if self.logger is not None:
            self.logger.close()

    def prepare(self, index: int) -> torch.Tensor | None:
        """The temporal term for frame ``index``, and its start: the previous stylised frame warped into it, or
        None (the config's init) for a cold frame (see the module docstring)."""
        objective = self.module.objective
        if not self.plan.warm(index):
            objective.set_temporal(None)
            return None
        forward, backward = frame_flows(self.work, index)
        warped = to_tensor(warp(read_pixels(self.work.stylised(index - 1)), backward))
        objective.set_temporal(
            warped, torch.from_numpy(reliability(forward, backward))[None, None], self.plan.temporal_weight
        )
        return warped

    def run(self, index: int) -> FrameResult:
        """Stylises frame ``index`` (its previous frame must be done) into the work folder."""
        started = time.perf_counter()
        trainer = self._trainer(index)
        self.module.restart(self.prepare(index))
        self.data.set_content(str(self.work.input(index)))
        self.writer.path = self.work.stylised(index)
        first = trainer.global_step
        trainer.fit_loop.epoch_loop.max_steps = first + self.plan.frame_steps(index)  # the frame's steps
        trainer.fit(self.module, datamodule=self.data)
        if trainer.state.status != TrainerStatus.FINISHED or file_kind(self.work.stylised(index)) != "file":
            raise ImageError(f"frame {index + 1} stopped before its last step: rerun the same command to resume")
        with torch.no_grad():
            losses = {k: float(v) for k, v in self.module(self.module.image).items() if not k.startswith("style_")}
        self.logger.log_frame(self.module.output_image(), index, trainer.global_step - 1)
        result = FrameResult(index, trainer.global_step - first, time.perf_counter() - started, losses)
        record = {"steps": result.steps, "seconds": result.seconds, "losses": losses}
        write_file(self.work.record(index), lambda handle: handle.write(json.dumps(record).encode()))
        self.module.objective.set_temporal(None)
        return result


def segments(frames: int, count: int) -> list[tuple[int, int]]:
    """``frames`` split into ``count`` contiguous segments, (first, end) each, as even as they go (the longer first)."""
    size, extra = divmod(frames, count)
    bounds = [0]
    for n in range(count):
        bounds.append(bounds[-1] + size + (1 if n < extra else 0))
    return list(zip(bounds, bounds[1:], strict=False))


def run_frames(
    runner: FrameRunner,
    start: int,
    report: Callable[[FrameResult], None] | None = None,
    segment: tuple[int, int] | None = None,
    position: int | None = None,
) -> list[FrameResult]:
    """Frames ``start`` to the end of ``segment`` (the whole clip if none), with a progress bar over those
    frames (ETA) on a terminal; ``position``: the bar's line among several processes' bars."""
    first, end = segment if segment is not None else (0, runner.plan.frames)
    desc = "frames" if segment is None else f"frames {first + 1}-{end}"
    bar = tqdm(
        total=end - first,
        initial=start - first,
        desc=desc,
        unit="frame",
        disable=not sys.stderr.isatty(),
        file=sys.stderr,
        dynamic_ncols=True,
        position=position,
    )
    results = []
    try:
        for index in range(start, end):
            result = runner.run(index)
            results.append(result)
            if report is not None:
                report(result)
            bar.update()
            if bar.disable:  # no terminal (a log file, a pipe): one line a frame
                print(
                    f"frame {index + 1}/{runner.plan.frames}: {result.steps} iterations, {result.seconds:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        bar.close()
        runner.close()
    return results


def summary(
    output: Path,
    results: list[FrameResult],
    total: int,
    resumed: int,
    seconds: float,
    logs: Path,
    cold: tuple[int, ...] = (0,),
) -> str:
    """The last line of a video run; ``cold``: the first frame of each segment (several with ``--devices``),
    and ``resumed`` then counts the frames done before in all segments."""
    from nst_lightning.io.text import duration, shown_path

    first = [r for r in results if r.index in cold]
    later = [r for r in results if r.index not in cold]
    parts = [f"{total} frames"]
    if len(cold) > 1:
        parts.append(f"{len(cold)} segments on {len(cold)} processes")
    if resumed and len(cold) == 1:
        parts.append(f"{resumed} done before, resumed at frame {resumed + 1}")
    elif resumed:
        parts.append(f"{resumed} done before")
    if len(first) > 1:
        mean = sum(r.seconds for r in first) / len(first)
        parts.append(f"first frames of the segments {mean:.1f} s each ({first[0].steps} iterations)")
    elif first:
        parts.append(f"first frame {duration(first[0].seconds)} ({first[0].steps} iterations)")
    if later:
        mean = sum(r.seconds for r in later) / len(later)
        parts.append(f"later frames {mean:.1f} s each ({later[0].steps} iterations)")
    parts.append(duration(seconds))
    return f"done: {shown_path(output)} ({', '.join(parts)}); logs: tensorboard --logdir {shown_path(logs)}"
