"""Where tiles lie (tiling.py runs the network over them): each layer's reach over the image, the halo that makes
a tile's core exact, the tiles' cores and halos, where a VGG may be split between tiled layers and whole ones
(:class:`Tiling`), and what a tiling costs in arithmetic against the whole image (the memory plan's choice)."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Reach:
    """How one layer's activations sit on the image: activation ``i`` spans ``jump`` pixels and depends on
    pixels ``i * jump - left`` to ``i * jump + right``."""

    jump: int
    left: int
    right: int


# The layers that slide a window over the map (the rest of a VGG is point-wise), and of them the poolings.
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
WINDOWS = (nn.Conv2d, *POOLS)


def _window(layer: nn.Module) -> tuple[int, int, int]:
    """(span, stride, padding) of a window layer along a side: ``span`` pixels beyond the first, ``dilation *
    (kernel - 1)`` (square windows: a VGG's)."""
    kernel, stride, padding, dilation = (
        value if isinstance(value, int) else value[0]
        for value in (layer.kernel_size, layer.stride, layer.padding, getattr(layer, "dilation", 1))
    )
    return dilation * (kernel - 1), stride, padding


def layer_reach(body: nn.Sequential) -> dict[str, Reach]:
    """:class:`Reach` of every layer of a sequential network of convolutions, poolings and point-wise
    layers (a VGG); a ValueError names a layer of any other kind (a residual block: tiling needs a VGG)."""
    jump, left, right = 1, 0, 0
    reach: dict[str, Reach] = {}
    for name, layer in body.named_children():
        if isinstance(layer, WINDOWS):
            span, stride, padding = _window(layer)
            left, right = left + padding * jump, right + (span - padding) * jump
            jump *= stride
        elif not isinstance(layer, (nn.ReLU, nn.Identity, nn.Dropout)):
            raise ValueError(f"cannot tile through layer {name} ({type(layer).__name__}): tiling needs a VGG backbone")
        reach[name] = Reach(jump, left, right)
    return reach


def can_tile(body: nn.Sequential) -> bool:
    """Whether a network can run over tiles (see :func:`layer_reach`)."""
    try:
        layer_reach(body)
    except ValueError:
        return False
    return True


# The tile sizes (pixels a side, the halo aside) a run that does not fit whole tries, largest first.
TILE_SIDES = (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 192, 128)


def exact_halo(reach: dict[str, Reach], layers: list[str]) -> int:
    """The smallest halo (pixels, a multiple of the deepest layer's jump) with which every activation of
    ``layers`` in a tile's core equals the whole image's."""
    align = max(reach[layer].jump for layer in layers)
    need = max(max(reach[layer].left, reach[layer].right - reach[layer].jump + 1) for layer in layers)
    return math.ceil(need / align) * align


@dataclass(frozen=True)
class Tile:
    """One tile: the pixels fed to the network (``rows`` x ``cols``, core plus halo) and its core."""

    rows: slice
    cols: slice
    core_rows: slice
    core_cols: slice

    def core_of(self, reach: Reach, shape: tuple[int, int]) -> tuple[slice, slice, slice, slice]:
        """The core's activations of a layer with ``reach``, whose map over this tile is ``shape``: as
        slices of the tile's map, then of the whole image's map."""
        out = []
        for pixels, core, size in ((self.rows, self.core_rows, shape[0]), (self.cols, self.core_cols, shape[1])):
            start = (core.start - pixels.start) // reach.jump
            # The last tile's core runs to the end of the map (an image side need not be a multiple of the jump).
            stop = size if core.stop >= pixels.stop else (core.stop - pixels.start) // reach.jump
            offset = pixels.start // reach.jump
            out.append((slice(start, stop), slice(start + offset, stop + offset)))
        (tile_rows, image_rows), (tile_cols, image_cols) = out
        return tile_rows, tile_cols, image_rows, image_cols


def plan_tiles(height: int, width: int, tile: int, halo: int, align: int) -> list[Tile]:
    """Tiles whose cores (``tile`` pixels a side, rounded down to a multiple of ``align``) cover the image,
    each with ``halo`` pixels around it where the image has them."""
    core = max(align, tile // align * align)

    def spans(side: int) -> list[tuple[slice, slice]]:
        starts = list(range(0, side, core))
        if len(starts) > 1 and side - starts[-1] < align:  # too thin to hold an activation: join the one before
            starts.pop()
        stops = starts[1:] + [side]
        return [(slice(max(0, a - halo), min(side, b + halo)), slice(a, b)) for a, b in zip(starts, stops, strict=True)]

    return [Tile(r, c, cr, cc) for r, cr in spans(height) for c, cc in spans(width)]


@dataclass(frozen=True)
class Tiling:
    """How the network runs over an image too large for it whole: its layers through ``split`` over tiles of
    ``tile`` pixels a side (cores, their halo aside), the layers after ``split`` over the whole image (None: every
    layer over tiles)."""

    tile: int
    split: str | None = None

    def __str__(self) -> str:
        return f"{self.tile} px tiles" + (f" through {self.split}" if self.split else "")


def split_points(body: nn.Sequential, layers: Sequence[str]) -> list[str]:
    """Where a network may be split (:class:`Tiling`): after each pooling layer before the deepest of ``layers``,
    the shallowest first. The pooled maps are the smallest to hold whole between the two parts, and a VGG's
    early layers hold most of its activations for little of its arithmetic (each block's convolutions cost
    about the same; its activations halve with each pooling)."""
    names = [name for name, _ in body.named_children()]
    deepest = max(names.index(layer) for layer in layers)
    return [name for name in names[:deepest] if isinstance(body.get_submodule(name), POOLS)]


def tiled_layers(body: nn.Sequential, layers: Sequence[str], split: str | None) -> list[str]:
    """The layers of ``layers`` that run over tiles (those through ``split``; all where it is None), with ``split``."""
    if split is None:
        return list(layers)
    names = [name for name, _ in body.named_children()]
    return [layer for layer in layers if names.index(layer) <= names.index(split)] + [split]


def map_shapes(body: nn.Sequential, height: int, width: int) -> dict[str, tuple[int, int]]:
    """(height, width) of each layer's map over a ``height`` x ``width`` image."""
    shapes = {}
    for name, layer in body.named_children():
        if isinstance(layer, WINDOWS):
            span, stride, padding = _window(layer)
            rounding = math.ceil if getattr(layer, "ceil_mode", False) else math.floor
            height, width = (rounding((side + 2 * padding - span - 1) / stride) + 1 for side in (height, width))
        shapes[name] = (height, width)
    return shapes


def tiles_of(extractor: nn.Module, height: int, width: int, tiling: Tiling, halo: int | None = None):
    """The reach of every layer of ``extractor`` and the tiles of ``tiling`` over a ``height`` x ``width`` image, with
    ``halo`` pixels (by default :func:`exact_halo` of the tiled layers; a smaller one, as the benchmarks measure,
    must be a multiple of the deepest tiled layer's stride, or the tiles' cores would not meet on its grid)."""
    reach = layer_reach(extractor.body)
    layers = tiled_layers(extractor.body, extractor.layers, tiling.split)
    align = max(reach[layer].jump for layer in layers)
    if halo is None:
        halo = exact_halo(reach, layers)
    elif halo < 0 or halo % align:
        raise ValueError(f"a tile's halo must be a multiple of {align} px (the tiled layers' stride), got {halo}")
    return reach, plan_tiles(height, width, tiling.tile, halo, align)


def relative_cost(extractor: nn.Module, height: int, width: int, tiling: Tiling | None) -> float:
    """The arithmetic of one tiled evaluation over a whole one's, from the convolutions' multiply-adds: a whole
    evaluation is a forward pass and a backward pass (twice the forward's); a tiled one adds a first pass over the
    tiled layers (without gradients) and pays for their halos in both."""
    if tiling is None:
        return 1.0
    body = extractor.body
    names = [name for name, _ in body.named_children()]
    deepest = max(names.index(layer) for layer in extractor.layers)
    split = deepest if tiling.split is None else names.index(tiling.split)

    @functools.cache
    def work(rows: int, cols: int) -> list[int]:  # each layer's multiply-adds (per output channel and input one)
        shapes = map_shapes(body, rows, cols)
        return [
            shapes[name][0] * shapes[name][1] * layer.in_channels * layer.out_channels
            if isinstance(layer, nn.Conv2d)
            else 0
            for name, layer in body.named_children()
        ]

    _, tiles = tiles_of(extractor, height, width, tiling)
    tiled = sum(sum(work(t.rows.stop - t.rows.start, t.cols.stop - t.cols.start)[: split + 1]) for t in tiles)
    whole = work(height, width)
    deep = sum(whole[split + 1 : deepest + 1])
    return (4 * tiled + 3 * deep) / (3 * sum(whole[: deepest + 1]))
