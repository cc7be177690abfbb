"""The losses of Gatys et al. as small pure functions.

All of them compute in float32 whatever the autocast state, so bf16/fp16 activations never enter a
Gram product or a reduction: their rounding error would swamp the small style differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import total_variation as _tv_sum


def _fp32(x: Tensor) -> Tensor:
    return x.float() if x.dtype != torch.float32 else x


class _Gram(torch.autograd.Function):
    """``flat @ flat^T / norm`` for ``flat`` of shape (B, C, N), as one batched product each way.

    Autograd's own backward of ``bmm(flat, flat^T)`` runs two products (one per operand) and adds
    them; here it is one, ``(g + g^T) @ flat / norm``, written in the memory layout of ``flat`` (in
    channels-last activations C is the innermost dimension), so no layout conversion follows.
    """

    @staticmethod
    def forward(ctx, flat: Tensor, norm: float) -> Tensor:
        ctx.save_for_backward(flat)
        ctx.norm = norm
        return torch.bmm(flat, flat.transpose(1, 2)).div_(norm)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (flat,) = ctx.saved_tensors
        sym = grad + grad.transpose(1, 2)
        if flat.stride(1) == 1 and flat.size(1) > 1:  # channels-last: (B, N, C) is the contiguous view
            return torch.bmm(flat.transpose(1, 2), sym).div_(ctx.norm).transpose(1, 2), None
        return torch.bmm(sym, flat).div_(ctx.norm), None


def gram_matrix(features: Tensor) -> Tensor:
    """Gram matrices of feature maps: (B, C, H, W) -> (B, C, C), divided by C*H*W.

    One batched float32 product (and one for the gradient); contiguous and channels-last inputs
    are read in place, without a copy.

    Departure from the paper: Gatys et al. use the raw sum and weight each layer by
    1 / (4 N^2 M^2). Dividing by C*H*W (as the PyTorch tutorial does) keeps the style loss of every
    layer on one scale, so that the seed's weights (content 1, style 1e6) balance as it reports.
    """
    if features.dim() != 4:
        raise ValueError(f"gram_matrix expects a 4-D tensor (B, C, H, W), got shape {tuple(features.shape)}")
    b, c, h, w = features.shape
    with torch.autocast(device_type=features.device.type, enabled=False):
        flat = _fp32(features).reshape(b, c, h * w)
        return _Gram.apply(flat, float(c * h * w))


def content_loss(features: Tensor, target: Tensor) -> Tensor:
    """Mean squared error between feature maps (Gatys et al. use half the sum; the mean keeps the
    scale independent of the layer's size)."""
    with torch.autocast(device_type=features.device.type, enabled=False):
        return F.mse_loss(_fp32(features), _fp32(target))


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
