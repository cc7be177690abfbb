"""The plan of a run, decided from the memory estimate (:mod:`nst_lightning.run.memory`) before anything is
resized or allocated: whether it fits, over which tiles each scale runs (tiling.py), how many L-BFGS steps it
keeps; or one line naming the largest size that fits."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from nst_lightning.core.features import FeatureExtractor
from nst_lightning.core.inputs import ImageSource
from nst_lightning.core.tiling import TILE_SIDES, can_tile
from nst_lightning.run import runtime
from nst_lightning.run.memory import MemoryEstimate, estimate_peak, fits_in, refuse_unless_fits, times16

MIN_HISTORY = 5
"""The fewest L-BFGS steps a run that does not fit with its ``lbfgs_history_size`` keeps (torch's minimum is 1)."""
GOOD_HISTORY = 12
"""The fewest L-BFGS steps kept before tiles smaller than :data:`GOOD_TILE` are tried."""
GOOD_TILE = 512
"""The smallest tile (px) tried before the history goes below :data:`GOOD_HISTORY`: a 64 px halo makes a 512 px
tile's pass 1.56 times its core's, a 256 px tile's 2.25 times."""


def plan_run(
    images: ImageSource,
    sizes: Sequence[int],
    extractor: FeatureExtractor,
    settings: Mapping[str, Any],
    precision: str,
    device: str,
    *,
    temporal: bool = False,
    available: int | None = None,
) -> tuple[MemoryEstimate, list[int | None], int]:
    """Before any image is resized (a resize to an absurd size would itself be what runs out of memory):
    each image at the first of ``sizes`` gives the deepest layer a pixel, and a run with ``settings`` (a
    ``StyleTransfer``'s hyper-parameters) at the last size fits in the memory free on ``device``: the
    content, every style at its own size, the masks, the previous scale of a coarse-to-fine run, and for a
    video frame (``temporal``) its flows and temporal term. Returns the estimate and, for each of ``sizes``,
    the tile size the network runs over (None: the whole image): ``settings["tile_size"]`` where given (0: none), else
    tiles only where the whole image does not fit, as large as fit (:data:`TILE_SIDES`); and the L-BFGS history
    that fits (``lbfgs_history_size``, halved where needed: see :func:`_choose`). A refusal names
    the largest ``data.image_size`` that fits, and where a style image is larger than the content, the
    largest ``data.style_scale``."""
    extractor.check_image_size(images.content_size(sizes[0]))
    for style in images.style_sizes(sizes[0]):
        extractor.check_image_size(style, "style")
    names = ("content_layers", "style_layers", "backbone", "pooling", "optimizer", "weights", "style_loss")
    options = {name: settings[name] for name in names}
    options |= {"history_size": settings["lbfgs_history_size"], "preserve_color": settings["preserve_color"]}
    options |= {"precision": precision, "device": device, "masks": images.mask_count, "temporal": temporal}
    size = sizes[-1]

    def run_at(side: int, style_scale: float | None = None, tile: int | None = None, history: int | None = None):
        """The run at longest side ``side`` (the coarse-to-fine scales shrunk with it)."""
        width, height = images.content_size(side)
        previous = images.content_size(max(1, round(sizes[-2] * side / size))) if len(sizes) > 1 else None
        styles = images.style_sizes(side, style_scale)
        kept = options | ({} if history is None else {"history_size": history})
        return estimate_peak(height, width, styles=styles, previous=previous, tile=tile, **kept)

    free = available if available is not None else runtime.available_bytes(device)
    forced = settings.get("tile_size")  # 0: the whole image, whatever the memory; >= 64: those tiles
    tile, options["history_size"] = _choose(
        lambda tile, history: fits_in(run_at(size, tile=tile, history=history), free),
        [forced or None]
        if forced is not None or not can_tile(extractor.body)
        else [None, *(side for side in TILE_SIDES if side < max(images.content_size(size)))],
        options["history_size"],
        shrink=options["optimizer"] == "lbfgs",
    )
    # Each scale tiled only where its image is larger than a tile and, unless tiles were asked for, cannot fit whole.
    tiles = [
        tile
        if tile is not None and tile < max(images.content_size(side)) and (forced or not fits_in(run_at(side), free))
        else None
        for side in sizes
    ]
    width, height = images.content_size(size)
    styles = images.style_sizes(size)
    biggest = max(styles, key=lambda wh: wh[0] * wh[1]) if styles else (0, 0)
    what = f"a {width}x{height} px run" + (f" over {tiles[-1]} px tiles" if tiles[-1] else "")
    fixes = [("data.image_size", lambda k: run_at(16 * k, tile=tiles[-1]), -(-size // 16), times16)]
    if biggest[0] * biggest[1] > width * height:
        what += f" with a {biggest[0]}x{biggest[1]} px style image"
        # style_scale in hundredths, below the one set
        hundredths = math.ceil(images.style_scale * 100)
        fixes.append(("data.style_scale", lambda k: run_at(size, k / 100, tiles[-1]), hundredths, lambda k: k / 100))
    history = options["history_size"]
    return refuse_unless_fits(run_at(size, tile=tiles[-1]), what, available, device, history, fixes), tiles, history


def _choose(fits, tiles: list[int | None], history: int, shrink: bool) -> tuple[int | None, int]:
    """The tile size (None: the whole image) and L-BFGS history of a run: the first of ``tiles`` (largest first)
    with which ``fits(tile, history)``, the history halved where ``shrink``. Tiles of at least :data:`GOOD_TILE` px
    with the history down to :data:`GOOD_HISTORY` first (a tile's halo costs more than the steps left out), then
    any tile with the history down to :data:`MIN_HISTORY`; where nothing fits, the smallest of both (and the
    plan's refusal)."""

    def halved(floor: int):
        kept = history
        yield kept
        while shrink and kept > floor:
            kept = max(floor, kept // 2)
            yield kept

    good = [tile for tile in tiles if tile is None or tile >= GOOD_TILE] or tiles[:1]
    for candidates, floor in ((good, GOOD_HISTORY), (tiles, MIN_HISTORY)):
        for tile in candidates:
            for kept in halved(floor):
                if fits(tile, kept):
                    return tile, kept
    return tiles[-1], min(history, MIN_HISTORY) if shrink else history
