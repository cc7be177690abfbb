import functools
from pathlib import Path

import pytest
from lightning import Trainer

from nst_lightning.errors import ConfigError, ImageError
from nst_lightning.run.data import StyleTransferDataModule


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


def test_the_data_module_hands_the_module_its_images(images, tmp_path):
    # Pushed forward: the data module's setup gives the module its images; the module never looks for them.
    from tests.conftest import make_module, make_trainer

    module, dm = make_module(), StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    make_trainer(tmp_path, steps=1).fit(module, datamodule=dm)
    assert module.images is dm
    source = (Path(__file__).parents[1] / "nst_lightning" / "run" / "module.py").read_text()
    assert "datamodule" not in source.replace("StyleTransferDataModule", "")


def test_the_command_line_builds_the_data_module_once(images, tmp_path, monkeypatch):
    import sys

    from nst_lightning.main import cli_main
    from tests.conftest import write_config

    built = []
    real = StyleTransferDataModule.__init__

    @functools.wraps(real)  # the same signature: jsonargparse reads the configuration from it
    def counting(self, *args, **kwargs):
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(StyleTransferDataModule, "__init__", counting)
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    cli_main(["fit", "--config", str(write_config(tmp_path, images, trainer={"max_steps": 1}))])
    assert built == [1]
