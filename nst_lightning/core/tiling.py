"""Tiled evaluation of the objective: an image larger than the network's activations allow, exactly.

The image (and the optimiser's state) stay whole; the network's early layers run over overlapping tiles, its
later ones over the whole image (:class:`Tiling`). Every term of the objective is a sum over positions or a
function of such sums:

* a content loss is ``sum((F - T)^2) / n``: each tile's core adds its share, with its gradient;
* a style statistic (a Gram matrix, a mean and covariance) is a function of ``sum w f f^T``, ``sum w f`` and
  ``sum w`` (:func:`~nst_lightning.core.losses.position_sums`).

So one evaluation takes three steps. A first pass over the tiles, without gradients, accumulates the whole
image's style sums of the tiled layers and writes the split layer's map (a pooling's output), core by core,
into one whole map. The layers after the split run over that map, whole, with gradients: the style loss
follows from the sums and those layers' activations, and its gradient with respect to the sums (a few C x C
matrices) and to the map. A second pass runs each tile forward and backward with the surrogate
``<dL/dS, S_tile> + <dL/dM, M_tile> + content share``, whose gradient with respect to the tile's pixels is
exactly that tile's part of the whole image's gradient (the loss is linear in each tile's sums and map once
``dL/dS`` and ``dL/dM`` are fixed). The total variation and temporal terms are cheap and taken on the whole
image.

Why split: a VGG's first blocks hold most of its activations (64 channels at full resolution) for a third of
its arithmetic, while each later block costs about the same arithmetic on a quarter of the positions. Tiling
only the first blocks keeps the memory of the tiles and adds only their share of recomputation; tiling every
layer (``split`` None, where nothing else fits) repeats the whole forward pass and the deepest layer's wide halo.

**Exact where the halo covers the receptive field.** Each tile is its core plus a halo on every side
(clipped at the image's border). A core activation equals the whole image's when every pixel it depends
on lies inside the tile: the halo must reach as far as the deepest tiled layer's receptive field
(:func:`layer_reach`), and tiles start on that layer's pixel grid so that pooling windows line up. Then the
result equals the untiled one up to float32 summation order. A smaller halo is an approximation: the
activations near each core's edge see the tile's zero padding instead of the neighbouring pixels
(``benchmarks/tiling.py`` measures what that costs).

Departure from a "write back each tile's gradient without its halo" scheme: a pixel in a tile's halo
feeds that tile's core activations, so every tile's whole gradient (halo included) is added in; the
cores partition the activations, not the pixels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn

from nst_lightning.core.losses import position_sums, temporal_loss, total_variation
from nst_lightning.core.tiles import Tile, Tiling, map_shapes, tiled_layers, tiles_of


def _core_features(extractor: nn.Module, image: Tensor, tile: int):
    """Each tile's activations, cropped to its core, with where they go in the whole image's maps (no
    gradient): ``(layer, core activations, rows, cols)`` per layer and tile, and the maps' shapes."""
    reach, tiles = tiles_of(extractor, image.shape[-2], image.shape[-1], Tiling(tile))
    for part in tiles:
        pixels = image[..., part.rows, part.cols]
        with torch.no_grad():
            out = extractor(pixels)
        for layer, features in out.items():
            rows, cols, image_rows, image_cols = part.core_of(reach[layer], tuple(features.shape[-2:]))
            yield layer, features[..., rows, cols], image_rows, image_cols


def _add_sums(sums: dict, key: object, part: Sequence[Tensor]) -> None:
    """Adds a tile's position sums to the image's so far under ``key``."""
    sums[key] = [a + b for a, b in zip(sums.get(key, [0.0] * len(part)), part, strict=True)]


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
            maps.setdefault(layer, []).append((core.float(), rows, cols))
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
                _add_sums(sums, layer, position_sums(centred, first=shift is None and style_loss != "gram"))

    accumulate(None)
    if style_loss == "gram":
        return {layer: second / (second.shape[-1] * count) for layer, (second, count) in sums.items()}
    means = {layer: first / count.squeeze(-1) for layer, (first, _, count) in sums.items()}
    accumulate(means)
    return {layer: (means[layer], second / count) for layer, (second, count) in sums.items()}


def evaluate_tiled(
    objective: nn.Module,
    image: Tensor,
    tiling: Tiling,
    backward: Callable[[Tensor], None],
    halo: int | None = None,
    context: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, Tensor]:
    """The losses of ``image`` as :class:`~nst_lightning.core.objective.Objective` computes them (detached), with
    their gradient added into ``image.grad`` through ``backward`` (where gradients are enabled), the network's
    layers through ``tiling.split`` run over tiles (plus ``halo``, by default :func:`exact_halo`), the rest over
    the whole image, each pass under ``context`` (autocast's choice)."""
    run = _Evaluation(objective, image, tiling, halo, context)
    if run.first_pass_needed():
        run.first_pass()
    slopes = run.whole_part()
    if run.gradient:
        run.second_pass(slopes, backward)
    weights, zero = objective.weights, run.zero
    losses: dict[str, Tensor] = {}
    with torch.set_grad_enabled(run.gradient):  # the whole-image terms
        tv = total_variation(image) if weights["tv"] > 0 else zero
        whole = weights["tv"] * tv
        if objective.temporal_target is not None:
            temporal = temporal_loss(image, objective.temporal_target, objective.temporal_mask)
            whole = whole + objective.temporal_weight * temporal
            losses["temporal"] = temporal.detach()
    if whole.requires_grad:
        backward(whole)
    losses.update({f"style_{layer}": term.detach() for layer, term in run.per_layer.items()})
    total = weights["content"] * run.content + weights["style"] * run.style + whole.detach()
    losses.update(total=total, content=run.content, style=run.style, tv=tv.detach())
    return losses


class _Evaluation:
    """One evaluation of :func:`evaluate_tiled`, in its three parts: a first pass over the tiles without gradients
    (the tiled layers' style sums and content shares, the split layer's whole map), the style loss from the sums
    and the layers after the split over the whole map (with the loss's gradient with respect to the sums and the
    map), and a second pass over the tiles, each forward and backward against those fixed gradients."""

    def __init__(self, objective, image: Tensor, tiling: Tiling, halo: int | None, context) -> None:
        self.objective, self.image, self.split, self.context = objective, image, tiling.split, context
        self.extractor = objective.extractor
        self.reach, self.tiles = tiles_of(self.extractor, image.shape[-2], image.shape[-1], tiling, halo)
        self.tiled = set(tiled_layers(self.extractor.body, self.extractor.layers, tiling.split))
        groups = objective.style_targets.items()
        self.styles = [(layer, g, target) for layer, group in groups for g, target in enumerate(group)]
        self.contents = list(objective.content_targets.items())
        self.n_content = max(len(objective.content_layers), 1)
        self.gradient = torch.is_grad_enabled() and image.requires_grad
        self.zero = image.new_zeros((), dtype=torch.float32)
        self.content, self.style, self.per_layer = self.zero, self.zero, {}
        self.sums: dict[tuple[str, int], list[Tensor]] = {}
        self.kept = None  # the first pass's last tile, with its graph
        self.whole_map: Tensor | None = None

    def features(self, part: Tile) -> tuple[Tensor, dict[str, Tensor], Callable[[str], tuple[slice, ...]]]:
        """A tile's pass through the tiled layers: the split layer's map, the activations, and where each
        layer's core lies (:meth:`Tile.core_of`)."""
        pixels = self.image[..., part.rows, part.cols]
        with self.context():
            last, out = self.extractor.run(pixels, through=self.split)
        return last, out, lambda layer: part.core_of(self.reach[layer], tuple(out.get(layer, last).shape[-2:]))

    def first_pass_needed(self) -> bool:
        return not self.gradient or self.split is not None or any(layer in self.tiled for layer, _, _ in self.styles)

    def first_pass(self) -> None:
        # The last tile keeps its graph: the second pass runs the tiles in the opposite order and starts with it,
        # which saves one tile's forward pass.
        for index, part in enumerate(self.tiles):
            keep = self.gradient and index == len(self.tiles) - 1
            with torch.set_grad_enabled(keep):
                last, out, core = self.features(part)
            self.kept = (last, out, core) if keep else None
            with torch.no_grad():
                self._add_tile(last, out, core)

    def _tile_terms(self, out: dict[str, Tensor], core) -> tuple[Tensor, dict[tuple[str, int], tuple[Tensor, ...]]]:
        """A tile's share of the content loss and each style target's sums, over the tiled layers' cores."""
        content = self.zero
        for layer, target in self.contents:
            if layer in self.tiled:
                rows, cols, image_rows, image_cols = core(layer)
                share = target.partial(out[layer][..., rows, cols], image_rows, image_cols)
                content = content + share / self.n_content
        sums = {}
        for layer, g, target in self.styles:
            if layer in self.tiled:
                rows, cols, image_rows, image_cols = core(layer)
                sums[(layer, g)] = target.sums(out[layer][..., rows, cols], image_rows, image_cols)
        return content, sums

    def _add_tile(self, last: Tensor, out: dict[str, Tensor], core) -> None:
        content, sums = self._tile_terms(out, core)
        self.content = self.content + content
        for key, tile_sums in sums.items():
            _add_sums(self.sums, key, tile_sums)
        if self.split is not None:
            rows, cols, image_rows, image_cols = core(self.split)
            if self.whole_map is None:
                shape = map_shapes(self.extractor.body, *self.image.shape[-2:])[self.split]
                self.whole_map = torch.empty(
                    (*last.shape[:2], *shape),
                    dtype=last.dtype,
                    device=last.device,
                    memory_format=self.extractor.memory_format,
                )
            self.whole_map[..., image_rows, image_cols] = last[..., rows, cols]

    def whole_part(self) -> dict:
        """The style loss from the sums and the layers after the split over the whole map; returns the gradient
        of the style loss and of those layers' content loss with respect to each target's sums (by key, in the
        order of its sums) and to the whole map (under the key None)."""
        objective, everything = self.objective, (slice(None), slice(None))
        leaves = {key: [s.requires_grad_(self.gradient) for s in value] for key, value in self.sums.items()}
        whole_map = self.whole_map
        self.whole_map = None
        with torch.set_grad_enabled(self.gradient):
            deep: dict[str, Tensor] = {}
            if whole_map is not None:
                whole_map.requires_grad_(self.gradient)
                with self.context():
                    _, deep = self.extractor.run(whole_map, after=self.split)
            style, per_layer = self.zero, {}
            for layer, g, target in self.styles:
                term_sums = leaves.get((layer, g)) or target.sums(deep[layer], *everything)
                term = objective.group_weights[g] * target.loss_from_sums(*term_sums)
                per_layer[layer] = per_layer.get(layer, self.zero) + term
            for layer, term in per_layer.items():
                style = style + objective.style_layer_weights[layer] * term
            content = sum(
                (t.partial(deep[layer], *everything) for layer, t in self.contents if layer in deep), self.zero
            )
            content = content / self.n_content
            part = objective.weights["style"] * style + objective.weights["content"] * content
            inputs = [s for value in leaves.values() for s in value] + ([whole_map] if whole_map is not None else [])
            found = torch.autograd.grad(part, inputs, allow_unused=True) if self.gradient and inputs else []
        self.style, self.per_layer = style.detach(), per_layer
        self.content = self.content + content.detach()
        slopes, found = {}, list(found)
        for key, value in leaves.items():
            slopes[key] = found[: len(value)]
            del found[: len(value)]
        if found:
            slopes[None] = found[0]
        return slopes

    def second_pass(self, slopes: dict, backward: Callable[[Tensor], None]) -> None:
        weights, counted = self.objective.weights, self.first_pass_needed()
        for index, part in enumerate(reversed(self.tiles)):
            last, out, core = self.kept if index == 0 and self.kept is not None else self.features(part)
            self.kept = None  # its graph goes with this tile's backward
            content, sums = self._tile_terms(out, core)
            if not counted:  # the content shares, where no first pass counted them
                self.content = self.content + content.detach()
            surrogate = weights["content"] * content
            for key, tile_sums in sums.items():
                pairs = zip(slopes[key], tile_sums, strict=True)
                surrogate = surrogate + sum((d * s).sum() for d, s in pairs if d is not None)
            if slopes.get(None) is not None:
                rows, cols, image_rows, image_cols = core(self.split)
                map_slope = slopes[None][..., image_rows, image_cols].float()
                surrogate = surrogate + (map_slope * last[..., rows, cols].float()).sum()
            del last, out
            if surrogate.requires_grad:
                backward(surrogate)
