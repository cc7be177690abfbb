"""The per-frame runs of a video: the work folder (frames in and out, flows, settings), resume, progress, summary.

Each frame is one ``Trainer.fit`` of the same :class:`~nst_lightning.module.StyleTransfer` (its extractor
loaded once): the first frame cold (the config's init, ``steps_first`` iterations), every later frame
started from the previous stylised frame warped by the optical flow, with ``steps`` iterations and the
temporal term of :meth:`~nst_lightning.objective.Objective.set_temporal` (Ruder et al. 2016). Every file of
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

from nst_lightning.callbacks import ImageWriter, partial_path
from nst_lightning.data import StyleTransferDataModule
from nst_lightning.errors import ImageError
from nst_lightning.files import atomic_write, file_kind
from nst_lightning.image_io import open_rgb, save_image
from nst_lightning.module import StyleTransfer
from nst_lightning.runlog import RunLogger
from nst_lightning.video.flow import optical_flow, reliability, warp

WORK_SUFFIX = ".parts"
"""The work folder of OUT is OUT + this (``clip.mp4.parts/``): kept until OUT is written, so a run can resume."""
SETTINGS_FILE = "settings.json"


def to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).unsqueeze(0).float().div(255.0)


def save_pixels(pixels: np.ndarray, path: Path) -> None:
    """An (H, W, 3) uint8 array written losslessly and atomically (PNG, :func:`~nst_lightning.image_io.save_image`)."""
    save_image(to_tensor(pixels), path)


def write_file(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """:func:`~nst_lightning.files.atomic_write`, whose ``OSError`` (a full disk...) names ``path``."""
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
    flow per frame pair, computed once), ``init/`` (each warm start), ``stylised/`` (finished frames) and
    ``frames.json`` (each finished frame's losses and time), with ``settings.json`` saying what made them."""

    def __init__(self, output: Path) -> None:
        self.root = output.with_name(output.name + WORK_SUFFIX)

    def _file(self, kind: str, index: int, suffix: str = ".png") -> Path:
        return self.root / kind / f"{index + 1:06d}{suffix}"

    def input(self, index: int) -> Path:
        return self._file("input", index)

    def stylised(self, index: int) -> Path:
        return self._file("stylised", index)

    def init(self, index: int) -> Path:
        return self._file("init", index)

    def flow(self, index: int) -> Path:
        return self._file("flow", index, ".npz")

    def record(self, index: int) -> Path:
        return self._file("stylised", index, ".json")

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
    init: str
    """The first frame's init (the config's ``model.init``)."""
    data: dict[str, Any]
    """The data module's settings; ``content`` is set per frame."""
    trainer: dict[str, Any]
    """Trainer arguments of every frame's run (accelerator, precision)."""
    logs: Path
    """TensorBoard: one run per frame, ``logs/frame_000001``..."""
    cold: tuple[int, ...] = (0,)
    """The frames that start cold like the first: the first frame of each segment (``--devices``)."""


class FrameRunner:
    """Runs the frames of a :class:`VideoPlan` in order with one module, writing each as it finishes."""

    def __init__(self, module: StyleTransfer, plan: VideoPlan, work: WorkFolder) -> None:
        self.module, self.plan, self.work = module, plan, work

    def warm(self, index: int) -> bool:
        return index not in self.plan.cold and not self.plan.independent

    def prepare(self, index: int) -> None:
        """The module's start and temporal term for frame ``index`` (see the module docstring)."""
        objective, hparams = self.module.objective, self.module.hparams
        self.module.image = None  # setup() builds a new image from the frame and the init
        if not self.warm(index):
            hparams.init = self.plan.init
            objective.set_temporal(None)
            return
        forward, backward = frame_flows(self.work, index)
        previous = read_pixels(self.work.stylised(index - 1))
        warped = warp(previous, backward)
        save_pixels(warped, self.work.init(index))
        hparams.init = str(self.work.init(index))
        mask = torch.from_numpy(reliability(forward, backward))[None, None]
        objective.set_temporal(to_tensor(warped), mask, self.plan.temporal_weight)

    def run(self, index: int) -> FrameResult:
        """Stylises frame ``index`` (its previous frame must be done) into the work folder."""
        started = time.perf_counter()
        self.prepare(index)
        steps = self.plan.steps if self.warm(index) else self.plan.steps_first
        data = StyleTransferDataModule(**{**self.plan.data, "content": str(self.work.input(index))})
        writer = ImageWriter(str(self.work.stylised(index)), log_image_every_n_steps=steps, overwrite=True)
        logger = RunLogger(save_dir=self.plan.logs, name=None, version=f"frame_{index + 1:06d}")
        trainer = L.Trainer(
            max_steps=steps, logger=logger, callbacks=[writer], enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, log_every_n_steps=1, **{"devices": 1, **self.plan.trainer},
        )  # fmt: skip
        trainer.fit(self.module, datamodule=data)
        if trainer.state.status != TrainerStatus.FINISHED or file_kind(self.work.stylised(index)) != "file":
            raise ImageError(f"frame {index + 1} stopped before its last step: rerun the same command to resume")
        with torch.no_grad():
            losses = {k: float(v) for k, v in self.module(self.module.image).items() if not k.startswith("style_")}
        result = FrameResult(index, trainer.global_step, time.perf_counter() - started, losses)
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
        total=end - first, initial=start - first, desc=desc, unit="frame", disable=not sys.stderr.isatty(),
        file=sys.stderr, dynamic_ncols=True, position=position,
    )  # fmt: skip
    results = []
    try:
        for index in range(start, end):
            result = runner.run(index)
            results.append(result)
            if report is not None:
                report(result)
            bar.update()
    finally:
        bar.close()
    return results


def summary(
    output: Path, results: list[FrameResult], total: int, resumed: int, seconds: float, logs: Path,
    cold: tuple[int, ...] = (0,),
) -> str:
    """The last line of a video run; ``cold``: the first frame of each segment (several with ``--devices``),
    and ``resumed`` then counts the frames done before in all segments."""
    from nst_lightning.console import duration, shown_path

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
    return f"done: {shown_path(output)} ({', '.join(parts)}); per-frame logs: tensorboard --logdir {shown_path(logs)}"

