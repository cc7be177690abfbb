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
    "AtomicCheckpointIO": "nst_lightning.run.checkpoint",
    "FeatureExtractor": "nst_lightning.core.features",
    "ImageWriter": "nst_lightning.run.callbacks",
    "Objective": "nst_lightning.core.objective",
    "RunGuard": "nst_lightning.run.guard",
    "StyleTransfer": "nst_lightning.run.module",
    "StyleTransferDataModule": "nst_lightning.run.data",
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
    from nst_lightning.core.features import FeatureExtractor
    from nst_lightning.core.objective import Objective
    from nst_lightning.run.callbacks import ImageWriter
    from nst_lightning.run.checkpoint import AtomicCheckpointIO
    from nst_lightning.run.data import StyleTransferDataModule
    from nst_lightning.run.guard import RunGuard
    from nst_lightning.run.module import StyleTransfer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'nst_lightning' has no attribute {name!r}")
