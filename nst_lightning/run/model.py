"""What the run's callbacks ask of a LightningModule: a small protocol, so that a second model (a feed-forward
network trained on photos, say) reuses the writers, the guard, the run record and the web progress.

:class:`~nst_lightning.run.module.StyleTransfer` is one such model; ``tests/test_model.py`` trains another, a
two-layer image generator, through the same callbacks. A module that is not an :class:`ImageModel` is still run:
the callbacks then skip what they cannot know (the room on disk, the still-image watch, the final losses).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor


@runtime_checkable
class ImageModel(Protocol):
    """A model whose result is an image."""

    def output_image(self) -> Tensor:
        """The current result, (1, 3, H, W) RGB in [0, 1]: what the writers save and the web page shows."""
        ...

    def current_image(self) -> Tensor | None:
        """Where the run is: the image tensor the optimiser changes, or a generator's output; None before the run
        has one. The guard watches it for a run that no longer moves and for a change of size between scales, and
        an interrupted run saves nothing while it is None or not finite."""
        ...

    def final_losses(self) -> dict[str, Tensor]:
        """The named losses of the current result (``total`` among them), for the run's record."""
        ...

    def output_size(self) -> tuple[int, int] | None:
        """(width, height) of the result, known before the run starts (the room its files need), or None."""
        ...

    def checkpoint_bytes(self, max_steps: int) -> int:
        """About how many bytes one checkpoint of a ``max_steps`` run holds (the image, the optimiser's state)."""
        ...


def image_model(module: object) -> ImageModel | None:
    """``module`` as an :class:`ImageModel`, or None."""
    return module if isinstance(module, ImageModel) else None
