import pytest
from lightning import Trainer

from nst_lightning.data import StyleTransferDataModule
from nst_lightning.errors import ConfigError, ImageError


def test_setup_loads_both_images_at_the_requested_size(images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=20)
    dm.setup("fit")
    inputs = dm.inputs()
    assert inputs.content.shape == (1, 3, 15, 20)  # 40x30 content, aspect kept
    assert [s.shape for s in inputs.styles] == [(1, 3, 20, 20)]
    assert inputs.content.is_contiguous() and inputs.masks is None and inputs.blend == [1.0]
    assert dm.inputs(8).content.shape == (1, 3, 6, 8)


def test_loader_paces_one_item_per_step(images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]))
    dm.trainer = Trainer(max_steps=7, accelerator="cpu", logger=False, enable_checkpointing=False)
    assert len(dm.train_dataloader()) == 7


def test_bad_inputs(images, tmp_path):
    with pytest.raises(ConfigError, match="image_size"):
        StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=0)
    dm = StyleTransferDataModule(str(tmp_path / "missing.png"), str(images["style"]))
    with pytest.raises(ImageError, match="image not found"):
        dm.setup("fit")
