"""``nst-lightning video IN STYLE [STYLE ...] -o OUT``: the flags, the checks on IN and OUT, and the run.

The flags of the one-shot form (``--style-weight``, ``--config``, ``--set``, ``fit``'s dotted keys...) pass
through :func:`nst_lightning.oneshot.fit_arguments` and LightningCLI, so a video frame is configured exactly
like an image; this module adds the video's own: the steps of the first and later frames, the temporal
weight, the output (H.264 video or a PNG folder).
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
from typing import TYPE_CHECKING, Any, NoReturn

from nst_lightning import __version__
from nst_lightning.errors import ConfigError, ImageError, NSTError

if TYPE_CHECKING:
    import numpy as np

DEFAULT_SIZE, DEFAULT_STEPS_FIRST, DEFAULT_STEPS = 512, 300, 100
DEFAULT_TEMPORAL_WEIGHT = 2e2
"""Weight of the temporal loss against content 1 and style 1e6 (see docs/video.md for how it was chosen)."""
USAGE = (
    "nst-lightning video IN STYLE [STYLE ...] -o OUT [--size PX] [--steps-first N] [--steps N] "
    "[--temporal-weight W] [--config FILE] [image options]"
)
EPILOG = """OUT ending in .mp4, .mov or .mkv is an H.264 video (the audio copied); OUT without an ending is a
folder of PNG frames. The work goes into OUT.parts/ as each frame finishes: run the same command again
after an interruption and it resumes at the first unfinished frame. Any option of the one-shot form
(nst-lightning --help: --style-weight, --weights, --backbone, --device, --set KEY=VALUE...) applies to every frame."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"nst-lightning: error: video: {message} (nst-lightning video --help lists the options)\n")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    """The video command's own flags (the one-shot form's pass through)."""
    def formatter(prog: str) -> argparse.HelpFormatter:
        return argparse.RawDescriptionHelpFormatter(prog, max_help_position=26, width=110)

    p = _Parser(prog="nst-lightning video", usage=USAGE, epilog=EPILOG, allow_abbrev=False, formatter_class=formatter,
                description="Stylise a video with temporal consistency (Ruder et al. 2016).")  # fmt: skip
    p.add_argument("input", metavar="IN", help="the video (any PyAV can read: MP4, MOV, MKV, WebM)")
    p.add_argument("styles", metavar="STYLE", nargs="+", help="the painting(s) whose style is taken")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="the video (.mp4/.mov/.mkv) or PNG folder")
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, metavar="PX",
                   help=f"longest side the frames are stylised at; the output keeps IN's size ({DEFAULT_SIZE})")
    p.add_argument("--steps-first", type=int, default=DEFAULT_STEPS_FIRST, metavar="N",
                   help=f"iterations of the first frame ({DEFAULT_STEPS_FIRST})")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, metavar="N",
                   help=f"iterations of each later frame, started from the one before ({DEFAULT_STEPS})")
    p.add_argument("--temporal-weight", type=float, default=DEFAULT_TEMPORAL_WEIGHT, metavar="W",
                   help=f"weight of the temporal loss; 0 keeps only the warm start ({DEFAULT_TEMPORAL_WEIGHT:g})")
    p.add_argument("--independent", action="store_true",
                   help="stylise every frame on its own, as the first (the flickering baseline)")
    p.add_argument("--keep-frames", action="store_true", help="keep OUT.parts/ (frames, flows, losses) after OUT")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (else it is refused)")
    p.add_argument("--version", action="version", version=f"nst-lightning {__version__}")
    return p  # fmt: skip


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value in (("--size", args.size), ("--steps-first", args.steps_first), ("--steps", args.steps)):
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if not (args.temporal_weight >= 0 and args.temporal_weight != float("inf")):
        raise ConfigError(f"--temporal-weight must be a finite number >= 0, got {args.temporal_weight}")


def check_output(output: Path, inputs: list[Path], overwrite: bool) -> str:
    """OUT's kind ("video" or "png"), once it is known to be writable and to replace nothing it must not:
    not an input, not an existing file or folder unless ``overwrite``."""
    from nst_lightning.files import check_writable_dir, file_kind, same_file
    from nst_lightning.video.media import VIDEO_SUFFIXES

    for path in inputs:
        if same_file(output, path):
            raise ImageError(f"OUT {output} is the input {path}: give another output path (nothing was written)")
    suffix = output.suffix.lower()
    kind = "video" if suffix in VIDEO_SUFFIXES else "png" if not suffix else None
    if kind is None:
        raise ImageError(
            f"OUT {output} ends in {suffix}: end it in .mp4, .mov or .mkv for a video, or give a folder name "
            "without an ending for PNG frames"
        )
    found = file_kind(output)
    wanted = "file" if kind == "video" else "folder"
    if found not in ("missing", wanted):
        what = f"a {found}" if found in ("file", "folder") else found
        fix = "give it an ending (.mp4) for a video" if kind == "png" else "choose another output path"
        raise ImageError(f"OUT {output} exists and is {what}, not a {wanted}: {fix}")
    if found != "missing" and not overwrite:
        raise ImageError(f"OUT {output} exists: pass --overwrite to replace it, or choose another output path")
    check_writable_dir(output.parent, "the output folder", "choose a writable output path")
    return kind


def _fingerprint(path: Path) -> list[Any]:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


def video_main(argv: list[str], verbose: bool = False) -> None:
    """Runs ``nst-lightning video`` with ``argv`` (the arguments after ``video``); errors are raised as
    :class:`~nst_lightning.errors.NSTError` for :func:`nst_lightning.main.cli_main` to report."""
    started = time.perf_counter()
    args, rest = parser().parse_known_args(argv)
    _check_numbers(args)
    source, output = Path(args.input), Path(args.output)
    styles = [Path(style) for style in args.styles]
    kind = check_output(output, [source, *styles], args.overwrite)
    from nst_lightning.video.media import probe

    info = probe(source)
    from nst_lightning.image_io import fit_size

    side = min(args.size, max(info.width, info.height))
    size = fit_size(info.width, info.height, side)
    from nst_lightning.video.frames import WorkFolder

    work = WorkFolder(output)
    video_flags = {k: v for k, v in vars(args).items() if k not in ("input", "styles", "output", "keep_frames",
                                                                    "overwrite")}  # fmt: skip
    settings = {
        "version": __version__, "input": _fingerprint(source), "styles": [_fingerprint(s) for s in styles],
        "flags": video_flags, "options": rest, "frames": info.frames, "size": list(size),
        "configs": _config_digests(rest),
    }  # fmt: skip
    resuming = work.claim(settings)
    try:
        _run(args, rest, info, size, work, output, kind, resuming, started, verbose)
    except ConfigError as err:  # fit's checks name data.image_size, which is --size here
        _drop_if_unused(work, resuming, info.frames)
        raise ConfigError(str(err).replace("data.image_size", "--size")) from None
    except NSTError:
        _drop_if_unused(work, resuming, info.frames)
        raise


def _drop_if_unused(work: Any, resuming: bool, frames: int) -> None:
    """A work folder this run made, that holds no stylised frame yet, goes with the run that failed."""
    if not resuming and work.first_unfinished(frames) == 0:
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


def _build_module(args: argparse.Namespace, rest: list[str], work: Any, side: int) -> tuple[Any, dict, dict, Any]:
    """The module (built once, by LightningCLI, with every check of ``fit``), and the data and trainer settings."""
    from nst_lightning import checks, configs, oneshot
    from nst_lightning.cli import StyleTransferCLI

    one_shot = [str(work.input(0)), *args.styles, "-o", str(work.stylised(0)), "--size", str(side),
                "--steps", str(args.steps_first), "--overwrite", *rest]  # fmt: skip
    fit = oneshot.fit_arguments(one_shot)
    fit = configs.resolve_config_names(fit)
    checks.check_config_files(fit)
    cli = StyleTransferCLI(args=fit[1:], run=False, trainer_overrides={"logger": False})
    config = cli.config
    data = checks.plain(config.data.as_dict())
    trainer = {"accelerator": config.trainer.accelerator, "precision": config.trainer.precision}
    root = Path(config.trainer.default_root_dir or os.getcwd())
    return cli.model, data, trainer, root


def _run(args, rest, info, size, work, output: Path, kind: str, resuming: bool, started: float, verbose: bool) -> None:
    from nst_lightning.console import note
    from nst_lightning.memory import check_run
    from nst_lightning.video.frames import FrameRunner, VideoPlan, run_frames, save_pixels, summary
    from nst_lightning.video.media import decode_frames

    def keep(index: int, pixels) -> None:
        if not resuming or not work.input(index).is_file():
            save_pixels(pixels, work.input(index))

    decode_frames(info, size, keep)
    side = max(size)
    module, data, trainer, root = _build_module(args, rest, work, side)
    plan = VideoPlan(
        frames=info.frames, steps_first=args.steps_first, steps=args.steps, temporal_weight=args.temporal_weight,
        independent=args.independent, init=str(module.hparams.init), data=data, trainer=trainer,
        logs=root / "lightning_logs" / "video" / output.name,
    )  # fmt: skip
    from nst_lightning.data import StyleTransferDataModule

    first = StyleTransferDataModule(**{**data, "content": str(work.input(0))})
    precision = str(trainer["precision"] or "32-true")
    device = "cuda" if trainer["accelerator"] in ("gpu", "cuda") else "cpu"
    check_run(first, [side], module.objective.extractor, module.hparams, precision, device)
    start = work.first_unfinished(info.frames)
    work.drop_from(start, info.frames)
    if resuming and start:
        note(f"resuming at frame {start + 1} of {info.frames}: frames 1-{start} are done in {work.root}")
    runner = FrameRunner(module, plan, work)
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    def on_sigterm(signum: int, frame: object) -> None:
        # Also inside fit: Lightning calls the handler it finds beside its own (which would exit 0 at the next step).
        raise SIGTERMException

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        results = run_frames(runner, start)
    except (KeyboardInterrupt, SystemExit) as err:  # SIGTERMException is a SystemExit
        # Lightning answers a Ctrl-C inside fit with sys.exit(1), with the KeyboardInterrupt as its context.
        terminated = isinstance(err, SIGTERMException)
        if isinstance(err, SystemExit) and not terminated and not isinstance(err.__context__, KeyboardInterrupt):
            raise
        name, code = ("SIGTERM", 143) if terminated else ("Ctrl-C", 130)
        done = work.first_unfinished(info.frames)
        kept = "no frame was finished" if done == 0 else f"frame{'s 1-' if done > 1 else ' '}{done} kept in {work.root}"
        raise Stopped(f"{name} at frame {done + 1} of {info.frames} ({kept}): run the same command again to resume "
                      "there", code) from None  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    frames = _display_frames(work, info)
    if kind == "video":
        from nst_lightning.video.media import encode_video

        encode_video(frames, info, output)
    else:
        from nst_lightning.video.media import write_png_sequence

        write_png_sequence(frames, output, save_pixels)
    if not args.keep_frames:
        work.remove()
    print(summary(output, results, info.frames, start, time.perf_counter() - started, plan.logs), flush=True)


def _display_frames(work: Any, info: Any) -> Iterator[np.ndarray]:
    """The stylised frames at the input's display size (Lanczos, as the frames were decoded)."""
    import torch

    from nst_lightning.image_io import open_rgb, resized

    for index in range(info.frames):
        image = resized(open_rgb(work.stylised(index)), (info.width, info.height))[0]
        yield image.permute(1, 2, 0).mul(255).round().clamp(0, 255).to(torch.uint8).numpy()


class Stopped(Exception):
    """An interruption between or inside frames, with its line and exit status (see
    :func:`nst_lightning.main.cli_main`); the finished frames are kept for the next run."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code
