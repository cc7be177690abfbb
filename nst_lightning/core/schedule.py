"""Coarse to fine: which image size each step runs at. Pure functions of the settings (checked in
:func:`nst_lightning.run.checks.check_scales` and :func:`~nst_lightning.run.checks.check_schedule`)."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import accumulate


def sizes(scales: Sequence[int] | None, image_size: int) -> list[int]:
    """The longest side of the image at each scale: ``scales`` (ending at ``image_size``), or ``image_size`` alone."""
    return [image_size] if scales is None else list(scales)


def scale_at(step: int, scale_steps: Sequence[int] | None) -> int:
    """The index of the scale that step ``step`` (from 0) runs at: each scale for its ``scale_steps``
    iterations, then any further steps at the last scale."""
    if scale_steps is None:
        return 0
    done = sum(1 for end in accumulate(scale_steps) if end <= step)
    return min(done, len(scale_steps) - 1)
