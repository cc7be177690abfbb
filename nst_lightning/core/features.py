"""The frozen feature extractor: a backbone cut after its deepest layer in use, returning ``{layer_name: activation}``.

The ImageNet input normalisation lives inside as buffers, so the rest of the code feeds images in
[0, 1]. The network is *normalised* as Gatys et al.'s was (each layer's mean activation over a fixed
set of images is 1), so that one set of loss weights means the same for torchvision's weights and for
Caffe-converted ones, whose activations are some 100 times larger.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from nst_lightning.core.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    backbone_spec,
    check_layers,
    hub_cache_file,
    load_backbone,
    resolve_backbone,
)
from nst_lightning.core.color import grey_rgb
from nst_lightning.errors import ConfigError, ImageError, WeightsError
from nst_lightning.io import cache
from nst_lightning.io.files import file_stamp
from nst_lightning.names import AUTO, POOLINGS, Pooling

# The images on which a network's mean activations are measured: the shipped sample photographs,
# longest side CALIBRATION_SIZE pixels. Changing either changes every normalised network (and so every result).
CALIBRATION_IMAGES = Path(__file__).resolve().parent.parent / "samples"
CALIBRATION_SIZE = 256
# Measured means are kept to this many significant digits: what a saved config records, and the
# same on every machine (a float32 sum's last bits are not).
_MEAN_DIGITS = 4


def calibration_images() -> list[Tensor]:
    """The images on which mean activations are measured: the shipped sample JPEGs, longest side
    :data:`CALIBRATION_SIZE`, as (1, 3, H, W) tensors in [0, 1]."""
    from nst_lightning.io.image_io import load_images  # Pillow, loaded only where the means are measured

    try:
        return load_images(CALIBRATION_IMAGES / "*.jpg", CALIBRATION_SIZE)
    except ImageError as err:
        raise WeightsError(f"the calibration images in {CALIBRATION_IMAGES} are missing ({err}): reinstall") from None


def _anchors(names: Sequence[str], layers: Sequence[nn.Module]) -> dict[str, str]:
    """For each layer, the layer whose mean activation it is divided by in the normalised network.

    A ReLU right after a convolution shares the convolution's factor (the mean of its rectified
    output: Gatys et al. normalised rectified outputs), and pooling passes its input's scale on;
    every other layer (a convolution, a ResNet block) has a factor of its own.
    """
    anchors: dict[str, str] = {}
    for position, (name, layer) in enumerate(zip(names, layers, strict=True)):
        before = layers[position - 1] if position else None
        if (isinstance(layer, nn.ReLU) and isinstance(before, nn.Conv2d)) or (
            isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)) and before is not None
        ):
            anchors[name] = anchors[names[position - 1]]
        else:
            anchors[name] = name
    return anchors


def measure_means(body: nn.Sequential, images: Iterable[Tensor]) -> dict[str, float]:
    """The mean rectified activation ``mean(relu(a))`` of every layer of ``body`` over ``images``
    (each image weighs the same), to :data:`_MEAN_DIGITS` significant digits."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    sums: dict[str, float] = {}
    count = 0
    body.eval()  # batch normalisation must use (and keep) its running statistics
    with torch.no_grad():
        for image in images:
            x = (image.float() - mean) / std
            for name, layer in body.named_children():
                x = layer(x)
                sums[name] = sums.get(name, 0.0) + float(x.clamp(min=0).mean(dtype=torch.float64))
            count += 1
    return {name: float(f"{total / count:.{_MEAN_DIGITS}g}") for name, total in sums.items()}


# Means measured in this process, by network (a process that runs many times, such as a batch or the
# tests, measures each network once); across processes they are kept in the user's cache (nst_lightning.io.cache).
_MEASURED: dict[tuple, dict[str, float]] = {}


def _measured_means(body: nn.Sequential, backbone: str, weights: str | None, pooling: str, deepest: str) -> dict:
    key = (backbone, weights, file_stamp(weights), pooling, deepest)
    if key not in _MEASURED:
        hub_file = hub_cache_file(backbone) if weights == "imagenet" else None
        identity = cache.weights_identity(weights, hub_file)
        stored = (
            None
            if identity is None
            else cache.means_key(backbone, identity, pooling, deepest, CALIBRATION_IMAGES, CALIBRATION_SIZE)
        )
        means = cache.load_means(stored) if stored is not None else None
        if means is None:
            means = measure_means(body, calibration_images())
            if stored is not None:
                cache.store_means(stored, means)
        _MEASURED[key] = means
    return _MEASURED[key]


def _truncated(
    features: nn.Sequential, names: Sequence[str], deepest: str, pooling: str, wanted: Sequence[str]
) -> nn.Sequential:
    """The layers of ``features`` up to ``deepest``, under their ``names``, with the chosen pooling; a
    ReLU after a layer in ``wanted`` works out of place (it would overwrite an output we return)."""
    body: OrderedDict[str, nn.Module] = OrderedDict()
    for position, (name, layer) in enumerate(zip(names[: names.index(deepest) + 1], features, strict=False)):
        if isinstance(layer, nn.MaxPool2d) and pooling == "avg":
            layer = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
        elif isinstance(layer, nn.ReLU):
            layer = nn.ReLU(inplace=names[position - 1] not in wanted)
        body[name] = layer
    return nn.Sequential(body)


class FeatureExtractor(nn.Module):
    """A frozen backbone that maps an RGB image in [0, 1] to ``{layer_name: activation}``.

    Args:
        layers: names of the layers whose activations are returned (``conv4_2``, ``relu3_1``...).
        backbone: one of :data:`~nst_lightning.core.backbones.BACKBONES`, or ``auto``: the backbone of the weights
            file, vgg19 with ``imagenet`` or ``random`` weights (a name the file contradicts is refused).
        weights: ``imagenet``, ``random`` or the path of a torchvision state dict; None builds the network
            without weights (under ``torch.device("meta")``: its shapes alone, as the memory estimate uses it).
        pooling: ``max`` (as the network was trained) or ``avg`` (as Gatys et al. recommend).
        channels_last: run the network in the channels-last memory layout (faster convolutions on
            CPUs and on GPUs with tensor cores; the returned activations are channels-last too). The
            input image may be in any layout: it is converted here, never in place.
        normalize: divide each layer's activations by its mean (rectified) activation over the
            calibration images, as Gatys et al. normalised their VGG. For a VGG the factors are
            folded into the convolutions' weights (free at run time); other backbones divide the
            returned activations.
        layer_means: the means to normalise with, by layer name (see :attr:`layer_means`); None
            measures them on :func:`calibration_images`, once per weights file (kept in the user's
            cache: :mod:`nst_lightning.io.cache`).
    """

    def __init__(
        self,
        layers: Sequence[str],
        backbone: str = AUTO,
        weights: str | None = "imagenet",
        pooling: Pooling = "max",
        channels_last: bool = True,
        normalize: bool = False,
        layer_means: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {pooling!r}: choose {' or '.join(map(repr, POOLINGS))}")
        wanted = list(dict.fromkeys(layers))
        backbone = resolve_backbone(backbone, weights)
        check_layers(backbone, wanted)  # before the weights load: a typo costs nothing
        spec = backbone_spec(backbone)
        features = spec.build() if weights is None else load_backbone(backbone, weights)
        names = spec.names(features)
        deepest = names[max(names.index(name) for name in wanted)]
        self.body = _truncated(features, names, deepest, pooling, wanted)
        self.deepest = deepest
        """The deepest layer in use: where the network is cut."""
        self.layers = tuple(wanted)
        self.backbone = backbone
        self.layer_means: dict[str, float] | None = None
        """The mean activation each layer was divided by (None when not normalised)."""
        self.register_buffer("divisors", None, persistent=False)
        if normalize:
            if layer_means is None:
                layer_means = _measured_means(self.body, backbone, weights, pooling, deepest)
            self._normalize(dict(layer_means), weights)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # Weights in the activations' layout: otherwise every convolution converts them on every call.
        self.body.to(memory_format=self.memory_format)
        # Departure from the paper: Caffe's VGG took BGR input in [0, 255] minus the mean;
        # torchvision's weights take RGB in [0, 1] normalised by the ImageNet mean and std.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.min_image_side = self._downsampling()
        """The shortest image side (pixels) for which every requested layer is at least 1x1."""

    def _normalize(self, means: dict[str, float], weights: str) -> None:
        """Rescales the network so that each layer's mean activation is 1 (see ``normalize``)."""
        names = [name for name, _ in self.body.named_children()]
        layers = list(self.body)
        anchors = _anchors(names, layers)
        foldable = all(isinstance(layer, (nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.AvgPool2d)) for layer in layers)
        # What is recorded: every convolution (VGG) or every returned layer's anchor (other backbones).
        needed = sorted({anchors[name] for name in (names if foldable else self.layers)}, key=names.index)
        missing = [name for name in needed if name not in means]
        if missing:
            raise ConfigError(
                f"model.layer_means has no value for {', '.join(missing)}: remove model.layer_means to measure "
                "them again (or give every layer's mean)"
            )
        bad = [name for name in needed if not (math.isfinite(means[name]) and means[name] > 0)]
        if bad:
            raise WeightsError(
                f"the network from {weights} has no positive mean activation at {', '.join(bad)} on the "
                "calibration images, so it cannot be normalised: check the weights file, or set "
                "model.normalize false"
            )
        self.layer_means = {name: means[name] for name in needed}
        if not foldable:  # ReLU and pooling are positively homogeneous; a residual block is not
            self.divisors = torch.tensor([self.layer_means[anchors[name]] for name in self.layers])
            return
        scale_in = 1.0
        with torch.no_grad():
            for name, layer in zip(names, layers, strict=True):
                if isinstance(layer, nn.Conv2d):
                    scale_out = self.layer_means[name]
                    # conv(x / s_in) * (s_in / s_out) + b / s_out = conv(x) / s_out
                    layer.weight.mul_(scale_in / scale_out)
                    if layer.bias is not None:
                        layer.bias.div_(scale_out)
                    scale_in = scale_out

    def check_image_size(self, size: tuple[int, int], which: str = "content") -> None:
        """An image of (width, height) ``size`` must give every layer in use at least one pixel."""
        width, height = size
        if min(height, width) < self.min_image_side:
            raise ConfigError(
                f"the {which} image is {width}x{height} px after resizing, too small for layer {self.deepest}: "
                f"its shorter side must be at least {self.min_image_side} px; raise data.image_size (or model.scales, "
                "data.style_scale), use shallower layers, or crop a very elongated image closer to a square"
            )

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode: the extractor is frozen."""
        return super().train(False)

    def _downsampling(self, probe: int = 64) -> int:
        """How many input pixels one pixel of the deepest layer spans (measured on a probe image)."""
        with torch.no_grad():
            out = self.body(torch.zeros(1, 3, probe, probe))
        return max(1, math.ceil(probe / out.shape[-1]))

    def run(self, x: Tensor, after: str | None = None, through: str | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The layers after ``after`` (None: from the image in [0, 1], RGB or one grey channel, normalised here)
        through ``through`` (None: the deepest) over ``x``: the last one's output and the requested layers'
        activations among them, undivided (a VGG's divisors are folded in: the network in parts, for tiling.py)."""
        if after is None:
            x = grey_rgb(x) if x.shape[1] == 1 else x  # a luminance-only run's image (model.preserve_color)
            x = ((x - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        out: dict[str, Tensor] = {}
        started = after is None
        for name, layer in self.body.named_children():
            if started:
                x = layer(x)
                if name in self.layers:
                    out[name] = x
            started = started or name == after
            if name == through:
                break
        return x, out

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        _, out = self.run(image)
        if self.divisors is not None:
            out = {name: out[name] / divisor for name, divisor in zip(self.layers, self.divisors.tolist(), strict=True)}
        return out
