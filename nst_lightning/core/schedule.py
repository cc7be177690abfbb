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


def work(scale_steps: Sequence[int] | None, costs: Sequence[float], start: int, end: int) -> float:
    """The cost of steps ``start`` to ``end - 1`` (from 0), each step its scale's entry of ``costs`` (one per
    scale: a coarse-to-fine run's large scales cost more a step than its small ones)."""
    if end <= start:
        return 0.0
    bounds = [0, *accumulate(scale_steps or ())]
    total = 0.0
    for index, cost in enumerate(costs):
        first = bounds[index] if index < len(bounds) else bounds[-1]
        last = bounds[index + 1] if index + 1 < len(costs) else max(end, first)  # the last scale takes any more
        total += cost * max(0, min(end, last) - max(start, first))
    return total
