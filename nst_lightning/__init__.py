"""nst-lightning: Gatys-style neural style transfer as a PyTorch Lightning training loop."""

from nst_lightning.callbacks import ImageWriter
from nst_lightning.checkpoint import AtomicCheckpointIO
from nst_lightning.data import StyleTransferDataModule
from nst_lightning.features import FeatureExtractor
from nst_lightning.guard import RunGuard
from nst_lightning.module import StyleTransfer
from nst_lightning.objective import Objective

__all__ = [
    "AtomicCheckpointIO",
    "FeatureExtractor",
    "ImageWriter",
    "Objective",
    "RunGuard",
    "StyleTransfer",
    "StyleTransferDataModule",
]
__version__ = "0.1.0"
