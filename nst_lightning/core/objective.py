"""The objective of Gatys et al.: an extractor, targets and weights, mapping an image to its named losses.

An ``nn.Module`` of its own, usable (and tested) without Lightning: :meth:`Objective.set_targets` computes
the content activations and style statistics of the images once, as buffers (so they follow the module's
device and live in checkpoints), and calling the objective on an image gives ``{name: loss}``. Colour
control, masks and the blending of several styles happen here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nst_lightning.core.color import combine_luminance, grey_rgb, luminance, match_color, match_luminance
from nst_lightning.core.features import FeatureExtractor
from nst_lightning.core.inputs import Inputs
from nst_lightning.core.losses import temporal_loss, total_variation
from nst_lightning.core.targets import STYLE_TARGETS, ContentTarget, image_statistics, resize_mask
from nst_lightning.core.tiles import Tiling
from nst_lightning.core.tiling import evaluate_tiled, tiled_maps, tiled_statistics


class Objective(nn.Module):
    """``image -> {total, content, style, style_<layer>, tv}`` (and ``temporal`` for a video frame, see
    :meth:`set_temporal`): the weighted loss and its terms (float32).

    Args:
        extractor: the frozen feature extractor (it returns at least the content and style layers).
        content_layers, style_layers: the layers compared with the content image and with the styles.
        style_layer_weights: one weight per style layer.
        content_weight, style_weight, tv_weight: alpha, beta and the total variation's weight.
        style_loss: ``gram`` or ``mean_cov`` (see :data:`~nst_lightning.core.targets.STYLE_TARGETS`).
        preserve_color: ``none``, ``luminance`` or ``histogram`` (see :meth:`prepare`).
    """

    def __init__(
        self,
        extractor: FeatureExtractor,
        content_layers: Sequence[str],
        style_layers: Sequence[str],
        style_layer_weights: Sequence[float],
        content_weight: float = 1.0,
        style_weight: float = 1e6,
        tv_weight: float = 0.0,
        style_loss: str = "gram",
        preserve_color: str = "none",
    ) -> None:
        super().__init__()
        self.extractor = extractor
        self.content_layers, self.style_layers = list(content_layers), list(style_layers)
        self.style_layer_weights = dict(zip(self.style_layers, map(float, style_layer_weights), strict=True))
        self.weights = {"content": content_weight, "style": style_weight, "tv": tv_weight}
        self.style_loss, self.preserve_color = style_loss, preserve_color
        self.content_targets = nn.ModuleDict()
        self.style_targets = nn.ModuleDict()
        self.register_buffer("content_image", None)  # the chroma of a luminance-only run's output
        # The temporal term of a video frame (see set_temporal): off (None) for a still image.
        self.register_buffer("temporal_target", None)
        self.register_buffer("temporal_mask", None)
        self.temporal_weight = 0.0
        self.group_weights: list[float] = []
        # The largest mean activation of a layer in use: what a message about an overflow can point to.
        self.activation_scale: tuple[float, str] = (0.0, "")
        self._style_key: tuple[Any, ...] | None = None  # what the style targets were computed from
        self.tiling: Tiling | None = None
        """Run the network over tiles (tiling.py), or over the whole image (None)."""

    def prepare(self, inputs: Inputs) -> tuple[Tensor, list[Tensor]]:
        """The content and style images as the optimisation sees them (colour control, Gatys et al. 2017):
        ``histogram`` recolours the styles to the content's colours; ``luminance`` compares luminance
        only (grey images, the styles' luminance matched to the content's)."""
        content, styles = inputs.content, inputs.styles
        if self.preserve_color == "histogram":
            styles = [match_color(style, content) for style in styles]
        elif self.preserve_color == "luminance":
            content_y = luminance(content)
            styles = [grey_rgb(match_luminance(luminance(style), content_y)) for style in styles]
            content = grey_rgb(content_y)
        return content, styles

    def set_targets(self, inputs: Inputs, device: torch.device | str = "cpu") -> None:
        """Computes the content activations and style statistics once, as buffers (call it under no_grad).

        Without masks the style images' statistics are blended (weights summing to 1) into one
        target per layer. With masks each style gets its own target, compared with the statistics
        of its region; its weight is its blend weight times the number of styles (1 for equal
        blends), so each region gets the full style weight. The style targets stay as they are when the style
        images (as prepared), blend, masks and content size are those of the last call (a video's next frame).
        """
        content, styles = self.prepare(inputs)
        content, styles = content.to(device), [style.to(device) for style in styles]
        if self.tiling is None:
            content_features = self.extractor(content)
            self.activation_scale = max((float(f.clamp(min=0).mean()), layer) for layer, f in content_features.items())
            shapes = {layer: tuple(f.shape[-2:]) for layer, f in content_features.items()}
        else:  # the network over tiles (see tiling.py): the same targets, by parts
            content_features, shapes, self.activation_scale = tiled_maps(
                self.extractor, content, self.content_layers, self.tiling.tile
            )
        self.content_image = inputs.content.to(device)
        self.content_targets = nn.ModuleDict(
            {layer: ContentTarget(content_features[layer]) for layer in self.content_layers}
        )
        masks = None if inputs.masks is None else [mask.to(device) for mask in inputs.masks]
        key = (tuple(content.shape), styles, list(inputs.blend), masks)
        if _same_key(self._style_key, key):  # the same style images (a video's next frame): the targets stay
            return
        self._style_key = key
        if self.tiling is None:
            style_statistics = [
                {layer: image_statistics(self.style_loss, f[layer]) for layer in self.style_layers}
                for f in map(self.extractor, styles)
            ]
        else:
            style_statistics = [
                tiled_statistics(self.extractor, style, self.style_layers, self.style_loss, self.tiling.tile)
                for style in styles
            ]
        target_class = STYLE_TARGETS[self.style_loss]
        if inputs.masks is None:
            groups = [(style_statistics, inputs.blend, None)]
            self.group_weights = [1.0]
        else:
            groups = [([stats], [1.0], mask) for stats, mask in zip(style_statistics, masks, strict=True)]
            self.group_weights = [w * len(inputs.blend) for w in inputs.blend]
        self.style_targets = nn.ModuleDict(
            {
                layer: nn.ModuleList(
                    target_class([s[layer] for s in stats], blend, resize_mask(mask, shapes[layer]))
                    for stats, blend, mask in groups
                )
                for layer in self.style_layers
            }
        )

    def evaluate(
        self,
        image: Tensor,
        backward: Callable[[Tensor], None],
        context: Callable[[], AbstractContextManager] = nullcontext,
    ) -> dict[str, Tensor]:
        """The losses of ``image`` (as :meth:`forward`, its passes under ``context``), their gradient taken through
        ``backward``: of the total, or tile by tile where :attr:`tiling` is set (see tiling.py)."""
        if self.tiling is not None:
            return evaluate_tiled(self, image, self.tiling, backward, context=context)
        with context():
            losses = self(image)
        backward(losses["total"])
        return losses

    def set_temporal(self, warped: Tensor | None, mask: Tensor | None = None, weight: float = 0.0) -> None:
        """Turns the temporal term of Ruder et al. (2016) on for the next optimisation: ``weight`` times
        :func:`~nst_lightning.core.losses.temporal_loss` against ``warped`` (1, 3, H, W: the previous stylised
        frame warped into this frame, in [0, 1]) where ``mask`` (1, 1, H, W) trusts the flow. ``warped``
        None turns it off: then the losses are exactly those of a still image (no ``temporal`` key)."""
        if warped is None or weight <= 0:
            self.temporal_target = self.temporal_mask = None
            self.temporal_weight = 0.0
            return
        if mask is None:
            mask = torch.ones_like(warped[:, :1])
        # A luminance-only run optimises one channel: it is compared with the warped frame's luminance.
        self.temporal_target = luminance(warped) if self.preserve_color == "luminance" else warped
        self.temporal_mask = mask
        self.temporal_weight = float(weight)

    def initial_image(self, inputs: Inputs, init: str, seed: int = 0, image: Tensor | None = None) -> Tensor:
        """The image the optimisation starts from: the (prepared) ``content``, the first ``style``, ``noise``
        (uniform, from ``seed``) or ``image`` (an init file's pixels), resized to the content's size. With
        ``preserve_color: luminance`` a one-channel luminance image (the network sees it as grey RGB, and
        :meth:`to_rgb` gives it the content's chroma)."""
        content, styles = self.prepare(inputs)
        if init == "content":
            start = content.clone()
        elif init == "noise":
            start = torch.rand(content.shape, generator=torch.Generator().manual_seed(seed))
        else:
            start = styles[0] if init == "style" else image
            start = F.interpolate(
                start, size=content.shape[-2:], mode="bicubic", antialias=True, align_corners=False
            ).clamp_(0, 1)
        return luminance(start) if self.preserve_color == "luminance" else start

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        """The weighted losses of ``image`` against the targets: total, content, style, style per
        layer (before the layer weight) and tv. All float32."""
        features = self.extractor(image)
        zero = image.new_zeros((), dtype=torch.float32)
        losses: dict[str, Tensor] = {}
        content = zero
        for layer, target in self.content_targets.items():
            content = content + target(features[layer])
        if self.content_layers:
            content = content / len(self.content_layers)
        style = zero
        for layer, targets in self.style_targets.items():
            term = sum(w * target(features[layer]) for w, target in zip(self.group_weights, targets, strict=True))
            losses[f"style_{layer}"] = term.detach()
            style = style + self.style_layer_weights[layer] * term
        tv = total_variation(image) if self.weights["tv"] > 0 else zero
        total = self.weights["content"] * content + self.weights["style"] * style + self.weights["tv"] * tv
        if self.temporal_target is not None:  # a video frame after the first (set_temporal)
            temporal = temporal_loss(image, self.temporal_target, self.temporal_mask)
            total = total + self.temporal_weight * temporal
            losses["temporal"] = temporal.detach()
        losses.update(total=total, content=content.detach(), style=style.detach(), tv=tv.detach())
        return losses

    def to_rgb(self, image: Tensor) -> Tensor:
        """An optimised image as RGB in [0, 1] (with ``preserve_color: luminance``, the luminance combined
        with the content's chroma)."""
        image = image.detach().float()
        if image.shape[1] == 1:
            image = combine_luminance(image, self.content_image)
        return image.clamp(0, 1)


def _same_key(before: Any, now: Any) -> bool:
    """Whether two records of style inputs (tensors, numbers, lists and tuples of them) hold the same values."""
    if isinstance(now, Tensor):
        return (
            isinstance(before, Tensor)
            and before.device == now.device
            and before.dtype == now.dtype
            and before.shape == now.shape
            and bool(torch.equal(before, now))
        )
    if isinstance(now, (list, tuple)):
        return (
            isinstance(before, (list, tuple))
            and len(before) == len(now)
            and all(_same_key(a, b) for a, b in zip(before, now, strict=True))
        )
    return before == now
