"""The one-shot form, ``nst-lightning CONTENT STYLE -o OUT``: plain flags turned into the ``fit`` command's arguments.

It builds arguments and nothing else: the run is ``fit``'s, with the same checks, logs and checkpoints. The
common settings have flags of their own; any other key goes through ``--config``, ``--set key=value`` or
``fit``'s own dotted flags (``--model.tv_weight 1``), which pass through unchanged.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from nst_lightning import __version__
from nst_lightning.errors import ConfigError
from nst_lightning.names import AUTO, BACKBONE_NAMES, POOLINGS, PRESERVE_COLORS

OUTPUT_FOLDER = "outputs"
"""Where the image goes when ``-o`` is not given, as ``<content>__<style>.png`` (the batch's naming)."""
# Options of fit that are not dotted keys but pass through all the same.
FIT_OPTIONS = ("--ckpt_path", "--seed_everything")
FIT_FLAGS = ("--print_config",)  # no value of their own
USAGE = """nst-lightning CONTENT STYLE [STYLE ...] [-o OUT] [--size PX] [--steps N] [--watch [PORT]] [options]
       nst-lightning {fit,batch} [--config FILE|NAME ...] [--KEY VALUE ...]
       nst-lightning serve [--host H] [--port P] [--data DIR] [--token T]
       nst-lightning video IN STYLE [STYLE ...] -o OUT [--steps-first N] [--steps N] [options]
       nst-lightning configs | --version | --help"""
COMMANDS = """commands:
  CONTENT STYLE ...  stylise CONTENT with the STYLE images, with the flags above (this form)
  fit                the same run from config files and every key as a flag (nst-lightning fit --help)
  batch              stylise every content image with every style image (nst-lightning batch --help)
  video              stylise a video without flicker (nst-lightning video --help; pip install '.[video]')
  configs            list the shipped configs, which --config takes by name from any folder
  serve              a web page and JSON API for jobs (nst-lightning serve --help; pip install '.[web]')

Any other key of fit: --set KEY=VALUE, or fit's own flag (--model.tv_weight 1). Later flags win over
earlier ones and over --config files. Each run logs to lightning_logs/version_N (TensorBoard, checkpoints)."""


# The plain flags with a value: (flag, type, metavar, help with the default).
FLAGS = (
    ("--size", int, "PX", "pixels on the longest side of the output (512)"),
    ("--steps", int, "N", "L-BFGS iterations (300)"),
    ("--style-weight", float, "W", "style against content: 1e5 keeps more of the photo, 1e7 less (1e6)"),
    ("--content-weight", float, "W", "weight of the content loss (1)"),
    ("--seed", int, "N", "seed of the run, and of a noise start (0)"),
    ("--weights", str, "FILE", "the network's weights: imagenet, random (tests) or a file (its backbone is read)"),
    ("--tv-weight", float, "W", "total-variation weight: smooths the image (0)"),
    ("--init", str, "HOW", "the starting image: content, style, noise or an image file (content)"),
    ("--style-blend-weights", str, "W,W", "one weight per STYLE image, comma-separated (equal)"),
    ("--style-scale", float, "F", "style image size against --size: below 1 larger strokes, above 1 finer (1)"),
    ("--save-every", int, "N", "write the image so far every N steps to OUT's .partial file (off)"),
    ("--print-every", int, "N", "print the loss every N steps on stderr (off; the bar shows it)"),
)
LOSS_PRINTER = "nst_lightning.io.console.LossPrinter"
WATCH_PORT = 8765
"""``--watch``'s port when it is given without one."""
CONFIG_HELP = "a config file, or a shipped config by name (nst-lightning configs); several overlay"


class OneLineParser(argparse.ArgumentParser):
    """argparse, reporting a bad command line as one line that points to the same command's ``--help``
    (the parser of every plain-flag command: the one-shot form, ``serve``, ``video``)."""

    label = ""
    """Put before the message (``video: ``)."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"nst-lightning: error: {self.label}{message} ({self.prog} --help lists the options)\n")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    """The one-shot form's parser, whose help is the tool's top-level help."""
    p = OneLineParser(
        prog="nst-lightning",
        usage=USAGE,
        description="Neural style transfer (Gatys et al.) as a PyTorch Lightning training loop.",
        epilog=COMMANDS,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=26, width=110),
        allow_abbrev=False,
    )
    p.add_argument("content", metavar="CONTENT", help="the photo whose layout is kept")
    p.add_argument("styles", metavar="STYLE", nargs="+", help="the painting(s) whose style is taken; several blend")
    p.add_argument("-o", "--output", metavar="OUT", help=f"the image ({OUTPUT_FOLDER}/<content>__<style>.png)")
    for flag, kind, metavar, text in FLAGS:
        p.add_argument(flag, type=kind, metavar=metavar, help=text)
    p.add_argument("--preserve-color", choices=PRESERVE_COLORS, help="keep the photo's colours (none)")
    p.add_argument("--pooling", choices=POOLINGS, help="the network's pooling: avg as Gatys et al. (max)")
    p.add_argument("--bit-depth", type=int, choices=(8, 16), help="bits per channel: 16 for print (PNG/TIFF OUT; 8)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), help="where to run (auto: a GPU where there is one)")
    p.add_argument("--backbone", choices=(AUTO, *BACKBONE_NAMES), help="the network (auto: the file's, or vgg19)")
    p.add_argument("--config", action="append", default=[], metavar="FILE|NAME", help=CONFIG_HELP)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any other key: model.tv_weight=1")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (else it is refused)")
    p.add_argument("--verbose", action="store_true", help="also what Lightning says, and where warnings come from")
    p.add_argument(
        "--watch",
        type=_port,
        nargs="?",
        const=WATCH_PORT,
        metavar="PORT",
        help=f"show the run live in a browser at http://127.0.0.1:PORT/ ({WATCH_PORT}; 0: a free port; needs '.[web]')",
    )
    p.add_argument("--version", action="version", version=f"nst-lightning {__version__}")
    return p


def _port(text: str) -> int:
    """``--watch PORT``: a whole number from 0 to 65535."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port: give a number from 0 to 65535 (0: a free one)")
    return value


def watch_request(argv: Sequence[str]) -> tuple[int, dict[str, object]] | None:
    """``--watch``'s port and the names the page shows (``content``, ``styles``), or None without ``--watch``."""
    args = parser().parse_args(split_fit_options(argv)[0])
    if args.watch is None:
        return None
    return args.watch, {"content": Path(args.content).name, "styles": [Path(style).name for style in args.styles]}


def split_fit_options(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the one-shot's own arguments, ``fit``'s dotted flags such as ``--model.tv_weight 1`` to pass through)."""
    own: list[str] = []
    passed: list[str] = []
    args = list(argv)
    position = 0
    while position < len(args):
        arg = args[position]
        option, equals, _ = arg.partition("=")
        if arg.startswith("--") and ("." in option or option in FIT_OPTIONS or option in FIT_FLAGS):
            passed.append(arg)
            takes_value = not equals and option not in FIT_FLAGS
            if takes_value and position + 1 < len(args) and not args[position + 1].startswith("--"):
                passed.append(args[position + 1])
                position += 1
        else:
            own.append(arg)
        position += 1
    return own, passed


def default_output(content: str, styles: Sequence[str]) -> str:
    """``outputs/<content>__<style>.png``; several styles joined with ``+``."""
    return str(Path(OUTPUT_FOLDER) / f"{Path(content).stem}__{'+'.join(Path(s).stem for s in styles)}.png")


def _check_numbers(args: argparse.Namespace) -> None:
    for flag, value, least in (("--size", args.size, 1), ("--steps", args.steps, 1)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be at least {least}, got {value}")
    from nst_lightning.names import SEED_MAX

    if args.seed is not None and not 0 <= args.seed <= SEED_MAX:
        raise ConfigError(f"--seed must be a whole number from 0 to {SEED_MAX}, got {args.seed}")
    weights = {"--style-weight": args.style_weight, "--content-weight": args.content_weight}
    for flag, value in {**weights, "--tv-weight": args.tv_weight}.items():
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{flag} must be a finite number >= 0, got {value}")
    if args.style_scale is not None and not (math.isfinite(args.style_scale) and args.style_scale > 0):
        raise ConfigError(f"--style-scale must be a positive number, got {args.style_scale}")
    for flag, value in (("--save-every", args.save_every), ("--print-every", args.print_every)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1 (a number of steps), got {value}")
    output = args.output or ".png"
    if args.bit_depth == 16 and Path(output).suffix.lower() not in (".png", ".tif", ".tiff"):
        raise ConfigError(f"--bit-depth 16 needs a PNG or TIFF output, not {output}: end -o's name in .png or .tif")


def blend_weights(text: str | None, styles: int) -> list[float] | None:
    """``--style-blend-weights 0.7,0.3``: one number >= 0 per STYLE image, not all 0."""
    if text is None:
        return None
    try:
        weights = [float(item) for item in text.replace(" ", ",").split(",") if item]
    except ValueError:
        message = f"--style-blend-weights takes numbers separated by commas, such as 0.7,0.3; got {text!r}"
        raise ConfigError(message) from None
    if len(weights) != styles:
        raise ConfigError(
            f"--style-blend-weights has {len(weights)} value(s) for {styles} STYLE image(s): give one weight per style"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"--style-blend-weights must be numbers >= 0, not all 0; got {text!r}")
    return weights


def _check_device(device: str | None) -> None:
    """``--device gpu`` where torch sees no GPU: one line now, rather than Lightning's message later."""
    if device != "gpu":
        return
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    if not (CUDAAccelerator.is_available() or MPSAccelerator.is_available()):
        raise ConfigError("--device gpu: torch finds no GPU on this machine: use --device cpu, or auto")


def fit_arguments(argv: Sequence[str]) -> list[str]:
    """The arguments of the ``fit`` command (from ``fit`` on) that run what ``argv`` (the one-shot form) asks."""
    own, passed = split_fit_options(argv)
    one_shot = parser()
    args = one_shot.parse_args(own)
    _check_numbers(args)
    _check_device(args.device)
    styles = list(args.styles)
    blend = blend_weights(args.style_blend_weights, len(styles))
    fit = ["fit"]
    for config in args.config:
        fit.append(f"--config={config}")
    fit.append(f"--data.content={args.content}")
    # One style as it is; several as a JSON list, whatever characters their names hold.
    fit.append(f"--data.style={styles[0] if len(styles) == 1 else json.dumps(styles)}")
    fit.append(f"--output.path={args.output or default_output(args.content, styles)}")
    plain = {
        "data.image_size": args.size,
        "trainer.max_steps": args.steps,
        "model.style_weight": args.style_weight,
        "model.content_weight": args.content_weight,
        "model.preserve_color": args.preserve_color,
        "trainer.accelerator": args.device,
        "model.weights": args.weights,
        "model.backbone": args.backbone,
        "seed_everything": args.seed,
        "model.seed": args.seed,
        "model.tv_weight": args.tv_weight,
        "model.init": args.init,
        "data.style_blend_weights": json.dumps(blend) if blend else None,
        "data.style_scale": args.style_scale,
        "model.pooling": args.pooling,
        "output.save_every_n_steps": args.save_every,
        "output.bit_depth": args.bit_depth,
    }
    fit += [f"--{key}={value}" for key, value in plain.items() if value is not None]
    if args.print_every is not None:
        printer = f"{{class_path: {LOSS_PRINTER}, init_args: {{every_n_steps: {args.print_every}}}}}"
        fit.append(f"--trainer.callbacks+={printer}")
    if args.overwrite:
        fit.append("--output.overwrite=true")
    for item in args.set:
        key, equals, value = item.partition("=")
        if not equals or not key.strip() or key.startswith("-"):
            one_shot.error(f"--set takes KEY=VALUE, such as --set model.tv_weight=1; got {item!r}")
        fit.append(f"--{key.strip()}={value}")
    return fit + passed
