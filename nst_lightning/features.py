"""The frozen feature extractor: a torchvision backbone that returns ``{layer_name: activation}``.

Layer names (``conv1_1``, ``relu1_1``, ``pool1``, ...) are derived by walking the network, the
network is cut after the deepest layer in use, and the ImageNet input normalisation lives inside as
buffers, so the rest of the code feeds images in [0, 1]. The network is *normalised* as Gatys et al.'s
was (each layer's mean activation over a fixed set of images is 1), so that one set of loss weights
means the same for torchvision's weights and for Caffe-converted ones, whose activations are some
100 times larger.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, VGG16_Weights, VGG19_Weights, resnet, vgg

from nst_lightning.errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The images on which a network's mean activations are measured: the shipped samples, longest side
# CALIBRATION_SIZE pixels. Changing either changes every normalised network (and so every result).
CALIBRATION_IMAGES = Path(__file__).resolve().parent / "samples"
CALIBRATION_SIZE = 256
# Measured means are kept to this many significant digits: what a saved config records, and the
# same on every machine (a float32 sum's last bits are not).
_MEAN_DIGITS = 4


@dataclass(frozen=True)
class Backbone:
    """How to build one backbone.

    ``build`` returns an un-initialised ``nn.Sequential`` of the feature layers; ``names`` names its
    children; ``prefix`` is what those layers' keys start with in a whole-model torchvision state
    dict, and ``head`` the prefixes of the classifier keys that the extractor ignores.
    """

    build: Callable[[], nn.Sequential]
    names: Callable[[nn.Sequential], list[str]]
    weights: object  # a torchvision WeightsEnum member
    prefix: str
    head: tuple[str, ...]


def _vgg(cfg: str) -> Callable[[], nn.Sequential]:
    return lambda: vgg.make_layers(vgg.cfgs[cfg], batch_norm=False)


def _resnet18() -> nn.Sequential:
    model = resnet.resnet18()
    # Everything before the global pooling, under torchvision's own child names.
    return nn.Sequential(
        OrderedDict((name, child) for name, child in model.named_children() if name not in ("avgpool", "fc"))
    )


def _child_names(sequential: nn.Sequential) -> list[str]:
    return [name for name, _ in sequential.named_children()]


# Adding a backbone: one entry here.
BACKBONES: dict[str, Backbone] = {
    "vgg19": Backbone(
        _vgg("E"), lambda seq: layer_names(seq), VGG19_Weights.IMAGENET1K_V1, "features.", ("classifier.",)
    ),
    "vgg16": Backbone(
        _vgg("D"), lambda seq: layer_names(seq), VGG16_Weights.IMAGENET1K_V1, "features.", ("classifier.",)
    ),
    # Layers: conv1, bn1, relu, maxpool, layer1 ... layer4 (torchvision's names).
    "resnet18": Backbone(_resnet18, _child_names, ResNet18_Weights.IMAGENET1K_V1, "", ("fc.",)),
}


def layer_names(layers: Iterable[nn.Module]) -> list[str]:
    """Caffe-style names for a VGG-like stack: ``conv{block}_{i}``, ``relu{block}_{i}``, ``pool{block}``."""
    names, block, index = [], 1, 1
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            names.append(f"conv{block}_{index}")
        elif isinstance(layer, nn.ReLU):
            names.append(f"relu{block}_{index}")
            index += 1
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            raise TypeError(f"cannot name layer {layer!r}: only Conv2d, ReLU and pooling are known")
    return names


def hub_cache_file(backbone: str) -> Path:
    """Where torch.hub keeps (or would keep) the ImageNet weights of ``backbone``."""
    url = BACKBONES[backbone].weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def _imagenet_state_dict(backbone: str) -> dict:
    weights = BACKBONES[backbone].weights
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        raise WeightsError(
            f"cannot get the ImageNet weights of {backbone} ({err}); offline, download {weights.url} "
            f"elsewhere and pass --model.weights /path/to/{Path(urlparse(weights.url).path).name} "
            f"or place it at {hub_cache_file(backbone)}"
        ) from None


def _file_state_dict(path: str) -> dict:
    from nst_lightning.image_io import file_kind  # the filesystem checks live there

    file = Path(path)
    kind = file_kind(file)  # from stat alone: a FIFO would block torch.load, /dev/zero never end
    if kind != "file":
        what = "weights file not found: " if kind == "missing" else ""
        found = "" if kind == "missing" else f" is {kind}, not a weights file"
        raise WeightsError(
            f"{what}{file}{found} (model.weights takes 'imagenet', 'random' or the path of a torchvision state dict)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in first:  # torch goes on to suggest weights_only=False: no
            first = "it is not a torch file, or it holds objects other than tensors"
        raise WeightsError(
            f"cannot load weights file {file}: {first} (it must be a torch state dict saved with torch.save)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{file} does not hold a state dict (a mapping of parameter names to tensors)")
    # NaN or Inf in the weights would only show as a non-finite loss at the first step.
    damaged = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise WeightsError(
            f"weights file {file} holds NaN or infinite values (in {damaged[0]}{more}): the file is damaged; "
            "get the weights again"
        )
    return state


def load_backbone(backbone: str, weights: str = "imagenet") -> nn.Sequential:
    """Build ``backbone`` and load its weights: ``imagenet``, ``random`` or a file path.

    A file holds a torchvision state dict of the whole model (``features.0.weight``, ...) or of its
    ``features`` alone (``0.weight``, ...); it is read with ``weights_only=True``.
    """
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    spec = BACKBONES[backbone]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights are the same in every run
        features = spec.build()
    if weights == "random":
        warnings.warn(
            "model.weights is 'random': the extractor is untrained, so the output is no stylisation "
            "(use this for tests and dry runs only)",
            stacklevel=2,
        )
        return features
    state = _imagenet_state_dict(backbone) if weights == "imagenet" else _file_state_dict(weights)
    state = {k: v for k, v in state.items() if not k.startswith(spec.head)}
    if spec.prefix and any(key.startswith(spec.prefix) for key in state):
        state = {k[len(spec.prefix) :]: v for k, v in state.items() if k.startswith(spec.prefix)}
    try:
        features.load_state_dict(state, strict=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise WeightsError(
            f"the weights in {weights} do not fit {backbone}: {detail[:300]} (is it a {backbone} state dict?)"
        ) from None
    return features


def calibration_images() -> list[Tensor]:
    """The images on which mean activations are measured: the shipped sample JPEGs, longest side
    :data:`CALIBRATION_SIZE`, as (1, 3, H, W) tensors in [0, 1]."""
    from nst_lightning.image_io import load_image  # Pillow lives there

    files = sorted(CALIBRATION_IMAGES.glob("*.jpg"))
    if not files:
        raise WeightsError(f"no calibration images in {CALIBRATION_IMAGES}: reinstall nst-lightning")
    return [load_image(path, CALIBRATION_SIZE) for path in files]


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
# tests, measures each network once).
_MEASURED: dict[tuple, dict[str, float]] = {}


def _measured_means(body: nn.Sequential, key: tuple) -> dict[str, float]:
    if key not in _MEASURED:
        _MEASURED[key] = measure_means(body, calibration_images())
    return _MEASURED[key]


def _file_stamp(weights: str) -> object:
    try:
        stat = os.stat(weights)
    except OSError:
        return None
    return (stat.st_size, stat.st_mtime_ns)


def _truncated(
    features: nn.Sequential, backbone: str, deepest: str, pooling: str, wanted: Sequence[str]
) -> nn.Sequential:
    """The layers of ``features`` up to ``deepest``, under their names, with the chosen pooling; a
    ReLU after a layer in ``wanted`` works out of place (it would overwrite an output we return)."""
    names = BACKBONES[backbone].names(features)
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
        backbone: one of :data:`BACKBONES`.
        weights: ``imagenet``, ``random`` or the path of a torchvision state dict.
        pooling: ``max`` (as the network was trained) or ``avg`` (as Gatys et al. recommend).
        channels_last: run the network in the channels-last memory layout (faster convolutions on
            CPUs and on GPUs with tensor cores; the returned activations are channels-last too). The
            input image may be in any layout: it is converted here, never in place.
        normalize: divide each layer's activations by its mean (rectified) activation over the
            calibration images, as Gatys et al. normalised their VGG. For a VGG the factors are
            folded into the convolutions' weights (free at run time); other backbones divide the
            returned activations.
        layer_means: the means to normalise with, by layer name (see :attr:`layer_means`); None
            measures them on :func:`calibration_images`.
    """

    def __init__(
        self,
        layers: Sequence[str],
        backbone: str = "vgg19",
        weights: str = "imagenet",
        pooling: str = "max",
        channels_last: bool = True,
        normalize: bool = False,
        layer_means: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__()
        if pooling not in ("max", "avg"):
            raise ConfigError(f"unknown pooling {pooling!r}: choose 'max' or 'avg'")
        wanted = list(dict.fromkeys(layers))
        if not wanted:
            raise ConfigError("no layers requested: give at least one content or style layer")
        if backbone in BACKBONES:  # names from a weightless copy: a typo is caught before weights load
            with torch.device("meta"):
                names = BACKBONES[backbone].names(BACKBONES[backbone].build())
            unknown = [name for name in wanted if name not in names]
            if unknown:
                raise ConfigError(
                    f"unknown layer name(s) {', '.join(unknown)} for {backbone}: choose from {', '.join(names)}"
                )
        features = load_backbone(backbone, weights)
        names = BACKBONES[backbone].names(features)
        deepest = names[max(names.index(name) for name in wanted)]
        self.body = _truncated(features, backbone, deepest, pooling, wanted)
        self.layers = tuple(wanted)
        self.backbone = backbone
        self.layer_means: dict[str, float] | None = None
        """The mean activation each layer was divided by (None when not normalised)."""
        self.register_buffer("divisors", None, persistent=False)
        if normalize:
            if layer_means is None:
                key = (backbone, weights, _file_stamp(weights), pooling, deepest)
                layer_means = _measured_means(self.body, key)
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

    def train(self, mode: bool = True) -> FeatureExtractor:
        """Always stays in eval mode: the extractor is frozen."""
        return super().train(False)

    def _downsampling(self, probe: int = 64) -> int:
        """How many input pixels one pixel of the deepest layer spans (measured on a probe image)."""
        with torch.no_grad():
            out = self.body(torch.zeros(1, 3, probe, probe))
        return max(1, math.ceil(probe / out.shape[-1]))

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        x = ((image - self.mean) / self.std).contiguous(memory_format=self.memory_format)
        out: dict[str, Tensor] = {}
        for name, layer in self.body.named_children():
            x = layer(x)
            if name in self.layers:
                out[name] = x
        if self.divisors is not None:
            out = {name: out[name] / divisor for name, divisor in zip(self.layers, self.divisors.tolist(), strict=True)}
        return out
