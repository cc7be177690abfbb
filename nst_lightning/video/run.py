"""The run of ``nst-lightning video`` once its command line is checked (:mod:`.command`): the clip probed, the
work folder claimed, the frames decoded, the module built, the segments stylised (one process, or one per
device), OUT written. PyAV, OpenCV, torch and Lightning load with this module.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nst_lightning import __version__
from nst_lightning.batch.launch import as_rank_zero, device_placement, launch, start_fabric
from nst_lightning.cli import configs, early, oneshot
from nst_lightning.cli.fit import StyleTransferCLI
from nst_lightning.errors import ConfigError, ImageError, NSTError
from nst_lightning.io.console import note
from nst_lightning.io.files import file_kind
from nst_lightning.io.image_io import fit_size, open_rgb, resized
from nst_lightning.run import checks
from nst_lightning.run.data import StyleTransferDataModule
from nst_lightning.run.memory import out_of_memory
from nst_lightning.run.plan import plan_run
from nst_lightning.video import Stopped
from nst_lightning.video.frames import FrameRunner, VideoPlan, WorkFolder, run_frames, save_pixels, segments, summary
from nst_lightning.video.media import VideoInfo, decode_frames, encode_video, probe, write_png_sequence


def run_video(args: argparse.Namespace, rest: list[str], argv: list[str], kind: str, started: float) -> None:
    """Runs the video command whose flags are ``args`` (the one-shot form's options in ``rest``; ``argv`` as given
    after ``video``; ``kind`` OUT's: "video" or "png"); errors are raised as :class:`~nst_lightning.errors.NSTError`."""
    source, output = Path(args.input), Path(args.output)
    styles = [Path(style) for style in args.styles]
    info = probe(source)
    if args.devices > info.frames:
        raise ConfigError(
            f"--devices {args.devices} is more than the {info.frames} frames of {source}: each process needs a "
            f"segment of at least one frame; give --devices {info.frames} or fewer"
        )
    if args.devices > 1 and [arg for arg in sys.argv[1:] if arg != "--verbose"] != ["video", *argv]:
        raise ConfigError(
            "--devices above 1 starts processes that re-run the command line: run it as a command "
            "(nst-lightning video ...), not through cli_main(args) from Python"
        )
    layout = segments(info.frames, args.devices)
    side = min(args.size, max(info.width, info.height))
    size = fit_size(info.width, info.height, side)
    work = WorkFolder(output)
    video_flags = {
        k: v
        for k, v in vars(args).items()
        if k not in ("input", "styles", "output", "keep_frames", "overwrite", "devices")
    }
    settings = {
        "version": __version__,
        "input": _fingerprint(source),
        "styles": [_fingerprint(s) for s in styles],
        "flags": video_flags,
        "options": rest,
        "frames": info.frames,
        "size": list(size),
        "configs": _config_digests(rest),
    }
    if args.devices > 1 and not args.independent:
        # Which frames start cold changes the frames; with one segment the record is as it always was.
        settings["cold_frames"] = [first for first, _ in layout]
    try:
        resuming = work.claim(settings)
    except OSError as err:
        raise ImageError(_write_failed(err, work, 0)) from None
    try:
        _run(args, rest, info, size, work, output, kind, resuming, started, layout)
    except ConfigError as err:  # fit's checks name data.image_size, which is --size here
        if not _is_child():
            _drop_if_unused(work, resuming, info.frames)
        raise ConfigError(str(err).replace("data.image_size", "--size")) from None
    except NSTError:
        if not _is_child():
            _drop_if_unused(work, resuming, info.frames)
        raise
    except OSError as err:  # a full disk (ENOSPC), a file-size limit (EFBIG): every write is atomic, none is half done
        if not _is_child():
            _drop_if_unused(work, resuming, info.frames)
        raise ImageError(_write_failed(err, work, work.first_unfinished(info.frames))) from None


def _write_failed(err: OSError, work: WorkFolder, done: int) -> str:
    """The line for a write that failed: the file, why, what is kept and how to go on."""
    where = f" {err.filename}" if err.filename else ""
    if done == 0:
        kept = "no frame was finished"
    else:
        kept = f"frame 1 is kept in {work.root}" if done == 1 else f"frames 1-{done} are kept in {work.root}"
    return (
        f"cannot write{where}: {err.strerror or err} ({kept}): free some disk space, then run the same command "
        f"again to resume at frame {done + 1}"
    )


def _is_child() -> bool:
    """Whether this process is one the launcher of a ``--devices`` run started (it re-runs the command line)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 or int(os.environ.get("NODE_RANK", "0") or 0) > 0


def _drop_if_unused(work: WorkFolder, resuming: bool, frames: int) -> None:
    """A work folder this run made, that holds no stylised frame yet, goes with the run that failed (with
    ``--devices``, a later segment may have finished frames while the first has none)."""
    if not resuming and not any(file_kind(work.stylised(i)) == "file" for i in range(frames)):
        work.remove()


def _config_digests(rest: list[str]) -> list[str]:
    """A digest of each ``--config`` file named in ``rest`` (a changed config file is other settings)."""
    digests = []
    for position, arg in enumerate(rest):
        option, equals, value = arg.partition("=")
        if option == "--config":
            value = value if equals else (rest[position + 1] if position + 1 < len(rest) else "")
            path = Path(value)
            digests.append(hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else value)
    return digests


def _fingerprint(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def _build_module(args: argparse.Namespace, rest: list[str], work: Any, side: int) -> tuple[Any, dict, dict, Any]:
    """The module (built once, by LightningCLI, with every check of ``fit``), and the data and trainer settings."""
    one_shot = [
        str(work.input(0)),
        *args.styles,
        "-o",
        str(work.stylised(0)),
        "--size",
        str(side),
        "--steps",
        str(args.steps_first),
        "--overwrite",
        *rest,
    ]
    fit = oneshot.fit_arguments(one_shot)
    fit = configs.resolve_config_names(fit)
    early.check_config_files(fit)
    cli = StyleTransferCLI(args=fit[1:], run=False, trainer_overrides={"logger": False})
    config = cli.config
    data = checks.plain(config.data.as_dict())
    trainer = {"accelerator": config.trainer.accelerator, "precision": config.trainer.precision}
    root = Path(config.trainer.default_root_dir or os.getcwd())
    return cli.model, data, trainer, root


def _run(
    args: argparse.Namespace,
    rest: list[str],
    info: VideoInfo,
    size: tuple[int, int],
    work: WorkFolder,
    output: Path,
    kind: str,
    resuming: bool,
    started: float,
    layout: list[tuple[int, int]],
) -> None:
    """Decodes the frames, builds the module, then stylises the segments (``layout``: one per process) and,
    in the first process once every segment is done, writes OUT."""

    def keep(index: int, pixels) -> None:
        if not resuming or not work.input(index).is_file():
            save_pixels(pixels, work.input(index))

    decode_frames(info, size, keep)
    side = max(size)
    module, data, trainer, root = _build_module(args, rest, work, side)
    plan = VideoPlan(
        frames=info.frames,
        steps_first=args.steps_first,
        steps=args.steps,
        temporal_weight=args.temporal_weight,
        independent=args.independent,
        data=data,
        trainer=trainer,
        logs=work.logs(root / "lightning_logs" / "video" / output.name),
        cold=tuple(first for first, _ in layout),
    )
    first = StyleTransferDataModule(**{**data, "content": str(work.input(0))})
    precision = str(trainer["precision"] or "32-true")
    device = "cuda" if trainer["accelerator"] in ("gpu", "cuda") else "cpu"
    extractor, temporal = module.objective.extractor, not args.independent
    plan_run(first, [side], extractor, module.hparams, precision, device, temporal=temporal)  # or ConfigError
    if len(layout) == 1:
        results, resumed = _segment(module, plan, work, layout[0], 0, 1, resuming)
    else:
        if not isinstance(trainer["accelerator"], str):
            raise ConfigError("--devices above 1 needs trainer.accelerator as a name: auto, cpu or gpu")
        fabric = start_fabric(trainer["accelerator"], len(layout), 1, "--device")
        gathered = launch(fabric, lambda fabric: _shared(fabric, module, plan, work, layout, resuming))
        if gathered is None:  # a process other than the first: its segment is done, the first writes OUT
            return
        results, resumed = gathered
    frames = _display_frames(work, info)
    if kind == "video":
        encode_video(frames, info, output)
    else:
        write_png_sequence(frames, output, save_pixels)
    if not args.keep_frames:
        work.remove()
    line = summary(output, results, info.frames, resumed, time.perf_counter() - started, plan.logs, plan.cold)
    print(line, flush=True)


def _shared(
    fabric: Any, module: Any, plan: Any, work: Any, layout: list[tuple[int, int]], resuming: bool
) -> tuple[list[Any], int] | None:
    """The body of each process of a ``--devices`` run: its segment on its device; the first process waits for
    every segment and returns all results (and the frames done before), the others None. A process that fails
    hands its error to the first, which raises it (no process is left waiting)."""
    rank, world = fabric.global_rank, fabric.world_size
    plan.trainer.update(device_placement(fabric))
    outcome: tuple[Any, ...]
    try:
        with as_rank_zero():
            outcome = ("done", *_segment(module, plan, work, layout[rank], rank, world, resuming))
    except Stopped as err:
        outcome = ("stopped", str(err), err.code)
    except NSTError as err:
        outcome = ("error", f"segment {rank + 1} (frames {layout[rank][0] + 1}-{layout[rank][1]}): {err}")
    except Exception as err:  # a crash: the first process reports it
        outcome = ("error", f"segment {rank + 1}: {type(err).__name__}: {' '.join(str(err).split())}")
    gathered: list[Any] | None = [None] * world if rank == 0 else None
    dist.gather_object(outcome, gathered, dst=0)
    if rank != 0:
        return None
    for status, *rest in gathered:
        if status == "stopped":
            raise Stopped(rest[0], rest[1])
        if status == "error":
            raise ImageError(rest[0])
    return [r for _, results, _ in gathered for r in results], sum(done for _, _, done in gathered)


def _segment(
    module: Any, plan: Any, work: Any, segment: tuple[int, int], rank: int, world: int, resuming: bool
) -> tuple[list[Any], int]:
    """Stylises the frames of ``segment`` (first, end) from its first unfinished frame; returns the results
    and how many of its frames were done before. Ctrl-C and SIGTERM become :class:`Stopped`."""
    first, end = segment
    start = work.first_unfinished(end, first)
    work.drop_from(start, end)
    if resuming and start > first:
        where = f"of {plan.frames}" if world == 1 else f"(segment {first + 1}-{end} of {plan.frames})"
        done = f"frames 1-{start}" if world == 1 else f"frames {first + 1}-{start}"
        note(f"resuming at frame {start + 1} {where}: {done} are done in {work.root}")
    runner = FrameRunner(module, plan, work)

    def on_sigterm(signum: int, frame: object) -> None:
        # Also inside fit: Lightning calls the handler it finds beside its own (which would exit 0 at the next step).
        raise SIGTERMException

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        whole = world == 1
        results = run_frames(runner, start, segment=None if whole else segment, position=None if whole else rank)
    except (KeyboardInterrupt, SystemExit) as err:  # SIGTERMException is a SystemExit
        # Lightning answers a Ctrl-C inside fit with sys.exit(1), with the KeyboardInterrupt as its context.
        terminated = isinstance(err, SIGTERMException)
        if isinstance(err, SystemExit) and not terminated and not isinstance(err.__context__, KeyboardInterrupt):
            raise
        name, code = ("SIGTERM", 143) if terminated else ("Ctrl-C", 130)
        where = _stopped_at(work, plan, first, end, whole)
        raise Stopped(f"{name} at {where}: run the same command again to resume there", code) from None
    except Exception as err:  # out of memory: one line saying where, anything else is a bug
        if (shortage := out_of_memory(err)) is None:
            raise
        said = str(shortage).replace("data.image_size", "--size")  # as fit's checks are said here
        raise ImageError(f"{said}; stopped at {_stopped_at(work, plan, first, end, whole)}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return results, start - first


def _stopped_at(work: Any, plan: Any, first: int, end: int, whole: bool) -> str:
    """Where a segment stopped: ``frame 3 of 6 (frames 1-2 kept in FOLDER)``."""
    done = work.first_unfinished(end, first)
    if done == first:
        kept = "no frame was finished" if whole else "no frame of its segment was finished"
    elif done == first + 1:
        kept = f"frame {done} kept in {work.root}"
    else:
        kept = f"frames {first + 1}-{done} kept in {work.root}"
    return f"frame {done + 1} of {plan.frames} ({kept})"


def _display_frames(work: Any, info: Any) -> Iterator[np.ndarray]:
    """The stylised frames at the input's display size (Lanczos, as the frames were decoded)."""
    for index in range(info.frames):
        image = resized(open_rgb(work.stylised(index)), (info.width, info.height))[0]
        yield image.permute(1, 2, 0).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()
