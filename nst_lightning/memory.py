"""How much memory a run needs: an estimate from the image size, the layers and the optimiser, made
before anything is allocated, so that a run that cannot fit is refused with a smaller size to try.

The estimate walks the truncated backbone on the ``meta`` device (shapes only, no memory) and adds
up what one closure evaluation keeps alive: the activations saved for the backward pass, the
gradients in flight, the optimiser's state (L-BFGS keeps ``2 * history_size`` image-sized vectors),
the targets and the weights. On a CPU the process's own footprint (Python, torch, Lightning) is
added, since resident memory is what the operating system runs out of. The constants were checked
against measured peak RSS at 256 and 512 px (``benchmarks/bench.py`` prints the comparison).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from nst_lightning.errors import ConfigError
from nst_lightning.features import BACKBONES

CONTENT_LAYERS = ("relu4_2",)
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

# Resident memory of a process that has imported torch, torchvision and Lightning and runs a Trainer
# (measured: about 690 MiB after the imports with a CUDA build of torch on Linux, whose libraries are
# most of it, and some 60 MiB more once the Trainer runs). Not counted on a GPU.
CPU_RUNTIME_BYTES = 750 * 2**20
# Gradients alive at once during the backward pass, in units of the largest activation: the
# gradient arriving at a layer, the one leaving it, and the sum where two branches meet.
BACKWARD_ACTIVATIONS = 3
# Bytes per pixel to prepare one input image: the resized 8-bit RGB image and Pillow's intermediate
# (it resizes one axis at a time), the float32 tensor, and the extractor's normalised copy of it.
PREPARE_BYTES_PER_PIXEL = 3 + 3 + 4 * 3 + 4 * 3
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


def _weights_file_bytes(backbone: str, weights: str) -> int:
    if weights == "random":
        return 0
    if weights == "imagenet":
        return IMAGENET_FILE_BYTES.get(backbone, 0)
    path = Path(weights)
    return path.stat().st_size if path.is_file() else 0


def estimate_peak(
    height: int,
    width: int,
    content_layers: Sequence[str] = CONTENT_LAYERS,
    style_layers: Sequence[str] = STYLE_LAYERS,
    *,
    backbone: str = "vgg19",
    pooling: str = "max",
    optimizer: str = "lbfgs",
    history_size: int = 50,
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
    if backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}: choose one of {', '.join(BACKBONES)}")
    wanted = list(dict.fromkeys([*content_layers, *style_layers]))
    with torch.device("meta"):
        features = BACKBONES[backbone].build()
    names = BACKBONES[backbone].names(features)
    unknown = [name for name in wanted if name not in names]
    if unknown or not wanted:
        raise ConfigError(f"unknown or no layer name(s) {unknown}: choose from {', '.join(names)}")
    deepest = max(names.index(name) for name in wanted)
    act = 2 if precision in ("bf16-mixed", "16-mixed") else 4

    pixels = 3 * height * width
    x = torch.empty(1, 3, height, width, device="meta")
    # The normalised image and its channels-last copy (the first convolution's saved input).
    saved = 2 * pixels * act
    largest = pixels
    full_params = sum(p.numel() for p in features.parameters())
    params = 0
    targets = 0
    for position, (name, layer) in enumerate(zip(names[: deepest + 1], features, strict=False)):
        if isinstance(layer, nn.MaxPool2d) and pooling == "avg":
            layer = nn.AvgPool2d(kernel_size=2, stride=2)
        try:
            x = layer(x)
        except RuntimeError:  # an output smaller than 1x1
            x = x.new_empty(0)
        if x.dim() != 4 or min(x.shape[-2:]) < 1:
            raise ConfigError(f"a {width}x{height} px image is too small for layer {names[deepest]}")
        n = x.numel()
        largest = max(largest, n)
        if isinstance(layer, nn.Conv2d):
            saved += n * act
            params += sum(p.numel() for p in layer.parameters())
        elif isinstance(layer, nn.ReLU) and names[position - 1] in wanted:
            saved += n * act  # not in place: the convolution output is returned too
        elif isinstance(layer, nn.MaxPool2d):
            saved += n * act + n * 8  # output and its int64 argmax indices
        elif isinstance(layer, nn.AvgPool2d):
            saved += n * act
        elif not isinstance(layer, nn.ReLU):  # a composite block (ResNet): about one saved tensor per part
            parts = sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)) for m in layer.modules())
            saved += max(1, parts) * n * act
            params += sum(p.numel() for p in layer.parameters())
        # Targets: activations of a content layer, the Gram matrix of a style layer.
        targets += (n if name in content_layers else 0) + (x.shape[1] ** 2 if name in style_layers else 0)
        if name in wanted:
            # Float32 copies of half-precision activations for the losses.
            if act != 4:
                saved += n * 4
    history = history_size if optimizer == "lbfgs" else 0
    # The image, its gradient and the optimiser's vectors: L-BFGS keeps 2 * history past steps plus
    # the flat gradient, the previous one, the direction and a work vector; Adam two moments.
    vectors = 2 + (2 * history + 4 if optimizer == "lbfgs" else 3)
    loading = (full_params + params) * 4 + _weights_file_bytes(backbone, weights)
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


def input_bytes(content: tuple[int, int], styles: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """Bytes to prepare the input images, (content, styles), from their (width, height) once resized,
    in the CPU's memory on any device (Pillow resizes there). A lower bound of what a run needs,
    cheap to compute for any size: the guard against absurd sizes (``data.image_size 1000000000``),
    for which :func:`check_fits` would spend its time looking for a size that fits."""
    content_bytes = content[0] * content[1] * PREPARE_BYTES_PER_PIXEL
    style_bytes = sum(w * h * PREPARE_BYTES_PER_PIXEL for w, h in styles)
    return content_bytes, style_bytes


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a new allocation can still get: ``MemAvailable`` from /proc/meminfo on a CPU, the
    free memory of the current GPU on CUDA; None where it cannot be told."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(
    height: int,
    width: int,
    *,
    available: int | None = None,
    **kwargs,
) -> MemoryEstimate:
    """Raises :class:`ConfigError` (with the largest image size that would fit) if a run on a
    ``height`` x ``width`` image is estimated not to fit in ``available`` bytes (default: what
    :func:`available_bytes` reports for ``device``). Returns the estimate otherwise.

    On a CPU the estimate includes this process's own footprint, which is already resident, so it is
    subtracted before the comparison with the memory still available.
    """
    device = kwargs.get("device", "cpu")
    estimate = estimate_peak(height, width, **kwargs)
    free = available if available is not None else available_bytes(device)
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
        f"on {device}: {hint}, or lower model.lbfgs_history_size ({kwargs.get('history_size', 50)})"
    )
