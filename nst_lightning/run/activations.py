"""What a run holds in memory, from shapes alone, for the estimate of :mod:`nst_lightning.run.memory`: the passes
of :class:`~nst_lightning.core.features.FeatureExtractor` run on the ``meta`` device (no memory), the optimiser's
state and the targets between steps, and the computation of the targets.

Two passes matter: the optimisation's, whose tensors autograd saves for the backward pass
(:func:`saved_activations`), and the targets', without gradients, over each content and style image at
its own size (:func:`forward_peak`): there a layer's input and output are alive at once, with the
activations returned so far.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nst_lightning.core.features import FeatureExtractor

# A forward pass without gradients takes this much more resident memory than the tensors it holds at its
# peak: the allocator's heap fragments as ever smaller activations reuse the holes of larger ones
# (measured on a CPU with freed memory kept, VGG-19 through relu5_1: 1.22 to 1.24 from 576x768 to 1500x2000).
FORWARD_HEAP_SLACK = 1.25
# Bytes per pixel of a video frame's flow phase (before its run, the previous frame's state still held):
# two (H, W, 2) float32 flows, the grey and RGB frames, and the reliability mask's temporaries (the
# sampling grid, the warped forward flow, its sum with the backward one and their squares).
FLOW_BYTES_PER_PIXEL = 96
# Output-sized tensors alive at once inside a block of layers (a residual block: the convolution's
# output, the batch norm's and the shortcut's); a plain layer has one.
BLOCK_ACTIVATIONS = 3


def tensor_bytes(tensor: torch.Tensor, floating: int = 4) -> int:
    """Bytes of ``tensor``: floating-point elements at ``floating`` bytes each, others at their own size."""
    return tensor.numel() * (floating if tensor.is_floating_point() else tensor.element_size())


def saved_activations(
    extractor: FeatureExtractor,
    height: int,
    width: int,
    activation_bytes: int,
    after: str | None = None,
    through: str | None = None,
) -> tuple[int, int, dict[str, int]]:
    """(bytes autograd saves for the backward pass, elements of the largest of those tensors, elements of each
    returned activation) in a forward pass of ``extractor``'s layers after ``after`` (None: from the image)
    through ``through`` (None: the deepest), on the meta device, over a ``height`` x ``width`` image whose
    gradient is wanted, with the activations it returns (which the losses keep). Each tensor counts once;
    floating-point ones at ``activation_bytes`` per element (2 under mixed precision), integer ones (max
    pooling's indices) at their own size; the weights not at all. After ``after``, its map (the input here, held
    whole between the two parts of a tiled run: tiling.py) counts as one of them."""
    weights = {id(t) for t in [*extractor.parameters(), *extractor.buffers()]}
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in weights:
            saved.setdefault(id(tensor), tensor)
        return tensor

    image = torch.empty(1, 3, height, width, device=extractor.mean.device)
    if after is not None:
        with torch.no_grad():
            image, _ = extractor.run(image, through=after)
    image.requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        _, features = extractor.run(image, after=after, through=through)
    for tensor in features.values():  # the losses keep the activations they compare for their own backward
        pack(tensor)
    total = sum(tensor_bytes(t, activation_bytes) for t in saved.values())
    largest = max([image.numel(), *(t.numel() for t in saved.values())])
    return total, largest, {name: tensor.numel() for name, tensor in features.items()}


def forward_peak(extractor: FeatureExtractor, height: int, width: int) -> tuple[int, int]:
    """(bytes alive at the peak, bytes of the activations returned) of a float32 forward pass of
    ``extractor`` (on the meta device) without gradients over a ``height`` x ``width`` image, as when the
    targets are computed. The image itself is the caller's and is not counted; its normalised copies are.
    At each layer its input, its output and the activations kept to be returned so far are alive."""
    x = torch.empty(1, 3, height, width, device=extractor.mean.device)
    peak = 2 * tensor_bytes(x)  # (image - mean) / std, then its copy in the network's memory layout
    kept: dict[int, torch.Tensor] = {}  # the tensors themselves, so that no id is reused
    with torch.no_grad():
        for name, layer in extractor.body.named_children():
            y = layer(x)
            live = sum(tensor_bytes(t) for t in kept.values()) + (0 if id(x) in kept else tensor_bytes(x))
            made = 0 if y is x else tensor_bytes(y) * (1 if _is_leaf(layer) else BLOCK_ACTIVATIONS)
            peak = max(peak, live + made)
            if name in extractor.layers:
                kept[id(y)] = y
            x = y
    returned = sum(tensor_bytes(t) for t in kept.values())
    if extractor.divisors is not None:  # divided copies of the returned activations (not a VGG)
        peak = max(peak, 2 * returned)
    return peak, returned


def _is_leaf(layer: nn.Module) -> bool:
    return next(layer.children(), None) is None


def held_between_steps(
    extractor: FeatureExtractor, height: int, width: int, options: Mapping[str, Any]
) -> tuple[int, int]:
    """(optimiser bytes, target bytes) a run on a ``height`` x ``width`` image holds between its steps;
    ``options``: ``optimizer``, ``history_size``, ``content_layers``, ``style_layers``, ``style_loss`` and
    ``masks`` as :func:`~nst_lightning.run.memory.estimate_peak` takes them."""
    with torch.no_grad():
        features = extractor(torch.empty(1, 3, height, width, device="meta"))
    pixels = 3 * height * width
    # The image, its gradient and the optimiser's vectors: L-BFGS keeps 2 * history past steps plus
    # the flat gradient, the previous one, the direction and a work vector; Adam two moments.
    lbfgs = options["optimizer"] == "lbfgs"
    vectors = 2 + (2 * options["history_size"] + 4 if lbfgs else 3)
    # Targets: activations of a content layer and a style layer's statistics (one set per mask, else one
    # blend: a Gram matrix, or a mean, covariance and its square root), and the content and style images.
    channels = [features[name].shape[1] for name in options["style_layers"]]
    statistics = sum(c * c if options["style_loss"] == "gram" else 2 * c * c + c for c in channels)
    targets = sum(features[name].numel() for name in options["content_layers"])
    targets += statistics * max(1, options["masks"]) + 2 * pixels
    # Each mask at the image's size and averaged down to each style layer.
    mask_sizes = [features[name].shape[-2:].numel() for name in options["style_layers"]]
    targets += options["masks"] * (height * width + sum(mask_sizes))
    return vectors * pixels * 4, targets * 4


def target_pass(extractor: FeatureExtractor, height: int, width: int, options: Mapping[str, Any]) -> int:
    """Bytes of the targets' computation on a ``height`` x ``width`` image, weights aside (see
    :attr:`nst_lightning.run.memory.MemoryEstimate.target_pass`; ``options`` as :func:`held_between_steps` takes them,
    and ``styles``, ``previous``, ``preserve_color`` and ``temporal`` of
    :func:`~nst_lightning.run.memory.estimate_peak`)."""
    styles = options["styles"] if options["styles"] is not None else [(width, height)]
    images = [(width, height), *styles]
    pixels = sum(w * h for w, h in images)
    held = 4 * (3 * pixels + options["masks"] * height * width)
    if options["preserve_color"] != "none":  # recoloured or grey copies of the images, and a temporary
        held += 2 * 4 * 3 * pixels
    if options["temporal"]:
        held += 4 * 4 * height * width  # the warped previous frame and its mask, set before the run
    kept, peak, largest = 0, 0, 0
    for index, (w, h) in enumerate(images):  # the content image first, then each style: what each returns is kept
        if options.get("tile") is None:
            transient, returned = forward_peak(extractor, h, w)
        else:  # tile by tile: a tile's pass, and what is kept of it (the content layers' maps, whole; statistics)
            transient, _ = forward_peak(extractor, *tile_extent(extractor, h, w, options["tile"]))
            returned = _content_maps(extractor, h, w, options["content_layers"]) if index == 0 else 0
        peak, kept = max(peak, kept + math.ceil(FORWARD_HEAP_SLACK * transient)), kept + returned
        largest = max(largest, returned)
    if options["style_loss"] != "gram":  # a mean-centred copy of a layer's (bounded by all the largest image's)
        peak = max(peak, kept + largest)
    if options["previous"] is not None:  # a coarse-to-fine run's previous scale: its image (the parameter, its
        # gradient, the accepted point) and targets; its optimiser's state is dropped first (module._enter_scale)
        previous_width, previous_height = options["previous"]
        _, previous_targets = held_between_steps(extractor, previous_height, previous_width, options)
        peak += 3 * 3 * previous_width * previous_height * 4 + previous_targets
    if options["temporal"]:  # the previous frame's state is held through this frame's flows and targets
        held_state = sum(held_between_steps(extractor, height, width, options))
        peak = max(peak, FLOW_BYTES_PER_PIXEL * height * width) + held_state
    return held + peak


def tile_extent(
    extractor: FeatureExtractor, height: int, width: int, tile: int, split: str | None = None
) -> tuple[int, int]:
    """(height, width) of the largest tile, halo included, that the network's layers through ``split`` (None: all)
    see in a tiled run over a ``height`` x ``width`` image with cores of ``tile`` pixels (see
    :mod:`nst_lightning.core.tiling`)."""
    from nst_lightning.core.tiles import Tiling, tiles_of

    _, tiles = tiles_of(extractor, height, width, Tiling(tile, split))
    return max(t.rows.stop - t.rows.start for t in tiles), max(t.cols.stop - t.cols.start for t in tiles)


def _content_maps(extractor: FeatureExtractor, height: int, width: int, layers: Any) -> int:
    with torch.no_grad():
        features = extractor(torch.empty(1, 3, height, width, device=extractor.mean.device))
    return sum(tensor_bytes(features[name]) for name in layers)
