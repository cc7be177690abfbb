"""Colour control (Gatys et al. 2017, "Controlling perceptual factors in neural style transfer").

Pure functions on (B, 3, H, W) RGB tensors in [0, 1]: YIQ conversion for luminance-only transfer,
and colour matching of the style image to the content image's colour distribution.
"""

from __future__ import annotations

import torch
from torch import Tensor

from nst_lightning.core.losses import sqrtm_psd

# NTSC YIQ, as used by Gatys et al. (2017) for luminance-only transfer.
_RGB_TO_YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.595716, -0.274453, -0.321263], [0.211456, -0.522591, 0.311135]])


def rgb_to_yiq(image: Tensor) -> Tensor:
    """RGB -> YIQ (channel 0 is the luminance Y, channels 1-2 the chroma I and Q)."""
    return torch.einsum("ij,bjhw->bihw", _RGB_TO_YIQ.to(image), image)


def yiq_to_rgb(image: Tensor) -> Tensor:
    """YIQ -> RGB, the inverse of :func:`rgb_to_yiq`."""
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_RGB_TO_YIQ).to(image), image)


def luminance(image: Tensor) -> Tensor:
    """The luminance Y of an RGB image, (B, 1, H, W)."""
    return rgb_to_yiq(image)[:, :1]


def match_luminance(style_y: Tensor, content_y: Tensor) -> Tensor:
    """Shift and scale the style luminance to the content luminance's mean and standard deviation
    (Gatys et al. 2017, section 5.2), so that the style's overall brightness does not leak in."""
    s_mean, s_std = style_y.mean(), style_y.std().clamp_min(1e-6)
    return (style_y - s_mean) / s_std * content_y.std() + content_y.mean()


def grey_rgb(y: Tensor) -> Tensor:
    """A one-channel luminance image as a three-channel grey RGB image."""
    return y.expand(-1, 3, -1, -1).contiguous()


def combine_luminance(y: Tensor, chroma_from: Tensor) -> Tensor:
    """An RGB image with the luminance ``y`` (B, 1, H, W) and the chroma (I, Q) of ``chroma_from``."""
    yiq = rgb_to_yiq(chroma_from)
    return yiq_to_rgb(torch.cat([y, yiq[:, 1:]], dim=1))


def match_color(source: Tensor, target: Tensor, eps: float = 1e-5) -> Tensor:
    """Recolour ``source`` so that its pixels' mean and covariance match ``target``'s (the linear
    colour transfer of Gatys et al. 2017, section 5.1: x' = A (x - m_s) + m_t, with
    A = C_t^1/2 C_s^-1/2). Clamped to [0, 1]."""

    def stats(image: Tensor) -> tuple[Tensor, Tensor]:
        pixels = image.reshape(3, -1)
        mean = pixels.mean(dim=1, keepdim=True)
        centred = pixels - mean
        return mean, centred @ centred.T / pixels.shape[1] + eps * torch.eye(3, dtype=image.dtype)

    out = []
    for src, tgt in zip(source.float(), target.float().expand(source.shape[0], -1, -1, -1), strict=True):
        s_mean, s_cov = stats(src)
        t_mean, t_cov = stats(tgt)
        transform = sqrtm_psd(t_cov) @ torch.linalg.inv(sqrtm_psd(s_cov))
        out.append((transform @ (src.reshape(3, -1) - s_mean) + t_mean).reshape(src.shape))
    return torch.stack(out).clamp_(0, 1)
