"""How much memory a run needs: an estimate from the image size, the layers and the optimiser, made
before anything is allocated, so that a run that cannot fit is refused with a smaller size to try.

The activations come from a forward pass of the real :class:`~nst_lightning.core.features.FeatureExtractor`
on the ``meta`` device (shapes only, no memory): every tensor that autograd saves for the backward
pass is counted once (in-place layers share their input's), so truncation, pooling and in-place ReLUs
are whatever the extractor does. Added to them: the gradients in flight during the backward pass, the
optimiser's state (L-BFGS keeps ``2 * history_size`` image-sized vectors), the targets and the
weights, and on a CPU the process's own footprint (Python, torch, Lightning), since resident memory is
what the operating system runs out of. Before the optimisation the targets are computed: a forward pass
over the content and over each style at the style's own size (a small style enlarged past a thin content
makes this the peak), with the masks, and a coarse-to-fine run's previous scale still held
(:mod:`nst_lightning.run.activations` counts both phases). The constants were checked against measured peak
RSS at 256 and 512 px and with a wide style (``benchmarks/memory_check.py`` prints the comparison).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace

import torch

from nst_lightning.core.backbones import backbone_spec
from nst_lightning.core.features import FeatureExtractor
from nst_lightning.errors import ConfigError, OutOfMemory
from nst_lightning.io.files import file_bytes
from nst_lightning.names import CONTENT_LAYERS, IMAGENET_FILE_BYTES, LBFGS_HISTORY_SIZE, MIXED_PRECISIONS, STYLE_LAYERS
from nst_lightning.run import runtime
from nst_lightning.run.activations import held_between_steps, saved_activations, target_pass, tile_extent

# Resident memory of a process that has imported torch, torchvision and Lightning and runs a Trainer
# (measured: about 690 MiB after the imports with a CUDA build of torch on Linux, whose libraries are
# most of it, and some 60 MiB more once the Trainer runs). Not counted on a GPU.
CPU_RUNTIME_BYTES = 750 * 2**20
# Gradients alive at once during the backward pass, in units of the largest activation: the
# gradient arriving at a layer, the one leaving it, and the sum where two branches meet.
BACKWARD_ACTIVATIONS = 3


# On a CPU the process's resident memory peaks this much above the largest phase's tensors: freed memory
# is kept in the heap (``runtime.keep_freed_memory``: no mmap, no trimming), where the holes left by the
# weights' loading and by earlier, smaller tensors are too small for the next large ones. Measured with
# ``benchmarks/memory_check.py --quick --wide-style 768`` (2 threads, a CPU build of torch): the peak RSS
# above the process's own footprint was 1.39 to 1.53 times the tensors counted here. A run the plan tiles or whose
# history it shortens hands freed memory back instead (``runtime.return_freed_memory``) and peaks below this: at
# 3000 px under ``ulimit -v 12000000`` its address space grew 5.4 GiB against an estimate of 7.7.
CPU_HEAP_SLACK = 1.6
# Bytes per pixel a video frame's temporal term holds during its run: the warped previous frame
# (3 x float32) and the reliability mask held, the difference and its square saved for the backward.
TEMPORAL_BYTES_PER_PIXEL = 4 * (3 + 1 + 3 + 3)


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
    target_pass: int = 0
    """The peak while the targets are computed (weights included): every input image at its own size, a
    forward pass over each (the style's at the style's size), what the coarse-to-fine run's previous
    scale still holds; for a video frame, also its flow phase."""
    heap_slack: int = 0
    """What the allocator's heap takes above the largest phase (on a CPU, see :data:`CPU_HEAP_SLACK`)."""

    @property
    def largest_phase(self) -> int:
        # Loading the weights (the file's tensors and the whole backbone) happens before the targets
        # are computed, and they before the optimisation: the peak is the largest of the three phases.
        run = self.weights + self.activations + self.backward + self.optimizer + self.targets
        return max(self.weights_loading, self.target_pass, run)

    @property
    def total(self) -> int:
        return self.runtime + self.heap_slack + self.largest_phase

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
    styles: Sequence[tuple[int, int]] | None = None,
    masks: int = 0,
    previous: tuple[int, int] | None = None,
    style_loss: str = "gram",
    preserve_color: str = "none",
    temporal: bool = False,
    tile: int | None = None,
    split: str | None = None,
) -> MemoryEstimate:
    """The peak memory of a run on a ``height`` x ``width`` image, by component.

    Args:
        height, width: size of the optimised image in pixels.
        content_layers, style_layers: as in :class:`~nst_lightning.StyleTransfer` (the network
            is cut after the deepest).
        backbone, pooling, weights: as in :class:`~nst_lightning.core.features.FeatureExtractor`.
        optimizer: ``lbfgs`` or ``adam``.
        history_size: L-BFGS memory (``lbfgs_history_size``).
        precision: ``32-true``, ``bf16-mixed`` or ``16-mixed`` (activations in 2 bytes).
        device: ``cpu`` (the process's own footprint is added) or ``cuda``.
        styles: (width, height) of each style image at its scale (default: one of the image's size).
        masks: the number of style masks (each at the image's size).
        previous: (width, height) of the image at a coarse-to-fine run's previous scale, if any.
        style_loss, preserve_color: as in :class:`~nst_lightning.StyleTransfer`.
        temporal: a video frame (its flows and temporal term).
        tile: the network run over tiles of this many pixels a side (plus their halo; see tiling.py): its
            passes hold a tile's activations, the image, its optimiser and its targets stay whole.
        split: with ``tile``, the last layer run over tiles (None: all); the layers after it hold the whole
            image's activations, from the split layer's map.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    wanted = tuple(dict.fromkeys([*content_layers, *style_layers]))
    extractor = _shapes_only(wanted, backbone, pooling)
    extractor.check_image_size((width, height))
    for style in styles or []:
        extractor.check_image_size(style, "style")
    act = 2 if precision in MIXED_PRECISIONS else 4
    # What one pass of the network sees: the whole image, or a tile with its halo (and the layers after the
    # split over the whole image, from the split layer's map; its gradient held through the tiles' second pass).
    if tile is None:
        saved, largest, features = saved_activations(extractor, height, width, act)
    else:
        extent = tile_extent(extractor, height, width, tile, split)
        saved, largest, features = saved_activations(extractor, *extent, act, through=split)
        if split is not None:
            deep, deep_largest, deep_features = saved_activations(extractor, height, width, act, after=split)
            saved, largest, features = saved + deep, max(largest, deep_largest), features | deep_features
            with torch.no_grad():
                split_map, _ = extractor.run(torch.empty(1, 3, height, width, device="meta"), through=split)
            saved += act * split_map.numel()
    if act != 4:  # the losses take float32 copies of half-precision activations
        saved += sum(features[name] * 4 for name in wanted)
    # With masks, each style layer's activations times each mask are saved (float32).
    saved += masks * sum(features[name] * 4 for name in style_layers)
    options = {
        "optimizer": optimizer,
        "history_size": history_size if optimizer == "lbfgs" else 0,
        "style_loss": style_loss,
        "content_layers": content_layers,
        "style_layers": style_layers,
        "masks": masks,
        "styles": styles,
        "previous": previous,
        "preserve_color": preserve_color,
        "temporal": temporal,
        "tile": tile,
    }
    optimizer_bytes, target_bytes = held_between_steps(extractor, height, width, options)
    params = sum(p.numel() for p in extractor.parameters())
    file = IMAGENET_FILE_BYTES.get(backbone, 0) if weights == "imagenet" else 0 if weights == "random" else None
    loading = (_backbone_parameters(backbone) + params) * 4 + (file_bytes(weights) if file is None else file)
    temporal_bytes = TEMPORAL_BYTES_PER_PIXEL * height * width if temporal else 0
    if tile is not None:  # each tile's gradient arrives as a whole-image tensor and is added to the image's
        temporal_bytes += 2 * 3 * height * width * 4
    estimate = MemoryEstimate(
        runtime=CPU_RUNTIME_BYTES if device == "cpu" else 0,
        weights=params * 4,
        weights_loading=loading,
        activations=saved + temporal_bytes,
        backward=BACKWARD_ACTIVATIONS * largest * 4,
        optimizer=optimizer_bytes,
        targets=target_bytes,
        target_pass=params * 4 + target_pass(extractor, height, width, options),
    )
    if device != "cpu":
        return estimate
    return replace(estimate, heap_slack=math.ceil((CPU_HEAP_SLACK - 1) * estimate.largest_phase))


def fits_in(estimate: MemoryEstimate, free: int | None) -> bool:
    """Whether the run of ``estimate`` fits in ``free`` bytes (None: not known, so yes), the process's own aside."""
    return free is None or estimate.total - estimate.runtime <= free


def _largest_fitting(estimate_at: Callable[[int], MemoryEstimate], steps: int, free: int) -> int | None:
    """The largest ``k`` below ``steps`` whose run (``estimate_at(k)``, growing with ``k``) fits in ``free``
    bytes, by bisection; None if none does. A run too small for the deepest layer fits nowhere below."""

    @functools.cache
    def fits(k: int) -> bool | None:  # None: too small for the deepest layer
        try:
            estimate = estimate_at(k)
        except ConfigError:
            return None
        return estimate.total - estimate.runtime <= free

    low, high = 0, steps  # fits(k) is not False for every k <= low (k = 0: nothing), False from high on
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) is not False else (low, middle)
    return low if low > 0 and fits(low) else None


def refuse_unless_fits(
    estimate: MemoryEstimate,
    what: str,
    available: int | None,
    device: str,
    history_size: int,
    fixes: Sequence[tuple[str, Callable[[int], MemoryEstimate], int, Callable[[int], float]]],
) -> MemoryEstimate:
    """``estimate`` if it fits in ``available`` bytes (default: what :func:`~nst_lightning.run.runtime.available_bytes`
    reports for ``device``), else :class:`ConfigError` naming, for each of ``fixes`` (a key, the estimate at
    step ``k``, the number of steps, the key's value at step ``k``), the largest value that fits. On a CPU
    the process's own footprint is already resident: it is subtracted before the comparison."""
    free = available if available is not None else runtime.available_bytes(device)
    need = estimate.total - estimate.runtime
    if free is None or need <= free:
        return estimate
    tries = []
    for key, estimate_at, steps, value in fixes:
        k = _largest_fitting(estimate_at, steps, free)
        if k is not None:
            tries.append(f"{key} {value(k):g}")
    hint = f"try {' or '.join(tries)}" if tries else "no image size fits: free memory first"
    gib = 2**30
    raise ConfigError(
        f"{what} needs about {need / gib:.1f} GiB but {free / gib:.1f} GiB is available on {device}: {hint}, "
        f"or lower model.lbfgs_history_size ({history_size})"
    )


def check_fits(
    height: int,
    width: int,
    *,
    available: int | None = None,
    **kwargs,
) -> MemoryEstimate:
    """Raises :class:`ConfigError` (with the largest image size that would fit) if a run on a
    ``height`` x ``width`` image (``kwargs``: :func:`estimate_peak`'s, without ``styles`` and ``previous``)
    is estimated not to fit in ``available`` bytes (default: what :func:`~nst_lightning.run.runtime.available_bytes`
    reports for ``device``). Returns the estimate otherwise."""
    longest = max(height, width)

    def estimate_at(k: int) -> MemoryEstimate:  # longest side 16 k
        scale = 16 * k / longest
        return estimate_peak(max(1, math.floor(height * scale)), max(1, math.floor(width * scale)), **kwargs)

    return refuse_unless_fits(
        estimate_peak(height, width, **kwargs),
        f"a {width}x{height} px run",
        available,
        kwargs.get("device", "cpu"),
        kwargs.get("history_size", LBFGS_HISTORY_SIZE),
        [("data.image_size", estimate_at, -(-longest // 16), times16)],
    )


def times16(k: int) -> int:
    return 16 * k


# What torch's allocators say when they cannot get memory: the CPU's (``DefaultCPUAllocator: can't allocate
# memory`` / ``not enough memory``), CUDA's and MPS's (``out of memory``).
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|not enough memory|out of memory", re.IGNORECASE)
_REQUESTED = re.compile(r"allocate (\d+) bytes|[Tt]ried to allocate ([\d.]+ [KMGT]i?B)")


def out_of_memory(err: BaseException) -> OutOfMemory | None:
    """The one-line error for ``err`` if it says the device ran out of memory (a ``MemoryError``, torch's
    ``OutOfMemoryError``, or an allocator's ``RuntimeError``), else None: what to set for more headroom. The
    memory plan let the run start, so its estimate fell short (under a tight ``ulimit -v``, say)."""
    out_of_memory_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    message = " ".join(str(err).split())
    if not (
        isinstance(err, (MemoryError, out_of_memory_type))
        or (isinstance(err, RuntimeError) and _ALLOCATION_FAILED.search(message))
    ):
        return None
    found = _REQUESTED.search(message)
    if found is None:
        asked = ""
    elif found.group(1):
        asked = f" (asked for {int(found.group(1)) / 2**20:.0f} MiB more)"
    else:
        asked = f" (asked for {found.group(2)} more)"
    return OutOfMemory(
        f"out of memory{asked}: the run needed more than the memory plan estimated; give it headroom with a "
        "smaller model.tile_size than the plan chose (512 where it ran whole), a shorter model.lbfgs_history_size "
        "(6, say) or a smaller data.image_size"
    )
