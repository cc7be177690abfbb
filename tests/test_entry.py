"""What a user meets (issue 15), through the real entry point: the one-shot command, the quiet console and its
summary line, the top-level help, --version, existing outputs, the TensorBoard record, failed runs' folders,
and the hash check of cached weights. Tiny images, random weights, a few steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from nst_lightning import names
from nst_lightning.core.backbones import BACKBONES
from nst_lightning.main import cli_main
from nst_lightning.names import PreserveColor
from tests.conftest import REPO, make_image, write_config

TINY = ["--size", "32", "--steps", "2", "--weights", "random", "--device", "cpu"]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    # cli_main(args) stands for the command line: pytest's own arguments must not leak into it.
    monkeypatch.setattr(sys, "argv", ["cli.py"])


@pytest.fixture
def work(tmp_path, images, monkeypatch) -> Path:
    """An empty working folder outside the checkout, holding a content and a style image."""
    folder = tmp_path / "work"
    folder.mkdir()
    for name in ("content", "style"):
        (folder / images[name].name).write_bytes(images[name].read_bytes())
    monkeypatch.chdir(folder)
    return folder


def command(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m nst_lightning ARGS`` in ``folder``, as a user runs it (no terminal, the checkout's package)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "nst_lightning", *args], cwd=folder, capture_output=True, text=True, env=env, timeout=300
    )


def one_error_line(capsys, args: list[str], message: str, code: int | None = None) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code not in (0, None) and (code is None or exit_info.value.code == code), err
    lines = [line for line in err.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and message.lower() in lines[0].lower() and "Traceback" not in err, err
    return lines[0]


@pytest.mark.slow
def test_the_one_shot_command_writes_the_image_and_says_so_in_one_line(work):
    result = command(work, "content.png", "style.jpg", "-o", "out.png", *TINY)
    assert result.returncode == 0, result.stderr
    assert Image.open(work / "out.png").size == (32, 24)
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    assert lines[0].startswith("done: out.png (2 iterations, final loss ")
    assert "logs and checkpoints in lightning_logs/version_0: tensorboard --logdir lightning_logs" in lines[0]
    run = work / "lightning_logs" / "version_0"
    assert list((run / "checkpoints").glob("*.ckpt")) and (run / "config.yaml").is_file()
    # A quiet console: no Lightning boilerplate, no model summary, warnings as one line without a source path.
    err = result.stderr
    for noise in ("GPU available", "TPU available", "Tip:", "Trainable params", "Seed set", "Epoch 0", "v_num"):
        assert noise not in err, noise
    warnings = [line for line in err.splitlines() if "warning" in line.lower()]
    assert warnings and all(line.startswith("nst-lightning: warning: ") for line in warnings), err
    assert ".py:" not in err
    # The bar counts iterations and shows the loss and the time left (tqdm's "elapsed<remaining").
    assert "stylising" in err and "2/2 iterations [" in err and "<00:00, loss=" in err
    # Not a terminal (a pipe here; a log file): the bar is a line at the start and one at the end, not a redraw
    # per step, and its last line holds the summary's final loss.
    bar = [line for line in err.splitlines() if line.startswith("stylising")]
    assert "\r" not in err and len(bar) == 2 and "0/2 iterations" in bar[0], err
    assert bar[1].endswith(f"loss={re.search(r'final loss ([0-9.e+-]+)', lines[0]).group(1)}]"), (bar, lines)


@pytest.mark.slow
def test_verbose_shows_what_lightning_says(work):
    result = command(work, "content.png", "style.jpg", "-o", "out.png", *TINY, "--verbose")
    assert result.returncode == 0, result.stderr
    assert "GPU available" in result.stderr and "Trainable params" in result.stderr
    assert "features.py:" in result.stderr, "a warning names its source with --verbose"


def test_the_one_shot_flags_become_the_fit_configuration(work, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            [
                "content.png",
                "style.jpg",
                "style.jpg",
                "--size",
                "64",
                "--steps",
                "7",
                "--style-weight",
                "1e5",
                "--content-weight",
                "2",
                "--preserve-color",
                "luminance",
                "--device",
                "cpu",
                "--seed",
                "5",
                "--weights",
                "random",
                "--backbone",
                "vgg16",
                "--config",
                "quick",
                "--set",
                "model.tv_weight=3",
                "--model.pooling",
                "avg",
                "--print_config",
            ]
        )
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["data"]["image_size"] == 64, "a flag wins over --config (quick says 256)"
    assert config["trainer"]["max_steps"] == 7 and config["trainer"]["accelerator"] == "cpu"
    model = config["model"]
    assert (model["style_weight"], model["content_weight"], model["preserve_color"]) == (1e5, 2.0, "luminance")
    assert (model["seed"], config["seed_everything"], model["weights"], model["backbone"]) == (5, 5, "random", "vgg16")
    assert (model["tv_weight"], model["pooling"]) == (3.0, "avg")
    assert config["data"]["content"] == "content.png" and config["data"]["style"] == ["style.jpg", "style.jpg"]
    assert config["output"]["path"] == "outputs/content__style+style.png", "no -o: named after the images"


def test_a_backbone_is_named_once_in_the_vocabulary_that_the_fast_help_reads():
    # names.py is light (the help and the early checks read it before torch loads); the networks are built in
    # core/backbones.py. Adding a backbone there without naming it in names.BACKBONE_NAMES fails here.
    assert names.BACKBONE_NAMES == tuple(BACKBONES)
    assert set(names.IMAGENET_FILE_BYTES) <= set(BACKBONES)
    assert names.PRESERVE_COLORS == get_args(PreserveColor)


@pytest.mark.parametrize(
    "args, message, code",
    [
        (["content.png", "style.jpg", "--size", "0"], "--size must be at least 1", 1),
        (["content.png", "style.jpg", "--steps", "-3"], "--steps must be at least 1", 1),
        (["content.png", "style.jpg", "--style-weight", "nan"], "--style-weight must be a finite number", 1),
        (["content.png", "style.jpg", "--set", "model.tv_weight"], "--set takes KEY=VALUE", 2),
        (["content.png", "style.jpg", "--preserve-color", "blue"], "invalid choice: 'blue'", 2),
        (["content.png", "style.jpg", "--bogus"], "unrecognized arguments: --bogus", 2),
        (["content.png"], "the following arguments are required: STYLE", 2),
        (["content.png", "style.jpg", "--config", "nosuch"], "nor a shipped config of that name", 2),
        (["content.png", "style.jpg", "--model.bogus", "1"], "unrecognized arguments: --model.bogus", 2),
        (["content.png", "style.jpg", "-o", "content.png", *TINY], "would be the same file as data.content", 1),
        (["missing.png", "style.jpg", "-o", "out.png", *TINY], "image not found", 1),
        ([], "give CONTENT STYLE, or a command", 2),
    ],
)
def test_bad_input_to_the_one_shot_command_is_one_line(work, capsys, args, message, code):
    before = {path: path.read_bytes() for path in work.iterdir()}
    one_error_line(capsys, args, message, code)
    assert {path: path.read_bytes() for path in work.iterdir()} == before, "nothing written, nothing changed"


def test_device_gpu_without_a_gpu_is_one_line(work, capsys):
    import torch

    if torch.cuda.is_available() or torch.backends.mps.is_available():
        pytest.skip("this machine has a GPU")
    one_error_line(capsys, ["content.png", "style.jpg", "--device", "gpu"], "--device gpu: torch finds no GPU", 1)


def test_an_existing_output_is_refused_unless_overwrite(work, capsys):
    Image.new("RGB", (5, 5), (1, 2, 3)).save(work / "out.png")
    before = (work / "out.png").read_bytes()
    line = one_error_line(capsys, ["content.png", "style.jpg", "-o", "out.png", *TINY], "exists: pass --overwrite", 1)
    assert "out.png" in line and (work / "out.png").read_bytes() == before
    assert not (work / "lightning_logs").exists(), "refused before anything ran"
    # fit says the same, and --overwrite (or --output.overwrite true) lets both replace it.
    one_error_line(
        capsys,
        [
            "fit",
            "--config",
            "quick",
            "--data.content",
            "content.png",
            "--data.style",
            "style.jpg",
            "--output.path",
            "out.png",
        ],
        "exists: pass --overwrite",
        1,
    )
    cli_main(["content.png", "style.jpg", "-o", "out.png", *TINY, "--overwrite"])
    assert Image.open(work / "out.png").size == (32, 24)


def test_a_batch_refuses_existing_outputs_unless_overwrite_or_skip_existing(tmp_path, images, capsys):
    config = write_config(tmp_path, images, trainer={"max_steps": 1})
    out = tmp_path / "batch"
    args = ["batch", "--config", str(config), "--batch.output_dir", str(out)]
    out.mkdir()
    Image.new("RGB", (5, 5)).save(out / "content__style.png")
    one_error_line(capsys, args, "exists: pass --overwrite to replace them, or --batch.skip_existing true", 1)
    cli_main([*args, "--overwrite"])
    assert Image.open(out / "content__style.png").size == (32, 24)


def test_tensorboard_holds_the_real_settings_and_the_final_losses(tmp_path, images, capsys):
    config = write_config(tmp_path, images, trainer={"max_steps": 3})
    cli_main(["fit", "--config", str(config)])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    acc = EventAccumulator(str(run), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert "hp_metric" not in acc.Tags()["scalars"]
    start = acc.SummaryMetadata("_hparams_/session_start_info").plugin_data.content
    hparams = plugin_data_pb2.HParamsPluginData.FromString(start).session_start_info.hparams
    assert "_instantiator" not in hparams and "style_weight" in hparams and "image_size" in hparams
    assert hparams["max_steps"].number_value == 3 and hparams["precision"].string_value
    experiment = acc.SummaryMetadata("_hparams_/experiment").plugin_data.content
    metrics = [m.name.tag for m in plugin_data_pb2.HParamsPluginData.FromString(experiment).experiment.metric_infos]
    assert {"final/loss", "final/content", "final/style", "final/iterations"} <= set(metrics)
    assert acc.Scalars("final/iterations")[0].value == 3
    final = acc.Scalars("final/loss")[0].value
    assert f"final loss {final:.4g}" in capsys.readouterr().out
    assert "_instantiator" not in (run / "hparams.yaml").read_text()


def test_a_run_that_fails_before_its_first_step_leaves_no_run_folder(tmp_path, images, capsys):
    thin = make_image(tmp_path / "thin.png", 1000, 1)  # refused in the module's setup, after the logger exists
    config = write_config(tmp_path, images, data={"content": str(thin)})
    one_error_line(capsys, ["fit", "--config", str(config)], "32x1 px after resizing", 1)
    assert not (tmp_path / "runs" / "lightning_logs").exists(), list((tmp_path / "runs").rglob("*"))


def test_cached_imagenet_weights_are_hash_checked(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not torchvision's weights")
    config = write_config(tmp_path, images, model={"weights": "imagenet"})
    line = one_error_line(capsys, ["fit", "--config", str(config)], "are not torchvision's", 1)
    assert "not dcbb9e9d" in line and str(cached) in line


def test_the_top_level_help_and_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "nst-lightning {fit,batch}" in out.splitlines()[1]
    for line in ("  fit ", "  batch ", "  configs ", "  CONTENT STYLE ..."):
        assert line in out, line
    cli_main(["--version"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("nst-lightning 0.1.0 (") and lines[1].startswith("torch ")
    assert ", Lightning " in lines[1] and lines[2].startswith("device (--device auto, the default): ")


@pytest.mark.slow
def test_a_zero_style_weight_says_what_the_run_makes(work):
    result = command(work, "content.png", "style.jpg", "-o", "out.png", *TINY, "--style-weight", "0")
    assert result.returncode == 0, result.stderr
    assert "nst-lightning: warning: model.style_weight is 0: the result is the photo" in result.stderr
