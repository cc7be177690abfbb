"""The project's vocabulary: every name and default that more than one room uses, in one place.

Light on purpose (the standard library only): the command line's early checks, the one-shot form's help and
the web form read it before torch loads. The checks of :mod:`nst_lightning.run.checks` check against it, the
module's arguments default to it, and a new backbone is named here once (its network in
:mod:`nst_lightning.core.backbones`; a test holds the two together).
"""

from __future__ import annotations

from typing import Literal, get_args

CONTENT_LAYERS = ("relu4_2",)
"""The default content layer: rectified, as the paper's Caffe layers were."""
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
"""The default style layers."""
SEED_MAX = 2**32 - 1
"""The largest seed numpy takes (``seed_everything`` seeds numpy too)."""
LBFGS_HISTORY_SIZE = 50
"""The default L-BFGS memory (torch's default is 100: half the memory, no measured loss in quality)."""
StyleLoss = Literal["gram", "mean_cov"]
PreserveColor = Literal["none", "luminance", "histogram"]
Optimizer = Literal["lbfgs", "adam"]
LineSearch = Literal["backtrack", "strong_wolfe"]  # or None; backtrack: nst_lightning.core.lbfgs's L-BFGS, None torch's
INITS = ("content", "style", "noise")
"""The starting images that are not a file."""
Init = Literal["content", "style", "noise"]
NamedWeights = Literal["imagenet", "random"]
Pooling = Literal["max", "avg"]
"""``max`` (as the backbone was trained) or ``avg`` (as Gatys et al. recommend)."""
# Precisions that would hold the image itself in half precision.
HALF_PRECISIONS = ("16-true", "bf16-true", "16", "bf16", "transformer-engine")
MIXED_PRECISIONS = ("bf16-mixed", "16-mixed")
# ``--ckpt_path`` values that Lightning resolves itself once the trainer exists.
SPECIAL_CKPT_PATHS = ("last", "best", "hpc")
# The fields of batch.name.
NAME_FIELDS = ("content", "style", "n")
STYLE_LOSSES: tuple[str, ...] = get_args(StyleLoss)
PRESERVE_COLORS: tuple[str, ...] = get_args(PreserveColor)
POOLINGS: tuple[str, ...] = get_args(Pooling)
NAMED_WEIGHTS: tuple[str, ...] = get_args(NamedWeights)
"""``model.weights`` values that are not a file."""

BACKBONE_NAMES = ("vgg19", "vgg16", "resnet18")
"""The networks that extract features (built in :mod:`nst_lightning.core.backbones`); ``auto`` picks a weights
file's own, or vgg19."""
AUTO = "auto"
IMAGENET_FILE_BYTES = {"vgg19": 548 * 2**20, "vgg16": 528 * 2**20}
"""The size of torchvision's ImageNet weights file of a backbone (a memory estimate reads it whole)."""
