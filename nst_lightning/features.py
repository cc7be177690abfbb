"""The frozen feature extractor: a torchvision backbone that returns ``{layer_name: activation}``.

Layer names (``conv1_1``, ``relu1_1``, ``pool1``, ...) are derived by walking the network, the
network is cut after the deepest layer in use, and the ImageNet input normalisation lives inside as
buffers, so the rest of the code feeds images in [0, 1].
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn
from torchvision.models import ResNet18_Weights, VGG16_Weights, VGG19_Weights, resnet, vgg

from nst_lightning.errors import ConfigError, WeightsError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """

    def __init__(
        self,
        layers: Sequence[str],
        backbone: str = "vgg19",
        weights: str = "imagenet",
        pooling: str = "max",
        channels_last: bool = True,
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
        deepest = max(names.index(name) for name in wanted)
        body: OrderedDict[str, nn.Module] = OrderedDict()
        for position, (name, layer) in enumerate(zip(names[: deepest + 1], features, strict=False)):
            if isinstance(layer, nn.MaxPool2d) and pooling == "avg":
                layer = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding, ceil_mode=layer.ceil_mode)
            elif isinstance(layer, nn.ReLU):
                # In-place ReLU would overwrite a convolution output that we return.
                layer = nn.ReLU(inplace=names[position - 1] not in wanted)
            body[name] = layer
        self.body = nn.Sequential(body)
        self.layers = tuple(wanted)
        self.backbone = backbone
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
        return out
