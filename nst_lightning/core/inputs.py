"""The images of one optimisation, and what a model asks of its data: the types the maths and the run share
(the data module that reads the files is :mod:`nst_lightning.run.data`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import Tensor


@dataclass
class Inputs:
    """The images of one optimisation at one size, as float tensors in [0, 1]."""

    content: Tensor
    """(1, 3, H, W), longest side the requested size."""
    styles: list[Tensor]
    """One (1, 3, h, w) tensor per style image, longest side ``style_scale`` x the size."""
    blend: list[float]
    """One weight per style, summing to 1."""
    masks: list[Tensor] | None
    """None, or one (1, 1, H, W) mask per style at the content's size."""


class ImageSource(Protocol):
    """What a module needs of its data: sizes first (nothing resized), then the images at a size."""

    image_size: int
    style_scale: float
    mask_count: int
    """The number of style masks (each at the content's size)."""

    def content_size(self, size: int | None = None) -> tuple[int, int]: ...

    def style_sizes(self, size: int | None = None, style_scale: float | None = None) -> list[tuple[int, int]]: ...

    def inputs(self, size: int | None = None) -> Inputs: ...
