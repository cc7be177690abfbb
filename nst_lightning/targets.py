"""Thin module wrappers around the loss functions: each holds one target as buffers (so it follows
the LightningModule's device and lives in its checkpoints) and maps features to a loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nst_lightning.losses import (
    content_loss,
    gram_matrix,
    mean_covariance,
    sqrtm_psd,
    style_loss,
    wasserstein2_gaussian,
)

_COV_EPS = 1e-5


def resize_mask(mask: Tensor | None, features: Tensor) -> Tensor | None:
    """A (1, 1, H, W) mask averaged down to the spatial size of ``features``."""
    return None if mask is None else F.adaptive_avg_pool2d(mask.float(), features.shape[-2:])


class ContentTarget(nn.Module):
    """Content activations of one layer; the loss is their mean squared error."""

    def __init__(self, features: Tensor) -> None:
        super().__init__()
        self.register_buffer("target", features.detach().float())

    def forward(self, features: Tensor) -> Tensor:
        return content_loss(features, self.target)


class GramTarget(nn.Module):
    """The Gram matrix of one layer, blended over style images (weights summing to 1); with a mask,
    the image's Gram matrix is taken over the masked region only."""

    def __init__(self, styles: Sequence[Tensor], blend: Sequence[float], mask: Tensor | None = None) -> None:
        super().__init__()
        gram = sum(w * gram_matrix(f) for f, w in zip(styles, blend, strict=True))
        self.register_buffer("gram", gram.detach())
        self.register_buffer("mask", mask)

    def forward(self, features: Tensor) -> Tensor:
        return style_loss(gram_matrix(features, self.mask), self.gram)


class MeanCovTarget(nn.Module):
    """Mean and covariance of one layer's features (the Gaussian fitted to the mixture of the
    style images' feature distributions); the loss is the 2-Wasserstein distance."""

    def __init__(self, styles: Sequence[Tensor], blend: Sequence[float], mask: Tensor | None = None) -> None:
        super().__init__()
        mean, second = 0.0, 0.0
        for features, weight in zip(styles, blend, strict=True):
            m, cov = mean_covariance(features, eps=0.0)
            mean = mean + weight * m
            second = second + weight * (cov + m.unsqueeze(-1) * m.unsqueeze(-2))
        cov = second - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        cov = cov + _COV_EPS * torch.eye(cov.shape[-1], device=cov.device)
        self.register_buffer("mean", mean.detach())
        self.register_buffer("cov", cov.detach())
        self.register_buffer("cov_sqrt", sqrtm_psd(cov).detach())
        self.register_buffer("mask", mask)

    def forward(self, features: Tensor) -> Tensor:
        mean, cov = mean_covariance(features, self.mask, eps=_COV_EPS)
        return wasserstein2_gaussian(mean, cov, self.mean, self.cov, self.cov_sqrt)


STYLE_TARGETS = {"gram": GramTarget, "mean_cov": MeanCovTarget}
