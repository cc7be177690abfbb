"""The backbones: which torchvision networks can extract features, their layers' names, and their weights
(ImageNet through the torch hub cache, a state-dict file, or random)."""

from __future__ import annotations

import functools
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, VGG16_Weights, VGG19_Weights, resnet, vgg

from nst_lightning.core.weight_files import LABELS, Layout, read_state_dict, recognise
from nst_lightning.errors import ConfigError, WeightsError
from nst_lightning.io.files import file_kind, file_stamp
from nst_lightning.names import AUTO

"""``model.backbone``'s default: the backbone of the weights file, or :data:`DEFAULT_BACKBONE` without one."""
DEFAULT_BACKBONE = "vgg19"
"""The backbone for ``imagenet`` and ``random`` weights when ``model.backbone`` is ``auto`` (the seed's)."""

# The input normalisation of torchvision's ImageNet weights (RGB in [0, 1]).
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


# Adding a backbone: one entry here.
BACKBONES: dict[str, Backbone] = {
    "vgg19": Backbone(_vgg("E"), layer_names, VGG19_Weights.IMAGENET1K_V1, "features.", ("classifier.",)),
    "vgg16": Backbone(_vgg("D"), layer_names, VGG16_Weights.IMAGENET1K_V1, "features.", ("classifier.",)),
    # Layers: conv1, bn1, relu, maxpool, layer1 ... layer4 (torchvision's names).
    "resnet18": Backbone(_resnet18, _child_names, ResNet18_Weights.IMAGENET1K_V1, "", ("fc.",)),
}


def backbone_spec(backbone: str) -> Backbone:
    """The entry of :data:`BACKBONES` for ``backbone``; the one check of a backbone's name."""
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[backbone]


@functools.cache
def backbone_layers(backbone: str) -> tuple[str, ...]:
    """The names of ``backbone``'s layers, from a weightless copy (the meta device: nothing allocated)."""
    spec = backbone_spec(backbone)
    with torch.device("meta"):
        return tuple(spec.names(spec.build()))


def check_layers(backbone: str, layers: Sequence[str]) -> None:
    """The one check of layer names: at least one, each a layer of ``backbone`` (before any weights load)."""
    if not layers:
        raise ConfigError("no layers requested: give at least one content or style layer")
    names = backbone_layers(backbone)
    unknown = [name for name in dict.fromkeys(layers) if name not in names]
    if unknown:
        raise ConfigError(f"unknown layer name(s) {', '.join(unknown)} for {backbone}: choose from {', '.join(names)}")


def hub_cache_file(backbone: str) -> Path:
    """Where torch.hub keeps (or would keep) the ImageNet weights of ``backbone``."""
    url = BACKBONES[backbone].weights.url
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


# Cached files already checked in this process, by (path, size, modification time): a batch loads the
# weights once per pair, and hashing 548 MB takes a second or two.
_VERIFIED: set[tuple[str, int, int]] = set()


def check_cached_hash(path: Path) -> None:
    """torchvision checks the SHA-256 prefix in a weights file's name (``vgg19-dcbb9e9d.pth``) when it downloads
    the file, but not when it finds it in the hub cache: there, any file of that name would be taken (a
    truncated download, random weights). This is that check, for the cached file."""
    prefix = path.stem.rpartition("-")[2]
    stamp = file_stamp(path) if file_kind(path) == "file" else None
    if stamp is None or not prefix or (str(path), *stamp) in _VERIFIED:
        return
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    if not digest.hexdigest().startswith(prefix):
        raise WeightsError(
            f"the cached weights {path} are not torchvision's: their SHA-256 starts with {digest.hexdigest()[:8]}, "
            f"not {prefix} (a damaged download or another file under that name): delete the file to download it "
            "again, or pass a weights file you trust with --model.weights"
        )
    _VERIFIED.add((str(path), *stamp))


def _imagenet_state_dict(backbone: str) -> dict:
    weights = BACKBONES[backbone].weights
    check_cached_hash(hub_cache_file(backbone))
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad hash a RuntimeError
        raise WeightsError(
            f"cannot get the ImageNet weights of {backbone} ({err}); offline, download {weights.url} "
            f"elsewhere and pass --model.weights /path/to/{Path(urlparse(weights.url).path).name} "
            f"or place it at {hub_cache_file(backbone)}"
        ) from None


def load_backbone(backbone: str, weights: str = "imagenet") -> nn.Sequential:
    """Build ``backbone`` and load its weights: ``imagenet``, ``random`` or a file path.

    A file is read with ``weights_only=True`` and must be a state dict of ``backbone``, in any layout that
    :func:`~nst_lightning.core.weight_files.recognise` knows (torchvision's whole model or ``features`` alone,
    Caffe-style ``conv1_1`` names, any common prefix).
    """
    spec = backbone_spec(backbone)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random weights are the same in every run
            features = spec.build()
        warnings.warn(
            "model.weights is 'random': the extractor is untrained, so the output is no stylisation "
            "(use this for tests and dry runs only)",
            stacklevel=2,
        )
        return features
    if weights == "imagenet":
        state = {k: v for k, v in _imagenet_state_dict(backbone).items() if not k.startswith(spec.head)}
        if spec.prefix and any(key.startswith(spec.prefix) for key in state):
            state = {k[len(spec.prefix) :]: v for k, v in state.items() if k.startswith(spec.prefix)}
    else:
        found, state = recognise(read_state_dict(weights), str(weights), layouts())
        if found != backbone:
            raise mismatch(backbone, found, str(weights))
    # Built without storage (the meta device) and given the file's tensors: a random initialisation that the
    # weights replace cost 0.2-0.4 s at every start. Floating-point weights come in as float32, as before.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    with torch.device("meta"):
        features = spec.build()
    try:
        features.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as err:
        detail = " ".join(str(err).split())
        raise WeightsError(
            f"the weights in {weights} do not fit {backbone}: {detail[:300]} (is it a {backbone} state dict?)"
        ) from None
    return features


@functools.cache
def layouts() -> dict[str, Layout]:
    """Each backbone's :class:`~nst_lightning.core.weight_files.Layout`, from a weightless copy (the meta device)."""
    found = {}
    for name, spec in BACKBONES.items():
        with torch.device("meta"):
            features = spec.build()
        shapes = {k: tuple(v.shape) for k, v in features.state_dict().items() if not k.endswith("num_batches_tracked")}
        names = spec.names(features) if spec.names is layer_names else None
        indices = {layer: i for i, layer in enumerate(names) if layer.startswith("conv")} if names else None
        found[name] = Layout(shapes, indices)
    return found


_RECOGNISED: dict[tuple[str, int, int], str] = {}


def file_backbone(path: str | Path) -> str:
    """The backbone of the weights file ``path`` (from its keys and shapes: the file is mapped, not read);
    remembered by (path, size, modification time) for the rest of the process."""
    stamp = file_stamp(path)
    key = (str(path), *stamp) if stamp is not None and file_kind(path) == "file" else None
    if key is None or key not in _RECOGNISED:
        backbone, _ = recognise(read_state_dict(path, shapes_only=True), str(path), layouts())
        if key is None:
            return backbone
        _RECOGNISED[key] = backbone
    return _RECOGNISED[key]


def mismatch(backbone: str, found: str, source: str) -> WeightsError:
    """The error for a ``model.backbone`` that the weights file contradicts: one line naming both."""
    return WeightsError(
        f"model.backbone is {backbone} but the weights file {source} holds a {LABELS[found]}: set model.backbone "
        f"to {found} or {AUTO} (the backbone of the file), or give {backbone} weights"
    )


def resolve_backbone(backbone: str, weights: str | None) -> str:
    """The backbone a run builds: ``backbone`` itself, checked against a weights file; for ``auto``, the
    file's backbone, or :data:`DEFAULT_BACKBONE` with ``imagenet`` or ``random`` weights (or none)."""
    if backbone != AUTO and backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}: choose {AUTO} (from the weights), {', '.join(BACKBONES)}")
    if weights is None or str(weights) in ("imagenet", "random"):
        return DEFAULT_BACKBONE if backbone == AUTO else backbone
    found = file_backbone(str(weights))
    if backbone not in (AUTO, found):
        raise mismatch(backbone, found, str(weights))
    return found
