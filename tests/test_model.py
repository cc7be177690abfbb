"""The seam for a second model: a LightningModule other than StyleTransfer, trained through the run's callbacks.

A two-layer image generator (fixed noise in, an image out) is trained for a few Adam steps against fixed style
statistics from the core's extractor and losses. It implements :class:`~nst_lightning.run.model.ImageModel`, and the
writers, the guard and the run record work with it as they do with the optimised image.
"""

from __future__ import annotations

import lightning as L
import torch
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader

from nst_lightning.core.features import FeatureExtractor
from nst_lightning.core.losses import gram_matrix, style_loss
from nst_lightning.run.callbacks import ImageWriter
from nst_lightning.run.guard import RunGuard
from nst_lightning.run.model import ImageModel
from nst_lightning.run.module import StyleTransfer
from nst_lightning.run.runlog import RunRecord

LAYERS = ("relu1_1", "relu2_1")


class TinyGenerator(L.LightningModule):
    """Two convolutions from fixed noise to a 32 x 24 image, against the Gram matrices of a style image."""

    def __init__(self, style: Tensor) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1))
        self.register_buffer("noise", torch.randn(1, 4, 24, 32, generator=torch.Generator().manual_seed(0)))
        self.extractor = FeatureExtractor(LAYERS, backbone="vgg16", weights="random")
        with torch.no_grad():
            self.grams = [gram_matrix(f) for f in self.extractor(style).values()]

    def losses(self) -> dict[str, Tensor]:
        features = self.extractor(self.output_image())
        style = sum(style_loss(gram_matrix(f), g) for f, g in zip(features.values(), self.grams, strict=True))
        return {"total": 1e3 * style, "style": style}

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        return self.losses()["total"]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=1e-2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.arange(100))

    # ImageModel
    def output_image(self) -> Tensor:
        return torch.sigmoid(self.net(self.noise))

    def current_image(self) -> Tensor | None:
        return self.output_image().detach()

    def final_losses(self) -> dict[str, Tensor]:
        return self.losses()

    def output_size(self) -> tuple[int, int] | None:
        return (32, 24)

    def checkpoint_bytes(self, max_steps: int) -> int:
        return 2 * sum(p.numel() * p.element_size() for p in self.parameters())


def test_both_models_are_image_models():
    assert issubclass(StyleTransfer, ImageModel)
    assert isinstance(TinyGenerator(torch.rand(1, 3, 24, 32)), ImageModel)


def test_a_second_model_trains_through_the_same_callbacks(tmp_path):
    torch.manual_seed(0)
    model = TinyGenerator(torch.rand(1, 3, 24, 32))
    before = float(model.losses()["total"].detach())
    output = tmp_path / "generated.png"
    record = RunRecord()
    trainer = L.Trainer(
        max_steps=8,
        callbacks=[ImageWriter(str(output), snapshot_every_n_steps=4, log_image_every_n_steps=0), RunGuard(), record],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(model)
    assert trainer.global_step == 8
    with Image.open(output) as image:
        assert image.size == (32, 24)
    assert set(record.final_losses) == {"total", "style"}
    assert record.final_losses["total"] < before, "the generator learnt nothing"
