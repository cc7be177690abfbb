"""Tiled evaluation of the objective: an image larger than the network's activations allow, exactly.

The image (and the optimiser's state) stay whole; the network runs over overlapping tiles. Every term of
the objective is a sum over positions or a function of such sums:

* a content loss is ``sum((F - T)^2) / n``: each tile's core adds its share, with its gradient;
* a style statistic (a Gram matrix, a mean and covariance) is a function of ``sum w f f^T``, ``sum w f`` and
  ``sum w`` (:func:`~nst_lightning.core.losses.position_sums`).

So one evaluation takes two passes. The first, without gradients, accumulates the whole image's style
sums tile by tile; the style loss and its gradient with respect to those sums follow (a few C x C
matrices). The second runs each tile forward and backward with the surrogate
``<dL/dS, S_tile> + content share``, whose gradient with respect to the tile's pixels is exactly that
tile's part of the whole image's gradient (the style loss is linear in each tile's sums once ``dL/dS``
is fixed). The total variation and temporal terms are cheap and taken on the whole image.

**Exact where the halo covers the receptive field.** Each tile is its core plus a halo on every side
(clipped at the image's border). A core activation equals the whole image's when every pixel it depends
on lies inside the tile: the halo must reach as far as the deepest layer's receptive field
(:func:`layer_reach`), and tiles start on the deepest layer's pixel grid so that pooling windows line
up. Then the result equals the untiled one up to float32 summation order. A smaller halo is an
approximation: the activations near each core's edge see the tile's zero padding instead of the
neighbouring pixels (``benchmarks/tiling.py`` measures what that costs).

Departure from a "write back each tile's gradient without its halo" scheme: a pixel in a tile's halo
feeds that tile's core activations, so every tile's whole gradient (halo included) is added in; the
cores partition the activations, not the pixels.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nst_lightning.core.color import grey_rgb
from nst_lightning.core.losses import position_sums, temporal_loss, total_variation


@dataclass(frozen=True)
class Reach:
    """How one layer's activations sit on the image: activation ``i`` spans ``jump`` pixels and depends on
    pixels ``i * jump - left`` to ``i * jump + right``."""

    jump: int
    left: int
    right: int


def layer_reach(body: nn.Sequential) -> dict[str, Reach]:
    """:class:`Reach` of every layer of a sequential network of convolutions, poolings and point-wise
    layers (a VGG); a ValueError names a layer of any other kind (a residual block: tiling needs a VGG)."""
    jump, left, right = 1, 0, 0
    reach: dict[str, Reach] = {}
    for name, layer in body.named_children():
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            kernel, stride, padding = (_pair(getattr(layer, k))[0] for k in ("kernel_size", "stride", "padding"))
            dilation = _pair(getattr(layer, "dilation", 1))[0]
            span = dilation * (kernel - 1)
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


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return value if isinstance(value, tuple) else (value, value)


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


def _tiles(extractor: nn.Module, height: int, width: int, tile: int, halo: int | None = None):
    reach = layer_reach(extractor.body)
    layers = list(extractor.layers)
    halo = exact_halo(reach, layers) if halo is None else halo
    align = max(reach[layer].jump for layer in layers)
    return reach, plan_tiles(height, width, tile, halo, align)


def _core_features(extractor: nn.Module, image: Tensor, tile: int):
    """Each tile's activations, cropped to its core, with where they go in the whole image's maps (no
    gradient): ``(layer, core activations, rows, cols)`` per layer and tile, and the maps' shapes."""
    reach, tiles = _tiles(extractor, image.shape[-2], image.shape[-1], tile)
    for part in tiles:
        pixels = image[..., part.rows, part.cols]
        with torch.no_grad():
            out = extractor(grey_rgb(pixels) if pixels.shape[1] == 1 else pixels)
        for layer, features in out.items():
            rows, cols, image_rows, image_cols = part.core_of(reach[layer], tuple(features.shape[-2:]))
            yield layer, features[..., rows, cols], image_rows, image_cols


def tiled_maps(
    extractor: nn.Module, image: Tensor, layers: Sequence[str], tile: int
) -> tuple[dict[str, Tensor], dict[str, tuple[int, int]], tuple[float, str]]:
    """What :meth:`~nst_lightning.core.objective.Objective.set_targets` needs of the content image, tile by tile:
    the whole image's activations of ``layers``, every layer's map size, and the largest mean rectified
    activation with its layer."""
    maps: dict[str, Tensor] = {}
    shapes: dict[str, tuple[int, int]] = {}
    means: dict[str, tuple[float, int]] = {}
    for layer, core, rows, cols in _core_features(extractor, image, tile):
        shapes[layer] = (max(shapes.get(layer, (0, 0))[0], rows.stop), max(shapes.get(layer, (0, 0))[1], cols.stop))
        total, count = means.get(layer, (0.0, 0))
        means[layer] = (total + float(core.clamp(min=0).sum(dtype=torch.float64)), count + core.numel())
        if layer in layers:
            if layer not in maps:
                maps[layer] = []
            maps[layer].append((core.float(), rows, cols))
    whole = {}
    for layer, parts in maps.items():
        channels = parts[0][0].shape[1]
        whole[layer] = image.new_zeros((image.shape[0], channels, *shapes[layer]), dtype=torch.float32)
        for core, rows, cols in parts:
            whole[layer][..., rows, cols] = core
    scale = max((total / count, layer) for layer, (total, count) in means.items())
    return whole, shapes, scale


def tiled_statistics(
    extractor: nn.Module, image: Tensor, layers: Sequence[str], style_loss: str, tile: int
) -> dict[str, Tensor | tuple[Tensor, Tensor]]:
    """One style image's statistics of ``layers`` (:func:`~nst_lightning.core.targets.image_statistics`), tile by
    tile. The covariance takes a second pass about the mean from the first: one pass's uncentred second
    moment would lose it to float32 cancellation."""
    sums: dict[str, list[Tensor]] = {}

    def accumulate(shift: dict[str, Tensor] | None) -> None:
        sums.clear()
        for layer, core, _, _ in _core_features(extractor, image, tile):
            if layer in layers:
                centred = core if shift is None else core.float() - shift[layer].view(*shift[layer].shape, 1, 1)
                part = position_sums(centred, first=shift is None and style_loss != "gram")
                before = sums.get(layer, [0.0] * len(part))
                sums[layer] = [a + b for a, b in zip(before, part, strict=True)]

    accumulate(None)
    if style_loss == "gram":
        return {layer: second / (second.shape[-1] * count) for layer, (second, count) in sums.items()}
    means = {layer: first / count.squeeze(-1) for layer, (first, _, count) in sums.items()}
    accumulate(means)
    return {layer: (means[layer], second / count) for layer, (second, count) in sums.items()}


def evaluate_tiled(
    objective: nn.Module,
    image: Tensor,
    tile: int,
    backward: Callable[[Tensor], None],
    halo: int | None = None,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, Tensor]:
    """The losses of ``image`` as :class:`~nst_lightning.core.objective.Objective` computes them (detached), with
    their gradient added into ``image.grad`` through ``backward``, the network run over tiles of ``tile``
    pixels (plus ``halo``, by default :func:`exact_halo`), each pass under ``context`` (autocast's choice)."""
    extractor = objective.extractor
    reach, tiles = _tiles(extractor, image.shape[-2], image.shape[-1], tile, halo)
    weights = objective.weights
    styles = [(layer, g, target) for layer, group in objective.style_targets.items() for g, target in enumerate(group)]

    def features(part: Tile) -> tuple[dict[str, Tensor], Callable[[str], tuple[slice, ...]]]:
        pixels = image[..., part.rows, part.cols]
        with context():
            out = extractor(grey_rgb(pixels) if pixels.shape[1] == 1 else pixels)
        return out, lambda layer: part.core_of(reach[layer], tuple(out[layer].shape[-2:]))

    # Pass 1: the whole image's style sums, tile by tile. The last tile's pass keeps its graph: pass 2 runs the
    # tiles in the opposite order and starts with it, so one forward pass of the network is saved.
    sums: dict[tuple[str, int], list[Tensor]] = {}
    kept = None
    if styles:
        for index, part in enumerate(tiles):
            last = index == len(tiles) - 1
            with torch.set_grad_enabled(last and torch.is_grad_enabled()):
                out, core = features(part)
            if last:
                kept = (out, core)
            for layer, g, target in styles:
                rows, cols, image_rows, image_cols = core(layer)
                with torch.no_grad():
                    tile_sums = target.sums(out[layer][..., rows, cols], image_rows, image_cols)
                before = sums.get((layer, g), [0.0] * len(tile_sums))
                sums[(layer, g)] = [a + b for a, b in zip(before, tile_sums, strict=True)]
    # The style loss from the sums, and its gradient with respect to them.
    leaves = {key: [s.requires_grad_() for s in value] for key, value in sums.items()}
    losses: dict[str, Tensor] = {}
    zero = image.new_zeros((), dtype=torch.float32)
    style, per_layer = zero, {}
    with torch.enable_grad():
        for layer, g, target in styles:
            if (layer, g) in leaves:
                term = objective.group_weights[g] * target.loss_from_sums(*leaves[(layer, g)])
                per_layer[layer] = per_layer.get(layer, zero) + term
        for layer, term in per_layer.items():
            style = style + objective.style_layer_weights[layer] * term
        flat = [s for value in leaves.values() for s in value]
        slopes = list(torch.autograd.grad(weights["style"] * style, flat)) if flat and style.requires_grad else []
    # dL/dS for each target's sums, in the order of its sums.
    slope = {key: [slopes.pop(0) for _ in value] for key, value in leaves.items()} if slopes else {}
    # Pass 2: each tile forward and backward against the fixed slopes; the content term's shares on the way.
    content = zero
    n_content = max(len(objective.content_layers), 1)
    for index, part in enumerate(reversed(tiles)):
        out, core = kept if index == 0 and kept is not None else features(part)
        kept = None  # its graph goes with this tile's backward
        surrogate = zero
        for layer, target in objective.content_targets.items():
            rows, cols, image_rows, image_cols = core(layer)
            share = target.partial(out[layer][..., rows, cols], image_rows, image_cols) / n_content
            content = content + share.detach()
            surrogate = surrogate + weights["content"] * share
        for layer, g, target in styles:
            if (layer, g) not in slope:
                continue
            rows, cols, image_rows, image_cols = core(layer)
            tile_sums = target.sums(out[layer][..., rows, cols], image_rows, image_cols)
            surrogate = surrogate + sum((d * s).sum() for d, s in zip(slope[(layer, g)], tile_sums, strict=True))
        if surrogate.requires_grad:
            backward(surrogate)
    # The whole-image terms.
    whole = zero
    tv = total_variation(image) if weights["tv"] > 0 else zero
    whole = whole + weights["tv"] * tv
    if objective.temporal_target is not None:
        temporal = temporal_loss(image, objective.temporal_target, objective.temporal_mask)
        whole = whole + objective.temporal_weight * temporal
        losses["temporal"] = temporal.detach()
    if whole.requires_grad:
        backward(whole)
    losses.update({f"style_{layer}": term.detach() for layer, term in per_layer.items()})
    total = weights["content"] * content + weights["style"] * style.detach() + whole.detach()
    losses.update(total=total, content=content, style=style.detach(), tv=tv.detach())
    return losses
