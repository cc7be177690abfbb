"""The real command on a trained network: the ImageNet VGG-16 in ``../shared/weights`` (skipped where it is absent).

Every other test runs on random weights, which say nothing about whether the tool stylises: these
hold the defaults to what they do on real features, at a small size.
"""

import sys

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nst_lightning.errors import NumericalError
from nst_lightning.main import cli_main
from tests.conftest import REPO

TRAINED = REPO.parent / "shared" / "weights" / "vgg16_imagenet_keras.pth"
CONTENT = REPO / "nst_lightning" / "samples" / "content_tubingen.jpg"

pytestmark = pytest.mark.skipif(not TRAINED.is_file(), reason=f"no trained network at {TRAINED}")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    monkeypatch.chdir(REPO)  # the configs' paths are relative to the repository root


def run(tmp_path, *args: str) -> list[float]:
    """The fit command with the default config on the trained VGG-16; returns the logged losses."""
    cli_main(
        [
            "fit",
            "--config",
            str(REPO / "configs" / "default.yaml"),
            *args,
            "--model.backbone",
            "vgg16",
            "--model.weights",
            str(TRAINED),
            "--trainer.accelerator",
            "cpu",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.enable_progress_bar",
            "false",
            "--trainer.enable_model_summary",
            "false",
            "--output.path",
            str(tmp_path / "out.png"),
        ]
    )
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    return [event.value for event in events.Scalars("loss")]


@pytest.mark.slow
def test_the_default_config_stylises_on_a_trained_network(tmp_path):
    losses = run(tmp_path, "--data.image_size", "128", "--trainer.max_steps", "40")
    assert all(np.isfinite(losses)) and len(losses) == 40
    assert losses[-1] <= losses[0] / 10, f"the loss fell from {losses[0]:.4g} to {losses[-1]:.4g} only"
    output = np.asarray(Image.open(tmp_path / "out.png"), dtype=np.float32) / 255
    content = np.asarray(Image.open(CONTENT).resize(output.shape[1::-1], Image.Resampling.LANCZOS)) / 255
    assert np.abs(output - content).mean() > 0.05, "the image barely moved from the content photo"


def test_the_normalised_network_is_recorded_in_the_saved_config(tmp_path):
    run(tmp_path, "--data.image_size", "32", "--trainer.max_steps", "1")
    import yaml

    saved = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    means = saved["model"]["layer_means"]
    assert saved["model"]["normalize"] is True
    # Caffe's activation scale (the reason normalisation is needed): tens to hundreds.
    assert 10 < means["conv1_1"] < 100 and 100 < means["conv3_1"] < 1000


# The first steps of every shipped config, shrunk (resnet18.yaml needs ResNet weights, not this file).
OVERLAYS = sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in ("batch.yaml", "resnet18.yaml"))
SHRINK = {
    "multiscale.yaml": ["--model.scales", "[64, 96]", "--model.scale_steps", "[8, 8]"],
    "print.yaml": ["--model.scales", "[64, 96]", "--model.scale_steps", "[8, 8]", "--model.tile_size", "64"],
}


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_shipped_config_starts_safely_on_a_trained_network(tmp_path, overlay):
    extra = [] if overlay == "default.yaml" else ["--config", str(REPO / "configs" / overlay)]
    try:
        losses = run(tmp_path, *extra, "--data.image_size", "96", "--trainer.max_steps", "16", *SHRINK.get(overlay, []))
    except (NumericalError, SystemExit) as err:
        pytest.fail(f"{overlay} failed on the trained network: {err}")
    assert all(np.isfinite(losses)) and all(loss >= 0 for loss in losses), losses
    assert max(losses[1:]) < 2 * losses[0], f"{overlay}: the loss jumped at the start: {losses}"
    assert losses[-1] < losses[0]
