"""``nst-lightning video IN STYLE [STYLE ...] -o OUT``: the flags and the checks on OUT, then the run (:mod:`.run`).

The flags of the one-shot form (``--style-weight``, ``--config``, ``--set``, ``fit``'s dotted keys...) pass
through :func:`nst_lightning.cli.oneshot.fit_arguments` and LightningCLI, so a video frame is configured exactly
like an image; this module adds the video's own: the steps of the first and later frames, the temporal
weight, the output (H.264 video or a PNG folder). Light: ``video --help`` and a mistaken flag answer at once,
with or without the ``video`` extra installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

from nst_lightning import __version__
from nst_lightning.cli.oneshot import OneLineParser
from nst_lightning.errors import ConfigError, ImageError
from nst_lightning.io.files import check_writable_dir, file_kind, same_file
from nst_lightning.video import EXTRAS, VIDEO_SUFFIXES

DEFAULT_SIZE, DEFAULT_STEPS_FIRST, DEFAULT_STEPS = 512, 300, 100
DEFAULT_TEMPORAL_WEIGHT = 2e2
EXTRAS_MISSING = "video needs PyAV and OpenCV ({} missing): pip install 'nst-lightning[video]'"
"""What to install, where the ``video`` extra is missing (the help says it; a run stops with it)."""
"""Weight of the temporal loss against content 1 and style 1e6 (see docs/video.md for how it was chosen)."""
USAGE = (
    "nst-lightning video IN STYLE [STYLE ...] -o OUT [--size PX] [--steps-first N] [--steps N] "
    "[--temporal-weight W] [--devices N] [--config FILE] [image options]"
)
EPILOG = """OUT ending in .mp4, .mov or .mkv is an H.264 video (the audio copied); OUT without an ending is a
folder of PNG frames. The work goes into OUT.parts/ as each frame finishes: run the same command again
after an interruption and it resumes at the first unfinished frame. Any option of the one-shot form
(nst-lightning --help: --style-weight, --weights, --backbone, --device, --set KEY=VALUE...) applies to every frame."""


def missing_extras() -> list[str]:
    """The modules of the ``video`` extra that are not installed (looked for, not imported)."""
    missing = []
    for name in EXTRAS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or half-imported module
            found = False
        if not found:
            missing.append(name)
    return missing


def parser() -> argparse.ArgumentParser:
    """The video command's own flags (the one-shot form's pass through)."""

    def formatter(prog: str) -> argparse.HelpFormatter:
        return argparse.RawDescriptionHelpFormatter(prog, max_help_position=26, width=110)

    description = "Stylise a video with temporal consistency (Ruder et al. 2016)."
    if missing_extras():
        description += f"\n\n{EXTRAS_MISSING.format(', '.join(missing_extras()))}"
    p = OneLineParser(
        prog="nst-lightning video",
        usage=USAGE,
        epilog=EPILOG,
        allow_abbrev=False,
        formatter_class=formatter,
        description=description,
    )
    p.label = "video: "
    p.add_argument("input", metavar="IN", help="the video (any PyAV can read: MP4, MOV, MKV, WebM)")
    p.add_argument("styles", metavar="STYLE", nargs="+", help="the painting(s) whose style is taken")
    p.add_argument("-o", "--output", metavar="OUT", required=True, help="the video (.mp4/.mov/.mkv) or PNG folder")
    p.add_argument(
        "--size",
        type=int,
        default=DEFAULT_SIZE,
        metavar="PX",
        help=f"longest side the frames are stylised at; the output keeps IN's size ({DEFAULT_SIZE})",
    )
    p.add_argument(
        "--steps-first",
        type=int,
        default=DEFAULT_STEPS_FIRST,
        metavar="N",
        help=f"iterations of the first frame ({DEFAULT_STEPS_FIRST})",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=DEFAULT_STEPS,
        metavar="N",
        help=f"iterations of each later frame, started from the one before ({DEFAULT_STEPS})",
    )
    p.add_argument(
        "--temporal-weight",
        type=float,
        default=DEFAULT_TEMPORAL_WEIGHT,
        metavar="W",
        help=f"weight of the temporal loss; 0 keeps only the warm start ({DEFAULT_TEMPORAL_WEIGHT:g})",
    )
    p.add_argument(
        "--devices",
        type=int,
        default=1,
        metavar="N",
        help="processes, one per device (a GPU, or a share of the CPU), each stylising a contiguous "
        "segment of the frames; each segment's first frame starts cold, as the first (1)",
    )
    p.add_argument(
        "--independent",
        action="store_true",
        help="stylise every frame on its own, as the first (the flickering baseline)",
    )
    p.add_argument("--keep-frames", action="store_true", help="keep OUT.parts/ (frames, flows, losses) after OUT")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (else it is refused)")
    p.add_argument("--version", action="version", version=f"nst-lightning {__version__}")
    return p


def _check_numbers(args: argparse.Namespace) -> None:
    numbers = (
        ("--size", args.size),
        ("--steps-first", args.steps_first),
        ("--steps", args.steps),
        ("--devices", args.devices),
    )
    for flag, value in numbers:
        if value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    if not (args.temporal_weight >= 0 and args.temporal_weight != float("inf")):
        raise ConfigError(f"--temporal-weight must be a finite number >= 0, got {args.temporal_weight}")


def check_output(output: Path, inputs: list[Path], overwrite: bool) -> str:
    """OUT's kind ("video" or "png"), once it is known to be writable and to replace nothing it must not:
    not an input, not an existing file or folder unless ``overwrite``."""
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


def video_main(argv: list[str]) -> None:
    """Runs ``nst-lightning video`` with ``argv`` (the arguments after ``video``); errors are raised as
    :class:`~nst_lightning.errors.NSTError` for :func:`nst_lightning.main.cli_main` to report."""
    started = time.perf_counter()
    args, rest = parser().parse_known_args(argv)
    _check_numbers(args)
    source, output = Path(args.input), Path(args.output)
    kind = check_output(output, [source, *map(Path, args.styles)], args.overwrite)
    # PyAV, OpenCV, torch and Lightning load here, once the command line is known to be right (seconds).
    from nst_lightning.video.run import run_video

    run_video(args, rest, argv, kind, started)
