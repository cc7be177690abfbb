"""A stand-in for the ImageNet VGG-19 weights where they cannot be downloaded: random, but scaled.

Style-transfer figures measured with plain random weights say little: torchvision initialises VGG-19
so that the activations shrink layer after layer (their mean square falls from about 0.3 at conv1_1
to under 1e-4 at conv5_1 on a photograph), so the style losses of the deep layers are some 1e-10 of
the shallow ones and the loss is, in effect, conv1_1's statistics alone. Trained networks keep every
layer's activations at a useful magnitude.

This module builds a VGG-19 with torchvision's random initialisation (seed 0) and then rescales each
convolution, in order, so that its output has mean square 1 on a given image (ReLU and pooling are
positively homogeneous, so the scale carries through): every layer then contributes, as with trained
weights. It is a benchmark proxy, named as such wherever a figure uses it; the features are still
untrained, so images made with it are no stylisation.
"""

from __future__ import annotations

from pathlib import Path

import common  # before nst_lightning: this checkout's package, not an installed copy
import torch
from torch import Tensor, nn

from nst_lightning.core.backbones import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "common", "scaled_random_vgg19", "write_scaled_random_vgg19"]


@torch.no_grad()
def scaled_random_vgg19(image: Tensor) -> dict[str, Tensor]:
    """The state dict of a random VGG-19 whose every convolution outputs mean square 1 on ``image``
    (an RGB batch in [0, 1])."""
    from torchvision.models import vgg19

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = vgg19(weights=None)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = (image.float() - mean) / std
    for layer in model.features:
        if isinstance(layer, nn.Conv2d):
            out = layer(x)
            scale = out.pow(2).mean().sqrt()
            layer.weight.div_(scale)
            layer.bias.div_(scale)
        x = layer(x)
    return model.state_dict()


def write_scaled_random_vgg19(image: Tensor, path: str | Path) -> Path:
    """Saves :func:`scaled_random_vgg19` to ``path`` (a torchvision state dict) and returns the path."""
    path = Path(path)
    torch.save(scaled_random_vgg19(image), path)
    return path
