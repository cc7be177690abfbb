"""The data side: content and style images in, tensors out, and a loader that paces the steps."""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader

from nst_lightning.errors import ConfigError
from nst_lightning.image_io import load_image


class _PacingLoader(DataLoader):
    """A loader of step indices. It holds no state worth saving (every item is just a tick), so it
    declares itself resumable: a run resumed mid-epoch simply goes on until ``max_steps``."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: dict) -> None:
        pass


class StyleTransferDataModule(L.LightningDataModule):
    """Loads the content and style images and paces the optimisation.

    Args:
        content: path of the content image (the photo whose layout is kept).
        style: path of the style image (the painting whose textures and colours are taken).
        image_size: pixels on the longest side of the output; the content's aspect ratio is kept.
    """

    def __init__(self, content: str, style: str, image_size: int = 512) -> None:
        super().__init__()
        if image_size < 1:
            raise ConfigError(f"data.image_size must be a positive number of pixels, got {image_size}")
        self.save_hyperparameters()
        self.content = content
        self.style = style
        self.image_size = image_size
        self.content_image: torch.Tensor | None = None
        self.style_image: torch.Tensor | None = None

    def setup(self, stage: str) -> None:
        """Reads both images once: (1, 3, H, W) float tensors in [0, 1], longest side ``image_size``."""
        if self.content_image is None:
            self.content_image = load_image(self.content, self.image_size)
            self.style_image = load_image(self.style, self.image_size)

    def train_dataloader(self) -> DataLoader:
        """One item per optimisation step: the image is the model, so the loader only paces the loop.

        One epoch spans the whole run (``trainer.max_steps`` items) so the progress bar shows it.
        """
        max_steps = self.trainer.max_steps if self.trainer is not None else -1
        return _PacingLoader(range(max(max_steps, 1)), batch_size=None)
