"""Every configuration check, run before the weights load, and the names and defaults they check against.

The classes whose ``__init__`` arguments are the configuration (``StyleTransfer``,
``StyleTransferDataModule``, ``ImageWriter``, ``RunGuard``, ``BatchSettings``) call these on their
arguments; the command line calls them on the parsed configuration before it builds anything, so a
setting that cannot work is one line, however heavy the class it belongs to. Importing this module loads
neither torch nor Lightning (the checks that need them import them).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from jsonargparse.typing import path_type

from nst_lightning.errors import ConfigError, ImageError
from nst_lightning.io.files import file_kind
from nst_lightning.names import (
    HALF_PRECISIONS,
    INITS,
    NAME_FIELDS,
    LineSearch,
    Optimizer,
    PreserveColor,
    StyleLoss,
)
from nst_lightning.run.runtime import bf16_is_native_on_cpu, bf16_is_native_on_gpu, quiet_lightning

InputPath = path_type("", docstring="a file the run reads: in a config file, relative to that file")
"""A setting that names a file the run reads. In a config file a relative path is relative to that file
(jsonargparse's path types), on the command line to the working folder; nothing is checked at parsing (the
checks here say more). The command line hands the classes absolute path strings."""
_ACCELERATORS = ("gpu", "cuda", "mps", "tpu", "hpu", "xla")


def plain(value: Any) -> Any:
    """A path setting as plain text: a parsed :data:`InputPath` (or any path object) as its absolute path, a
    list item by item; anything else (a name such as ``imagenet``, None) as it is."""
    if isinstance(value, os.PathLike):
        return os.fspath(value) if str(value) else ""  # "": a batch's mark of an unset data.content
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def as_list(value: Any) -> list:
    """A setting that takes one item or a list (``trainer.callbacks``, ``trainer.plugins``) as a list."""
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _choose(key: str, value: Any, names: Sequence[str]) -> None:
    if value not in names:
        raise ConfigError(f"unknown {key} {value!r}: choose {', '.join(names[:-1])} or {names[-1]}")


# ---------------------------------------------------------------- model:


def check_model(
    *,
    content_layers: Sequence[str],
    style_layers: Sequence[str],
    style_layer_weights: Sequence[float] | None,
    content_weight: float,
    style_weight: float,
    tv_weight: float,
    style_loss: str,
    preserve_color: str,
    backbone: str,
    init: str,
    optimizer: str,
    lr: float | None,
    lbfgs_history_size: int,
    lbfgs_line_search: str | None,
    scales: Sequence[int] | None,
    scale_steps: Sequence[int] | None,
    float32_final_steps: int,
    tile_size: int | None = None,
    **_: Any,
) -> None:
    """Refuses ``model:`` settings that cannot work, with the fix, before anything heavy loads."""
    from nst_lightning.core.backbones import check_layers  # torch: only where a model is checked

    if not content_layers and not style_layers:
        raise ConfigError("no content_layers and no style_layers: give at least one layer")
    check_layers(backbone, [*content_layers, *style_layers])
    weights = [1.0] * len(style_layers) if style_layer_weights is None else list(style_layer_weights)
    if len(weights) != len(style_layers):
        raise ConfigError(
            f"model.style_layer_weights has {len(weights)} values but model.style_layers has "
            f"{len(style_layers)} layers: give one weight per style layer"
        )
    named = {"content_weight": content_weight, "style_weight": style_weight, "tv_weight": tv_weight}
    named.update({f"style_layer_weights[{i}]": w for i, w in enumerate(weights)})
    for name, value in named.items():
        if not math.isfinite(value) or value < 0:
            raise ConfigError(f"model.{name} must be a finite number >= 0, got {value}")
    if content_weight == 0 and style_weight == 0:
        raise ConfigError(
            "model.content_weight and model.style_weight are both 0, which leaves nothing to match: "
            "give at least one of them a positive value"
        )
    _choose("style_loss", style_loss, get_args(StyleLoss))
    _choose("preserve_color", preserve_color, get_args(PreserveColor))
    if init not in INITS and file_kind(init) != "file":
        raise ConfigError(
            f"model.init {init!r} is neither {', '.join(INITS)} nor an existing image file: "
            "choose one of those or give the path of an image"
        )
    _choose("optimizer", optimizer, get_args(Optimizer))
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"model.lr must be a positive number, got {lr}")
    if lbfgs_line_search is not None:
        _choose("lbfgs_line_search", lbfgs_line_search, get_args(LineSearch))
    if lbfgs_history_size < 1:
        raise ConfigError(f"model.lbfgs_history_size must be at least 1, got {lbfgs_history_size}")
    if float32_final_steps < 0:
        raise ConfigError(f"model.float32_final_steps must be 0 or more, got {float32_final_steps}")
    if tile_size and (tile_size < 64 or not backbone.startswith("vgg")):  # 0: never tiled; null: the memory decides
        raise ConfigError(f"model.tile_size {tile_size}: tiles need a VGG and 64 px or more (0: no tiles, null: auto)")
    check_scales(scales, scale_steps)


def check_scales(scales: Sequence[int] | None, scale_steps: Sequence[int] | None) -> None:
    """A coarse-to-fine schedule: sizes in ascending order, one positive number of iterations each."""
    if (scales is None) != (scale_steps is None):
        raise ConfigError("model.scales and model.scale_steps go together: give both or neither")
    if scales is None or scale_steps is None:
        return
    if not scales or len(scales) != len(scale_steps):
        raise ConfigError(
            f"model.scales has {len(scales)} sizes but model.scale_steps {len(scale_steps)} values: "
            "give one number of iterations per scale"
        )
    if any(s < 1 for s in scales) or any(b <= a for a, b in zip(scales, scales[1:], strict=False)):
        raise ConfigError(f"model.scales must be positive sizes in ascending order, got {list(scales)}")
    if any(n < 1 for n in scale_steps):
        raise ConfigError(f"model.scale_steps must be at least 1 each, got {list(scale_steps)}")


def check_schedule(scales: Sequence[int] | None, scale_steps: Sequence[int], image_size: int, max_steps: int) -> None:
    """A coarse-to-fine schedule against the run: it ends at ``data.image_size``, and ``trainer.max_steps``
    reaches its last scale."""
    if scales is None:
        return
    if scales[-1] != image_size:
        raise ConfigError(
            f"model.scales ends at {scales[-1]} but data.image_size is {image_size}: make the last scale {image_size}"
        )
    if sum(scale_steps) > max_steps:
        raise ConfigError(
            f"model.scale_steps add up to {sum(scale_steps)} but trainer.max_steps is {max_steps}, so the run would "
            f"end before the last scale: set --trainer.max_steps {sum(scale_steps)} (or more)"
        )


def check_precision(precision: str, device_type: str, compile: bool = False, warn: bool = True) -> None:
    """The image is optimised in float32: true half precision is refused, bfloat16 without native support warns
    (where ``warn``), ``compile`` with bf16-mixed on a GPU is refused (measured broken: docs/benchmarks.md, GPU)."""
    if compile and precision == "bf16-mixed" and device_type == "cuda":
        raise ConfigError(
            "model.compile true with trainer.precision bf16-mixed does not work on a GPU (the loss stays "
            "at its first value): drop --model.compile true, or use --trainer.precision 32-true with it"
        )
    if precision in HALF_PRECISIONS:
        raise ConfigError(
            f"trainer.precision {precision} would store the image itself in half precision; "
            "use 32-true, bf16-mixed or 16-mixed"
        )
    if warn and precision.startswith("bf16") and device_type == "cpu" and not bf16_is_native_on_cpu():
        warnings.warn(
            f"trainer.precision is {precision} but this CPU has no native bfloat16: it runs many "
            "times slower than 32-true; use --trainer.precision 32-true on this machine",
            stacklevel=3,
        )
    if warn and precision.startswith("bf16") and device_type == "cuda" and not bf16_is_native_on_gpu():
        warnings.warn(
            f"trainer.precision is {precision} but this GPU computes bfloat16 without native support (it has "
            "none before compute capability 8.0): slower than 16-mixed; use --trainer.precision 16-mixed",
            stacklevel=3,
        )


# ---------------------------------------------------------------- data:, output:, guard:, batch:


def check_data(
    *,
    style: str | Sequence[str],
    image_size: int,
    style_blend_weights: Sequence[float] | None,
    style_scale: float,
    style_masks: Sequence[str] | None,
    **_: Any,
) -> None:
    """Refuses ``data:`` settings that cannot work (nothing is read: the files are checked when read)."""
    styles = [style] if isinstance(style, str) else list(style)
    if not styles:
        raise ConfigError("data.style is empty: give at least one style image")
    if image_size < 1:
        raise ConfigError(f"data.image_size must be a positive number of pixels, got {image_size}")
    if not (math.isfinite(style_scale) and style_scale > 0):
        raise ConfigError(f"data.style_scale must be a positive number, got {style_scale}")
    blend = [1.0] * len(styles) if style_blend_weights is None else [float(w) for w in style_blend_weights]
    if len(blend) != len(styles):
        raise ConfigError(
            f"data.style_blend_weights has {len(blend)} values for {len(styles)} style images: "
            "give one weight per style"
        )
    if any(not math.isfinite(w) or w < 0 for w in blend) or sum(blend) <= 0:
        raise ConfigError(
            f"data.style_blend_weights must be numbers >= 0 with a positive sum, got {style_blend_weights}"
        )
    if style_masks is not None and len(style_masks) != len(styles):
        raise ConfigError(
            f"data.style_masks has {len(style_masks)} masks for {len(styles)} style images: give one mask per style"
        )


SIXTEEN_BIT_SUFFIXES = (".png", ".tif", ".tiff")
"""The outputs ``output.bit_depth: 16`` can write (:mod:`nst_lightning.io.image16`)."""


def check_output(
    *,
    path: str,
    snapshot_every_n_steps: int,
    log_image_every_n_steps: int,
    save_every_n_steps: int = 0,
    bit_depth: int = 8,
    **_: Any,
) -> None:
    """Refuses ``output:`` settings that cannot work: a negative interval, or 16 bits in a format without them.
    The rest of the file's name is checked where Pillow is at hand (:func:`~nst_lightning.io.image_io.check_writable`:
    a format it writes, a folder that takes it)."""
    for name, value in (
        ("snapshot_every_n_steps", snapshot_every_n_steps),
        ("log_image_every_n_steps", log_image_every_n_steps),
        ("save_every_n_steps", save_every_n_steps),
    ):
        if value < 0:
            raise ConfigError(f"output.{name} must be 0 (off) or a number of steps, got {value}")
    if bit_depth not in (8, 16):
        raise ConfigError(f"output.bit_depth must be 8 or 16, got {bit_depth}")
    if bit_depth == 16 and Path(path).suffix.lower() not in SIXTEEN_BIT_SUFFIXES:
        raise ConfigError(
            f"output.bit_depth 16 needs a PNG or TIFF output, not {Path(path).name}: end the output's name in "
            ".png, .tif or .tiff, or leave the bit depth at 8"
        )


def check_guard(*, stall_steps: int, **_: Any) -> None:
    if stall_steps < 0:
        raise ConfigError(f"guard.stall_steps must be 0 (off) or a number of steps, got {stall_steps}")


def check_batch(
    *, contents: list[str] | None, styles: list[str] | None, name: str, devices: int, num_nodes: int, **_: Any
) -> None:
    """Refuses ``batch:`` settings that cannot work: no processes, an empty list, a file name pattern
    that is not one."""
    for key, value in (("devices", devices), ("num_nodes", num_nodes)):
        if value < 1:
            raise ConfigError(f"batch.{key} must be at least 1, got {value}")
    for key, value in (("contents", contents), ("styles", styles)):
        if value is not None and not value:
            raise ConfigError(f"batch.{key} is an empty list: give files, folders or glob patterns (or null)")
    try:
        example = name.format(content="c", style="s", n=1)
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"batch.name {name!r} is not a valid pattern ({type(err).__name__}: {err}): use the fields "
            + ", ".join("{" + field + "}" for field in NAME_FIELDS)
        ) from None
    if Path(example).is_absolute() or not Path(example).name:
        raise ConfigError(f"batch.name {name!r} must be a file name inside batch.output_dir, such as {{content}}.png")
    from nst_lightning.io.image_io import image_format  # torch and Pillow: only where a batch is checked

    try:
        image_format(example)
    except ImageError:
        raise ConfigError(f"batch.name {name!r} must end in an image extension such as .png or .jpg") from None


# ---------------------------------------------------------------- trainer: and the command line


def check_max_steps(max_steps: int | None) -> None:
    if max_steps is None or max_steps < 1:
        raise ConfigError(f"trainer.max_steps must be at least 1 (one step is one L-BFGS iteration), got {max_steps}")


def trainer_errors() -> tuple[type[BaseException], ...]:
    """What a Trainer raises for settings that cannot work on this machine (no GPU, devices 0, no torch_xla)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError)


def trainer_error(trainer: Any, err: BaseException) -> ConfigError:
    """The one line for trainer settings that Lightning refuses on this machine."""
    detail = " ".join(str(err).split()) or type(err).__name__
    accelerator = trainer.accelerator
    if isinstance(accelerator, str) and accelerator.lower() in _ACCELERATORS:
        return ConfigError(
            f"trainer.accelerator {accelerator} cannot be used on this machine ({detail}): use --trainer.accelerator "
            "cpu, or auto (a GPU where there is one)"
        )
    return ConfigError(
        f"the trainer settings cannot work here (trainer.accelerator {accelerator}, trainer.devices "
        f"{trainer.devices}): {detail}"
    )


def check_trainer_settings(trainer: Any, compile: bool = False) -> None:
    """Refuses, before anything loads, trainer settings that cannot work: an accelerator this machine
    does not have, no device, and more than one process for one image (``devices 2`` or
    ``num_nodes 2`` would run the same optimisation several times over, or wait for good for
    nodes that never come), a precision check_precision refuses (``compile``: model.compile). A throw-away
    Trainer (nothing is run or written) resolves the settings as the real one will."""
    devices = trainer.devices
    if devices in (0, "0") or (isinstance(devices, (list, tuple)) and not devices):
        raise ConfigError(f"trainer.devices {devices} selects no device: set trainer.devices 1")
    plain = {
        key: trainer[key]
        for key in ("accelerator", "devices", "num_nodes", "strategy")
        if isinstance(trainer[key], (str, int, list))
    }
    from lightning.pytorch import Trainer

    try:
        with quiet_lightning(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = Trainer(
                **plain, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
            )
    except trainer_errors() as err:
        raise trainer_error(trainer, err) from None
    if trial.world_size > 1:
        raise ConfigError(
            f"trainer.devices {trainer.devices} and trainer.num_nodes {trainer.num_nodes} would start "
            f"{trial.world_size} processes, each doing the same image (and a second node on this machine would be "
            "waited for forever): one image is one optimisation on one device, so set trainer.devices 1 and "
            "trainer.num_nodes 1; to share many images among devices, use batch.devices / batch.num_nodes "
            "with python cli.py batch"
        )
    check_precision(str(trainer.precision or "32-true"), trial.strategy.root_device.type, compile, warn=False)
