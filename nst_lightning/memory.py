"""How much memory a run needs: an estimate from the image size, the layers and the optimiser, made
before anything is allocated, so that a run that cannot fit is refused with a smaller size to try.

The activations come from a forward pass of the real :class:`~nst_lightning.features.FeatureExtractor`
on the ``meta`` device (shapes only, no memory): every tensor that autograd saves for the backward
pass is counted once (in-place layers share their input's), so truncation, pooling and in-place ReLUs
are whatever the extractor does. Added to them: the gradients in flight during the backward pass, the
optimiser's state (L-BFGS keeps ``2 * history_size`` image-sized vectors), the targets and the
weights, and on a CPU the process's own footprint (Python, torch, Lightning), since resident memory is
what the operating system runs out of. The constants were checked against measured peak RSS at 256
and 512 px (``benchmarks/memory_check.py`` prints the comparison).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from nst_lightning import runtime
from nst_lightning.backbones import backbone_spec
from nst_lightning.checks import CONTENT_LAYERS, LBFGS_HISTORY_SIZE, MIXED_PRECISIONS, STYLE_LAYERS
from nst_lightning.data import ImageSource
from nst_lightning.errors import ConfigError
from nst_lightning.features import FeatureExtractor
from nst_lightning.files import file_bytes

# Resident memory of a process that has imported torch, torchvision and Lightning and runs a Trainer
# (measured: about 690 MiB after the imports with a CUDA build of torch on Linux, whose libraries are
# most of it, and some 60 MiB more once the Trainer runs). Not counted on a GPU.
CPU_RUNTIME_BYTES = 750 * 2**20
# Gradients alive at once during the backward pass, in units of the largest activation: the
# gradient arriving at a layer, the one leaving it, and the sum where two branches meet.
BACKWARD_ACTIVATIONS = 3
# Approximate size of torchvision's ImageNet checkpoints (classifier included), which torch.load
# reads whole.
IMAGENET_FILE_BYTES = {"vgg19": 548 * 2**20, "vgg16": 528 * 2**20}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes, by what holds them. ``total`` is the estimated peak."""

    runtime: int
    weights: int
    weights_loading: int
    activations: int
    backward: int
    optimizer: int
    targets: int

    @property
    def total(self) -> int:
        # Loading the weights (the file's tensors and the whole backbone) happens before the
        # optimisation starts and is freed after it: the peak is the larger of the two phases.
        run = self.weights + self.activations + self.backward + self.optimizer + self.targets
        return self.runtime + max(self.weights_loading, run)

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)} | {"total": self.total}


@functools.lru_cache(maxsize=8)
def _shapes_only(layers: tuple[str, ...], backbone: str, pooling: str) -> FeatureExtractor:
    """The extractor a run builds, without its weights, on the meta device."""
    with torch.device("meta"):
        return FeatureExtractor(layers, backbone, weights=None, pooling=pooling)


@functools.lru_cache(maxsize=8)
def _backbone_parameters(backbone: str) -> int:
    """Parameters of the whole backbone (classifier aside), which exists while its weights load."""
    with torch.device("meta"):
        return sum(p.numel() for p in backbone_spec(backbone).build().parameters())


def saved_activations(extractor: FeatureExtractor, height: int, width: int, activation_bytes: int) -> tuple[int, int]:
    """(bytes autograd saves for the backward pass, elements of the largest of those tensors) in a forward
    pass of ``extractor`` (on the meta device) over a ``height`` x ``width`` image whose gradient is
    wanted, with the activations it returns (which the losses keep). Each tensor counts once;
    floating-point ones at ``activation_bytes`` per element (2 under mixed precision), integer ones (max
    pooling's indices) at their own size; the weights not at all."""
    weights = {id(t) for t in [*extractor.parameters(), *extractor.buffers()]}
    saved: dict[int, torch.Tensor] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in weights:
            saved.setdefault(id(tensor), tensor)
        return tensor

    image = torch.empty(1, 3, height, width, device=extractor.mean.device, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        features = extractor(image)
    for tensor in features.values():  # the losses keep the activations they compare for their own backward
        pack(tensor)
    total = sum(t.numel() * (activation_bytes if t.is_floating_point() else t.element_size()) for t in saved.values())
    largest = max([3 * height * width, *(t.numel() for t in saved.values())])
    return total, largest


def estimate_peak(
    height: int,
    width: int,
    content_layers: Sequence[str] = CONTENT_LAYERS,
    style_layers: Sequence[str] = STYLE_LAYERS,
    *,
    backbone: str = "vgg19",
    pooling: str = "max",
    optimizer: str = "lbfgs",
    history_size: int = LBFGS_HISTORY_SIZE,
    precision: str = "32-true",
    weights: str = "imagenet",
    device: str = "cpu",
) -> MemoryEstimate:
    """The peak memory of a run on a ``height`` x ``width`` image, by component.

    Args:
        height, width: size of the optimised image in pixels.
        content_layers, style_layers: as in :class:`~nst_lightning.StyleTransfer` (the network
            is cut after the deepest).
        backbone, pooling, weights: as in :class:`~nst_lightning.features.FeatureExtractor`.
        optimizer: ``lbfgs`` or ``adam``.
        history_size: L-BFGS memory (``lbfgs_history_size``).
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (activations in 2 bytes).
        device: ``cpu`` (the process's own footprint is added) or ``cuda``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    wanted = tuple(dict.fromkeys([*content_layers, *style_layers]))
    extractor = _shapes_only(wanted, backbone, pooling)
    extractor.check_image_size((width, height))
    act = 2 if precision in MIXED_PRECISIONS else 4
    saved, largest = saved_activations(extractor, height, width, act)
    with torch.no_grad():
        features = extractor(torch.empty(1, 3, height, width, device="meta"))
    if act != 4:  # the losses take float32 copies of half-precision activations
        saved += sum(features[name].numel() * 4 for name in wanted)
    # Targets: activations of a content layer, the Gram matrix of a style layer, and the two images.
    targets = sum(features[name].numel() for name in content_layers)
    targets += sum(features[name].shape[1] ** 2 for name in style_layers)
    pixels = 3 * height * width
    history = history_size if optimizer == "lbfgs" else 0
    # The image, its gradient and the optimiser's vectors: L-BFGS keeps 2 * history past steps plus
    # the flat gradient, the previous one, the direction and a work vector; Adam two moments.
    vectors = 2 + (2 * history + 4 if optimizer == "lbfgs" else 3)
    params = sum(p.numel() for p in extractor.parameters())
    file = IMAGENET_FILE_BYTES.get(backbone, 0) if weights == "imagenet" else 0 if weights == "random" else None
    loading = (_backbone_parameters(backbone) + params) * 4 + (file_bytes(weights) if file is None else file)
    return MemoryEstimate(
        runtime=CPU_RUNTIME_BYTES if device == "cpu" else 0,
        weights=params * 4,
        weights_loading=loading,
        activations=saved,
        backward=BACKWARD_ACTIVATIONS * largest * 4,
        optimizer=vectors * pixels * 4,
        targets=(targets + 2 * pixels) * 4,  # plus the content and style images
    )


def estimate_peak_bytes(height: int, width: int, **kwargs) -> int:
    """The estimated peak memory of a run in bytes (see :func:`estimate_peak` for the arguments)."""
    return estimate_peak(height, width, **kwargs).total


def check_fits(
    height: int,
    width: int,
    *,
    available: int | None = None,
    **kwargs,
) -> MemoryEstimate:
    """Raises :class:`ConfigError` (with the largest image size that would fit) if a run on a
    ``height`` x ``width`` image is estimated not to fit in ``available`` bytes (default: what
    :func:`~nst_lightning.runtime.available_bytes` reports for ``device``). Returns the estimate otherwise.

    On a CPU the estimate includes this process's own footprint, which is already resident, so it is
    subtracted before the comparison with the memory still available.
    """
    device = kwargs.get("device", "cpu")
    estimate = estimate_peak(height, width, **kwargs)
    free = available if available is not None else runtime.available_bytes(device)
    if free is None:
        return estimate
    need = estimate.total - estimate.runtime
    if need <= free:
        return estimate
    longest = max(height, width)
    suggestion = None
    for side in range(longest - 16 - longest % 16, 15, -16):
        scale = side / longest
        h, w = max(1, math.floor(height * scale)), max(1, math.floor(width * scale))
        try:
            smaller = estimate_peak(h, w, **kwargs)
        except ConfigError:  # too small for the deepest layer
            break
        if smaller.total - smaller.runtime <= free:
            suggestion = side
            break
    hint = f"try data.image_size {suggestion}" if suggestion else "no image size fits: free memory first"
    gib = 2**30
    raise ConfigError(
        f"a {width}x{height} px run needs about {need / gib:.1f} GiB but {free / gib:.1f} GiB is available "
        f"on {device}: {hint}, or lower model.lbfgs_history_size ({kwargs.get('history_size', LBFGS_HISTORY_SIZE)})"
    )




def check_run(
    images: ImageSource,
    sizes: Sequence[int],
    extractor: FeatureExtractor,
    settings: Mapping[str, Any],
    precision: str,
    device: str,
) -> MemoryEstimate:
    """Before any image is resized (a resize to an absurd size would itself be what runs out of memory):
    each image at the first of ``sizes`` gives the deepest layer a pixel, and a run with ``settings`` (a
    ``StyleTransfer``'s hyper-parameters) at the last size fits in the memory free on ``device``."""
    extractor.check_image_size(images.content_size(sizes[0]))
    for style in images.style_sizes(sizes[0]):
        extractor.check_image_size(style, "style")
    width, height = images.content_size(sizes[-1])
    names = ("content_layers", "style_layers", "backbone", "pooling", "optimizer", "weights")
    return check_fits(
        height,
        width,
        **{name: settings[name] for name in names},
        history_size=settings["lbfgs_history_size"],
        precision=precision,
        device=device,
    )
