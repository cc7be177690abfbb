"""Shared fixtures: tiny images, weight files and configs made by the tests themselves."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning import Callback, Trainer
from PIL import Image

from nst_lightning.core.backbones import load_backbone
from nst_lightning.run.data import StyleTransferDataModule
from nst_lightning.run.module import StyleTransfer

REPO = Path(__file__).resolve().parents[1]


def make_image(path: Path, width: int, height: int, seed: int = 0, mode: str = "RGB") -> Path:
    """A small textured RGB image (smooth gradient plus noise), saved in the format of ``path``."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x / max(width - 1, 1), y / max(height - 1, 1), (x + y) / (width + height)], axis=-1)
    pixels = np.clip(base * 200 + rng.integers(0, 55, size=(height, width, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


@pytest.fixture(scope="session", autouse=True)
def means_cache(tmp_path_factory) -> Path:
    """The cache of measured layer means (nst_lightning.io.cache) in a folder of the test session, for the tests
    and the commands they start: never the user's own."""
    from nst_lightning.io.cache import CACHE_ENV

    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(folder))
        yield folder


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    """A 40x30 content PNG and a 32x32 style JPEG."""
    return {
        "content": make_image(tmp_path / "content.png", 40, 30, seed=1),
        "style": make_image(tmp_path / "style.jpg", 32, 32, seed=2),
    }


@pytest.fixture(scope="session")
def vgg19_features_state() -> dict[str, torch.Tensor]:
    """The state dict of a randomly initialised VGG-19 ``features`` block."""
    with pytest.warns(UserWarning, match="random"):
        return load_backbone("vgg19", "random").state_dict()


@pytest.fixture(scope="session")
def weights_file(tmp_path_factory, vgg19_features_state) -> Path:
    """A VGG-19 weights file in torchvision's whole-model layout (``features.N.*`` plus a classifier)."""
    state = {f"features.{k}": v for k, v in vgg19_features_state.items()}
    state["classifier.0.weight"] = torch.zeros(2, 2)  # stands in for the classifier, which is ignored
    path = tmp_path_factory.mktemp("weights") / "vgg19-random.pth"
    torch.save(state, path)
    return path


def write_config(tmp_path: Path, images: dict[str, Path], **overrides) -> Path:
    """A shrunken config (CPU, 32 px, random weights, a few steps) written to ``tmp_path``."""
    config = {
        "trainer": {
            "accelerator": "cpu",
            "max_steps": 4,
            "default_root_dir": str(tmp_path / "runs"),
            "enable_progress_bar": False,
            "enable_model_summary": False,
        },
        "model": {"weights": "random", "init": "noise"},
        "data": {"content": str(images["content"]), "style": str(images["style"]), "image_size": 32},
        "output": {
            "path": str(tmp_path / "out" / "result.png"),
            "snapshot_every_n_steps": 2,
            "log_image_every_n_steps": 2,
        },
    }
    for section, values in overrides.items():
        config.setdefault(section, {}).update(values)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def make_module(**kwargs) -> StyleTransfer:
    kwargs.setdefault("weights", "random")
    kwargs.setdefault("init", "noise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return StyleTransfer(**kwargs)


def make_trainer(tmp_path, steps: int = 5, **kwargs) -> Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return Trainer(
        accelerator="cpu",
        max_steps=steps,
        default_root_dir=tmp_path,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def datamodule(images, size: int = 32) -> StyleTransferDataModule:
    return StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=size)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def cli_command(config: Path, *args: str) -> list[str]:
    """The real command line (``python cli.py fit --config ...``) of this checkout."""
    return [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(config), *args]


def start_cli(tmp_path: Path, config: Path, *args: str, **popen) -> subprocess.Popen:
    """The CLI in a child process; its output goes to ``tmp_path/stdout.txt`` and ``stderr.txt``."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    with open(tmp_path / "stdout.txt", "wb") as out, open(tmp_path / "stderr.txt", "wb") as err:
        return subprocess.Popen(cli_command(config, *args), cwd=tmp_path, stdout=out, stderr=err, env=env, **popen)


def wait_for(condition, timeout: float = 120.0, what: str = "condition") -> None:
    """Poll ``condition()`` every 50 ms; fail after ``timeout`` seconds (a limit, not a timing claim)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def leftovers(folder: Path) -> list[Path]:
    """Temporary files that an atomic write would have removed."""
    return [p for p in folder.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".nst-check-")]
