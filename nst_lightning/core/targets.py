"""Thin module wrappers around the loss functions: each holds one target as buffers (so it follows
the LightningModule's device and lives in its checkpoints) and maps features to a loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nst_lightning.core.losses import (
    content_loss,
    gram_matrix,
    mean_covariance,
    partial_content_loss,
    position_sums,
    sqrtm_psd,
    style_loss,
    wasserstein2_gaussian,
)

_COV_EPS = 1e-5


def _crop(mask: Tensor | None, rows: slice, cols: slice) -> Tensor | None:
    return None if mask is None else mask[..., rows, cols]


def resize_mask(mask: Tensor | None, size: tuple[int, int]) -> Tensor | None:
    """A (1, 1, H, W) mask averaged down to a feature map's (height, width) ``size``."""
    return None if mask is None else F.adaptive_avg_pool2d(mask.float(), size)


class ContentTarget(nn.Module):
    """Content activations of one layer; the loss is their mean squared error."""

    def __init__(self, features: Tensor) -> None:
        super().__init__()
        self.register_buffer("target", features.detach().float())

    def forward(self, features: Tensor) -> Tensor:
        return content_loss(features, self.target)

    def partial(self, features: Tensor, rows: slice, cols: slice) -> Tensor:
        """The share of the loss of the positions ``rows`` x ``cols`` (a tile's core) whose activations are
        ``features``: the shares of a partition of the map add up to :meth:`forward`'s value."""
        return partial_content_loss(features, self.target[..., rows, cols], self.target.numel())


def image_statistics(style_loss: str, features: Tensor) -> Tensor | tuple[Tensor, Tensor]:
    """One style image's statistics of one layer, as its target (:data:`STYLE_TARGETS`) takes them: the Gram
    matrix, or the mean and covariance."""
    return gram_matrix(features) if style_loss == "gram" else mean_covariance(features, eps=0.0)


class GramTarget(nn.Module):
    """The Gram matrix of one layer, blended over the style images' ``grams`` (weights summing to 1); with a
    mask, the image's Gram matrix is taken over the masked region only."""

    def __init__(self, grams: Sequence[Tensor], blend: Sequence[float], mask: Tensor | None = None) -> None:
        super().__init__()
        gram = sum(w * g for g, w in zip(grams, blend, strict=True))
        self.register_buffer("gram", gram.detach())
        self.register_buffer("mask", mask)

    def forward(self, features: Tensor) -> Tensor:
        return style_loss(gram_matrix(features, self.mask), self.gram)

    def sums(self, features: Tensor, rows: slice, cols: slice) -> tuple[Tensor, ...]:
        """The Gram matrix as sums over positions (tiling): ``sum w f f^T`` and ``C sum w`` over the positions
        ``rows`` x ``cols`` of ``features`` (w: the mask, or 1). Sums over a partition of the map add up to
        those of the whole map; :meth:`loss_from_sums` turns them into :meth:`forward`'s value."""
        return position_sums(features, _crop(self.mask, rows, cols), second=True, first=False)

    def loss_from_sums(self, second: Tensor, count: Tensor) -> Tensor:
        return style_loss(second / (second.shape[-1] * count.clamp_min(1e-8)), self.gram)


class MeanCovTarget(nn.Module):
    """Mean and covariance of one layer's features (the Gaussian fitted to the mixture of the style images'
    feature distributions, from each image's mean and covariance); the loss is the 2-Wasserstein distance."""

    def __init__(
        self, statistics: Sequence[tuple[Tensor, Tensor]], blend: Sequence[float], mask: Tensor | None = None
    ) -> None:
        super().__init__()
        mean, second = 0.0, 0.0
        for (m, cov), weight in zip(statistics, blend, strict=True):
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

    def sums(self, features: Tensor, rows: slice, cols: slice) -> tuple[Tensor, ...]:
        """Mean and covariance as sums over positions (tiling; see :meth:`GramTarget.sums`), of the features
        less the target's mean: an uncentred second moment of features far from zero loses the covariance
        to float32 cancellation (0.5% of the loss at conv1_1), one taken about a nearby mean does not."""
        shifted = features.float() - self.mean.view(*self.mean.shape, 1, 1)
        return position_sums(shifted, _crop(self.mask, rows, cols), second=True, first=True)

    def loss_from_sums(self, first: Tensor, second: Tensor, count: Tensor) -> Tensor:
        # The second moment about the target's mean less the shift's outer product: mean_covariance's centred
        # covariance, to float32 rounding (centring on the image's own mean would need it before the sums).
        count = count.clamp_min(1e-8)
        shift = first / count.squeeze(-1)  # the mean of the features less the target's mean
        cov = second / count - shift.unsqueeze(-1) * shift.unsqueeze(-2)
        mean = shift + self.mean
        cov = cov + _COV_EPS * torch.eye(cov.shape[-1], device=cov.device, dtype=cov.dtype)
        return wasserstein2_gaussian(mean, cov, self.mean, self.cov, self.cov_sqrt)


STYLE_TARGETS = {"gram": GramTarget, "mean_cov": MeanCovTarget}
