"""The plan of a run, decided from the memory estimate (:mod:`nst_lightning.run.memory`) before anything is
resized or allocated: whether it fits, over which tiles each scale runs (tiling.py), how many L-BFGS steps it
keeps; or one line naming the largest size that fits."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from nst_lightning.core.features import FeatureExtractor
from nst_lightning.core.inputs import ImageSource
from nst_lightning.core.tiles import TILE_SIDES, Tiling, can_tile, relative_cost, split_points
from nst_lightning.run import runtime
from nst_lightning.run.memory import MemoryEstimate, estimate_peak, fits_in, refuse_unless_fits, times16

MIN_HISTORY = 5
"""The fewest L-BFGS steps a run that does not fit with its ``lbfgs_history_size`` keeps (torch's minimum is 1)."""
GOOD_HISTORY = 12
"""The fewest L-BFGS steps kept before tilings that cost more than :data:`GOOD_COST` are tried."""
GOOD_COST = 1.5
"""The most a tiled evaluation may cost (relative to a whole one: :func:`~nst_lightning.core.tiling.relative_cost`)
before the history goes below :data:`GOOD_HISTORY`."""


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
) -> tuple[MemoryEstimate, list[Tiling | None], int]:
    """Before any image is resized (a resize to an absurd size would itself be what runs out of memory):
    each image at the first of ``sizes`` gives the deepest layer a pixel, and a run with ``settings`` (a
    ``StyleTransfer``'s hyper-parameters) at the last size fits in the memory free on ``device``: the
    content, every style at its own size, the masks, the previous scale of a coarse-to-fine run, and for a
    video frame (``temporal``) its flows and temporal term. Returns the estimate and, for each of ``sizes``,
    the network's :class:`~nst_lightning.core.tiling.Tiling` (None: the whole image): tiles of
    ``settings["tile_size"]`` where given (0: none), else tiles only where the whole image does not fit; of the
    tilings that fit (:data:`TILE_SIDES`, split after each pooling or not at all), the cheapest; and the L-BFGS
    history that fits (``lbfgs_history_size``, halved where needed: see :func:`_choose`). A refusal names
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

    @functools.cache
    def run_at(side: int, style_scale: float | None = None, tiling: Tiling | None = None, history: int | None = None):
        """The run at longest side ``side`` (the coarse-to-fine scales shrunk with it)."""
        width, height = images.content_size(side)
        previous = images.content_size(max(1, round(sizes[-2] * side / size))) if len(sizes) > 1 else None
        styles = images.style_sizes(side, style_scale)
        kept = options | ({} if history is None else {"history_size": history})
        parts = {"tile": tiling.tile, "split": tiling.split} if tiling is not None else {}
        return estimate_peak(height, width, styles=styles, previous=previous, **parts, **kept)

    free = available if available is not None else runtime.available_bytes(device)
    forced = settings.get("tile_size")  # 0: the whole image, whatever the memory; >= 64: those tiles
    width, height = images.content_size(size)
    cost = functools.cache(lambda tiling: relative_cost(extractor, height, width, tiling))
    if forced == 0 or not can_tile(extractor.body):
        candidates: list[Tiling | None] = [None]
    else:
        splits = [*split_points(extractor.body, extractor.layers), None]
        sides = [forced] if forced else [side for side in TILE_SIDES if side < max(width, height)]
        tilings = sorted((Tiling(side, split) for side in sides for split in splits), key=cost)
        candidates = tilings if forced else [None, *tilings]
    tiling, options["history_size"] = _choose(
        lambda tiling, history: fits_in(run_at(size, tiling=tiling, history=history), free),
        candidates,
        cost,
        options["history_size"],
        shrink=options["optimizer"] == "lbfgs",
    )
    history = options["history_size"]

    def at_scale(side: int) -> Tiling | None:
        """A scale's tiling: none where its image is no larger than a tile or, unless tiles were asked for, fits
        whole; the final size's at the final size and where tiles were asked for; else the cheapest that fits."""
        width, height = images.content_size(side)
        if tiling is None or tiling.tile >= max(width, height):
            return None
        if forced or side == size:
            return tiling
        if fits_in(run_at(side, history=history), free):
            return None
        here = [t for t in candidates if t is not None and t.tile < max(width, height)]
        smaller = sorted(here, key=lambda t: relative_cost(extractor, height, width, t))  # sorted costs each once
        return next((t for t in smaller if fits_in(run_at(side, tiling=t, history=history), free)), tiling)

    tiles = [at_scale(side) for side in sizes]
    styles = images.style_sizes(size)
    biggest = max(styles, key=lambda wh: wh[0] * wh[1]) if styles else (0, 0)
    what = f"a {width}x{height} px run" + (f" over {tiles[-1]}" if tiles[-1] else "")
    fixes = [("data.image_size", lambda k: run_at(16 * k, tiling=tiles[-1]), -(-size // 16), times16)]
    if biggest[0] * biggest[1] > width * height:
        what += f" with a {biggest[0]}x{biggest[1]} px style image"
        # style_scale in hundredths, below the one set
        hundredths = math.ceil(images.style_scale * 100)
        fixes.append(("data.style_scale", lambda k: run_at(size, k / 100, tiles[-1]), hundredths, lambda k: k / 100))
    return refuse_unless_fits(run_at(size, tiling=tiles[-1]), what, available, device, history, fixes), tiles, history


def _choose(fits, candidates: list[Tiling | None], cost, history: int, shrink: bool) -> tuple[Tiling | None, int]:
    """The tiling (None: the whole image) and L-BFGS history of a run: the first of ``candidates`` (cheapest first)
    with which ``fits(tiling, history)``, the history halved where ``shrink``. Tilings that ``cost`` at most
    :data:`GOOD_COST` with the history down to :data:`GOOD_HISTORY` first (a costly tiling costs more than the
    steps left out), then any with the history down to :data:`MIN_HISTORY`; where nothing fits, the tiling that
    holds the least (the smallest tiles, all layers over them) with the fewest steps (and the plan's refusal)."""

    def halved(floor: int):
        kept = history
        yield kept
        while shrink and kept > floor:
            kept = max(floor, kept // 2)
            yield kept

    good = [tiling for tiling in candidates if cost(tiling) <= GOOD_COST] or candidates[:1]
    for group, floor in ((good, GOOD_HISTORY), (candidates, MIN_HISTORY)):
        for tiling in group:
            if shrink and not fits(tiling, min(floor, history)):  # not even with the fewest steps
                continue
            for kept in halved(floor):
                if fits(tiling, kept):
                    return tiling, kept
    tiled = [tiling for tiling in candidates if tiling is not None]
    least = min(tiled, key=lambda tiling: (tiling.split is not None, tiling.tile)) if tiled else None
    return least, min(history, MIN_HISTORY) if shrink else history
