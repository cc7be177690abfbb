"""The losses of Gatys et al. as small pure functions.

All of them compute in float32 whatever the autocast state, so bf16/fp16 activations never enter a
Gram product or a reduction in half precision: their rounding error would swamp the small style
differences. (One exception, argued in ``_Gram``: under bf16 the Gram matrix's gradient product,
whose result goes into a bfloat16 backward pass anyway.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import total_variation as _tv_sum


def _fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype != torch.float32 else x


class _Gram(torch.autograd.Function):
    """``flat @ flat^T / norm`` in float32, where ``flat`` is ``features`` (B, C, H, W) viewed as
    (B, C, H*W), as one batched product each way.

    Autograd's own backward of ``bmm(flat, flat^T)`` runs two products (one per operand) and adds
    them; here it is one, ``(g + g^T) @ flat / norm``, written in the memory layout of ``features``,
    so no layout conversion follows. For one channels-last float32 image on a CPU that product is a
    1x1 convolution of the features with ``(g + g^T) / norm`` as its weight: oneDNN's 1x1 kernel
    reads and writes the long, thin (H*W, C) matrices at close to the convolutions' speed, where
    ``bmm`` ran the C = 64 layer at 40-80 GFLOP/s (the five default layers at 512 px: 44-57 against
    70-101 ms per iteration, measured on 2 AVX2 cores).

    ``features`` may be bfloat16 (bf16-mixed): the product is still taken in float32 (an exact
    widening), but the float32 copy is not kept for the backward pass, whose product runs in
    bfloat16 and returns a bfloat16 gradient. Departure from computing everything of the loss in
    float32: that gradient goes straight into the bfloat16 backward pass of the convolution below,
    so a float32 product would only be rounded to bfloat16 afterwards (0.17% relative error against
    0.23% here), while costing a float32 copy of the activations, a float32 gradient and a
    conversion. With AMX the bfloat16 product is also some 5 times faster.
    """

    @staticmethod
    def forward(ctx, features: Tensor, norm: float) -> Tensor:
        ctx.save_for_backward(features)
        ctx.norm = norm
        b, c, h, w = features.shape
        wide = _fp32(features).reshape(b, c, h * w)
        return torch.bmm(wide, wide.transpose(1, 2)).div_(norm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (features,) = ctx.saved_tensors
        b, c, h, w = features.shape
        # Scaled while it is C x C, not after the product, where it would be another pass over C x N.
        sym = (grad + grad.transpose(1, 2)).div_(ctx.norm).to(features.dtype)
        channels_last = c > 1 and features.is_contiguous(memory_format=torch.channels_last)
        with torch.autocast(device_type=features.device.type, enabled=False):
            # out[c, n] = sum_k sym[c, k] features[k, n]: a 1x1 convolution. Float32 on a CPU only:
            # that is where it was measured (bfloat16's bmm was measured on AMX), and cuDNN would
            # run it in TF32 by default where bmm is float32.
            if channels_last and b == 1 and features.device.type == "cpu" and features.dtype == torch.float32:
                return F.conv2d(features, sym.reshape(c, c, 1, 1)), None
            if channels_last:  # (B, H*W, C) is the contiguous view of channels-last features
                flat_t = features.permute(0, 2, 3, 1).reshape(b, h * w, c)
                return torch.bmm(flat_t, sym).reshape(b, h, w, c).permute(0, 3, 1, 2), None
            return torch.bmm(sym, features.reshape(b, c, h * w)).reshape(b, c, h, w), None


def gram_matrix(features: Tensor, mask: Tensor | None = None) -> Tensor:
    """Gram matrices of feature maps: (B, C, H, W) -> (B, C, C), divided by C*H*W.

    With a ``mask`` of shape (B or 1, 1, H, W), each position counts with its mask value and the
    product is divided by C * sum(mask) instead: the Gram matrix of the masked region alone.

    Departure from the paper: Gatys et al. use the raw sum and weight each layer by
    1 / (4 N^2 M^2). Dividing by C*H*W (as the PyTorch tutorial does) keeps the style loss of every
    layer on one scale, so that the seed's weights (content 1, style 1e6) balance as it reports.
    """
    if features.dim() != 4:
        raise ValueError(f"gram_matrix expects a 4-D tensor (B, C, H, W), got shape {tuple(features.shape)}")
    b, c, h, w = features.shape
    with torch.autocast(device_type=features.device.type, enabled=False):
        if mask is None:
            # bfloat16 goes in as it is (see _Gram); float16 is widened first, as its range is
            # too small for an unscaled gradient product.
            wanted = features if features.dtype == torch.bfloat16 else _fp32(features)
            return _Gram.apply(wanted, float(c * h * w))
        flat = _fp32(features).reshape(b, c, h * w)
        weights = _fp32(mask).reshape(-1, 1, h * w)
        area = weights.sum(dim=-1, keepdim=True).clamp_min(1e-8)
        return torch.bmm(flat * weights, flat.transpose(1, 2)) / (c * area)


def mean_covariance(features: Tensor, mask: Tensor | None = None, eps: float = 1e-5) -> tuple[Tensor, Tensor]:
    """Mean (B, C) and covariance (B, C, C) of the feature vectors of each map, over the (masked)
    positions; ``eps`` is added to the covariance's diagonal so that it stays positive definite."""
    b, c, h, w = features.shape
    with torch.autocast(device_type=features.device.type, enabled=False):
        flat = _fp32(features).reshape(b, c, h * w)
        weights = torch.ones_like(flat[:, :1]) if mask is None else _fp32(mask).reshape(-1, 1, h * w)
        weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-8)
        mean = (flat * weights).sum(dim=-1)
        centred = flat - mean.unsqueeze(-1)
        cov = torch.bmm(centred * weights, centred.transpose(1, 2))
        return mean, cov + eps * torch.eye(c, device=cov.device, dtype=cov.dtype)


def sqrtm_psd(matrix: Tensor) -> Tensor:
    """The symmetric square root of symmetric positive semi-definite matrices (..., C, C)."""
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        values, vectors = torch.linalg.eigh(_fp32(matrix))
        return (vectors * values.clamp_min(0).sqrt().unsqueeze(-2)) @ vectors.transpose(-1, -2)


def wasserstein2_gaussian(
    mean: Tensor, cov: Tensor, target_mean: Tensor, target_cov: Tensor, target_cov_sqrt: Tensor
) -> Tensor:
    """Squared 2-Wasserstein distance between the Gaussians N(mean, cov) and N(target_mean,
    target_cov), divided by the number of channels and averaged over the batch:

        |m - m_t|^2 + tr(S) + tr(S_t) - 2 tr((S_t^1/2 S S_t^1/2)^1/2)

    This is the mean-and-covariance style loss of crowsonkb/style-transfer-pytorch (a departure
    from Gatys et al., whose Gram matrices are uncentred second moments). ``target_cov_sqrt`` is
    precomputed once with :func:`sqrtm_psd`.
    """
    with torch.autocast(device_type=mean.device.type, enabled=False):
        mean, cov = _fp32(mean), _fp32(cov)
        inner = target_cov_sqrt @ cov @ target_cov_sqrt
        # tr(sqrtm(inner)) from the eigenvalues; clamping keeps the gradient finite at zero.
        cross = torch.linalg.eigvalsh(inner).clamp_min(1e-8).sqrt().sum(dim=-1)
        trace = cov.diagonal(dim1=-2, dim2=-1).sum(-1) + target_cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        distance = (mean - target_mean).pow(2).sum(-1) + trace - 2 * cross
        # The distance is never negative; a negative value is float32 rounding in the difference of
        # large traces (seen with Caffe-scale activations), and 0 is the closest true value.
        return (distance.clamp_min(0) / mean.shape[-1]).mean()


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between feature maps (Gatys et al. use half the sum; the mean keeps the
    scale independent of the layer's size)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.mse_loss(_fp32(features), _fp32(target))


def partial_content_loss(features: Tensor, target: Tensor, count: int) -> Tensor:
    """``sum((features - target)^2) / count``: the share of a part of a feature map (a tile's core) in
    :func:`content_loss` of the whole map, which has ``count`` elements."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return (_fp32(features) - _fp32(target)).pow(2).sum() / count


def position_sums(
    features: Tensor, mask: Tensor | None = None, second: bool = True, first: bool = False
) -> tuple[Tensor, ...]:
    """Sums over the positions of ``features`` (B, C, H, W), each weighted by ``mask`` (B or 1, 1, H, W; 1
    where None): ``sum w f`` (B, C) if ``first``, ``sum w f f^T`` (B, C, C) if ``second``, and always the
    weight ``sum w`` (B, 1, 1). Style statistics of a whole map are functions of these sums, and sums over
    the parts of a map add up: what tiling accumulates (see :mod:`nst_lightning.core.tiling`)."""
    b, c, h, w = features.shape
    with torch.autocast(device_type=features.device.type, enabled=False):
        flat = _fp32(features).reshape(b, c, h * w)
        weights = torch.ones_like(flat[:, :1]) if mask is None else _fp32(mask).reshape(-1, 1, h * w)
        weighted = flat * weights
        sums: list[Tensor] = []
        if first:
            sums.append(weighted.sum(dim=-1))
        if second:
            sums.append(torch.bmm(weighted, flat.transpose(1, 2)))
        sums.append(weights.sum(dim=-1, keepdim=True).expand(b, 1, 1))
        return tuple(sums)


def style_loss(gram: Tensor, target_gram: Tensor) -> Tensor:
    """Mean squared error between Gram matrices."""
    with torch.autocast(device_type=gram.device.type, enabled=False):
        return F.mse_loss(_fp32(gram), _fp32(target_gram))


def total_variation(image: Tensor) -> Tensor:
    """Anisotropic total variation: the mean absolute difference between neighbouring pixels.

    torchmetrics sums |differences| over each image; dividing by C*H*W makes the value independent
    of the image size, so one ``tv_weight`` suits every resolution.
    """
    _, c, h, w = image.shape
    with torch.autocast(device_type=image.device.type, enabled=False):
        return _tv_sum(_fp32(image), reduction="mean") / (c * h * w)


def temporal_loss(image: Tensor, warped: Tensor, mask: Tensor) -> Tensor:
    """Ruder, Dosovitskiy & Brox (2016), eq. 5: ``(1/D) sum_i c_i (x_i - w_i)^2``, the squared difference
    between ``image`` (B, C, H, W) and ``warped`` (the previous stylised frame warped into this one by
    the optical flow), weighted by the per-pixel reliability ``mask`` (B or 1, 1, H, W; 0 where the flow
    is occluded or on a motion boundary, 1 elsewhere); D = C*H*W, so one weight suits every frame size."""
    with torch.autocast(device_type=image.device.type, enabled=False):
        difference = _fp32(image) - _fp32(warped)
        return (difference.pow(2) * _fp32(mask)).mean()
