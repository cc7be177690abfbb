"""nst-lightning: Gatys-style neural style transfer as a PyTorch Lightning training loop.

The classes are imported when first used (PEP 562), so that ``nst-lightning --version`` and the help do not
wait for torch and Lightning to load.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Each public class and the module that defines it.
_EXPORTS = {
    "AtomicCheckpointIO": "nst_lightning.checkpoint",
    "FeatureExtractor": "nst_lightning.features",
    "ImageWriter": "nst_lightning.callbacks",
    "Objective": "nst_lightning.objective",
    "RunGuard": "nst_lightning.guard",
    "StyleTransfer": "nst_lightning.module",
    "StyleTransferDataModule": "nst_lightning.data",
}
__all__ = [
    "AtomicCheckpointIO",
    "FeatureExtractor",
    "ImageWriter",
    "Objective",
    "RunGuard",
    "StyleTransfer",
    "StyleTransferDataModule",
]

if TYPE_CHECKING:
    from nst_lightning.callbacks import ImageWriter
    from nst_lightning.checkpoint import AtomicCheckpointIO
    from nst_lightning.data import StyleTransferDataModule
    from nst_lightning.features import FeatureExtractor
    from nst_lightning.guard import RunGuard
    from nst_lightning.module import StyleTransfer
    from nst_lightning.objective import Objective


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nst_lightning' has no attribute {name!r}")
