"""The real entry point on a shrunken config (CPU, 32 px, random weights, a few steps)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nst_lightning.main import cli_main
from nst_lightning.run.data import StyleTransferDataModule
from nst_lightning.run.module import StyleTransfer
from tests.conftest import REPO, make_image, write_config


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    # cli_main(args) stands for the command line: pytest's own arguments must not leak into it.
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def run_cli(*args: str) -> None:
    cli_main(["fit", *args])


def version_dir(tmp_path: Path, n: int = 0) -> Path:
    return tmp_path / "runs" / "lightning_logs" / f"version_{n}"


def scalars(run: Path) -> EventAccumulator:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def test_fit_writes_output_checkpoint_and_tensorboard(tmp_path, images):
    config = write_config(tmp_path, images, trainer={"max_steps": 8})
    run_cli("--config", str(config))

    output = tmp_path / "out" / "result.png"
    assert Image.open(output).size == (32, 24)
    run = version_dir(tmp_path)
    assert list((run / "checkpoints").glob("*step=8.ckpt"))
    assert sorted(p.name for p in (run / "snapshots").iterdir()) == [f"step_00000{i}.png" for i in (2, 4, 6, 8)]
    assert (run / "config.yaml").exists()

    acc = scalars(run)
    tags = acc.Tags()["scalars"]
    for tag in ("loss", "loss/content", "loss/style", "loss/style_relu1_1", "loss/style_relu5_1", "loss/tv"):
        assert tag in tags, tag
    losses = [event.value for event in acc.Scalars("loss")]
    assert len(losses) == 8, "one scalar per step"
    assert losses[-1] < losses[0]
    assert "image" in acc.Tags()["images"]
    hparams = (run / "hparams.yaml").read_text()
    assert "style_weight" in hparams and "image_size" in hparams


def test_resume_from_checkpoint_continues_the_run(tmp_path, images):
    config = write_config(tmp_path, images, trainer={"max_steps": 3})
    run_cli("--config", str(config))
    ckpt = next((version_dir(tmp_path, 0) / "checkpoints").glob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=True)["state_dict"]["image"]
    run_cli("--config", str(config), "--trainer.max_steps", "6", "--ckpt_path", str(ckpt), "--overwrite")
    # It goes on in the run folder of the checkpoint: one run, one curve in TensorBoard.
    resumed = version_dir(tmp_path, 0)
    assert not version_dir(tmp_path, 1).exists()
    assert list((resumed / "checkpoints").glob("*step=6.ckpt"))
    # Each fit writes an event file; TensorBoard reads them in the order of their names, which within one second
    # carry a per-process counter ("...9" after "...10"): the steps, not the reading order, make the curve.
    events = {event.step: event.value for event in scalars(resumed).Scalars("loss")}
    assert sorted(events) == [0, 1, 2, 3, 4, 5], "the resumed run continues the step count in the same run"
    assert len(scalars(resumed).Scalars("loss")) == 6, "no step logged twice"
    # The loss logged at the resumed run's first step is the loss of the saved image.
    resumed_first = events[3]
    module = StyleTransfer(weights="random", init="noise")
    with torch.no_grad():
        module.set_targets(StyleTransferDataModule(str(images["content"]), str(images["style"]), 32).inputs())
        assert float(module(saved)["total"]) == pytest.approx(resumed_first, rel=1e-4)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_parses(config, capsys):
    overlay = [] if config == "default.yaml" else ["--config", str(REPO / "configs" / config)]
    command = "batch" if config == "batch.yaml" else "fit"  # the batch overlay is for the batch command
    with pytest.raises(SystemExit) as exit_info:
        cli_main([command, "--config", str(REPO / "configs" / "default.yaml"), *overlay, "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "max_steps" in printed and "style_weight" in printed


def test_default_config_holds_the_seed_defaults(capsys):
    with pytest.raises(SystemExit):
        run_cli("--config", str(REPO / "configs" / "default.yaml"), "--print_config")
    import yaml

    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["max_steps"] == 300
    assert config["trainer"]["accelerator"] == "auto"
    assert config["model"]["backbone"] == "auto" and config["model"]["weights"] == "imagenet"  # auto: vgg19 here
    assert config["model"]["content_weight"] == 1.0 and config["model"]["style_weight"] == 1e6
    assert config["model"]["optimizer"] == "lbfgs"
    assert config["data"]["image_size"] == 512
    for key in ("content", "style"):  # relative to the config file
        assert (REPO / "configs" / config["data"][key]).is_file()


def _expect_one_line_error(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(*args)
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out" / "result.png").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        (["--data.content", "/no/such/image.png"], "image not found"),
        (["--model.content_layers", "[conv4_9]"], "unknown layer name"),
        (["--data.image_size", "8"], "at least 16 px"),
        (["--model.weights", "/no/such/vgg19.pth"], "weights file not found"),
        (["--output.path", "/proc/forbidden/out.png"], "cannot write"),
        (["--model.style_weight", "-5"], "style_weight must be"),
    ],
)
def test_bad_input_gets_one_clear_line(tmp_path, images, capsys, override, message):
    config = write_config(tmp_path, images)
    _expect_one_line_error(tmp_path, capsys, ["--config", str(config), *override], message)


def test_a_file_that_is_not_an_image(tmp_path, images, capsys):
    fake = tmp_path / "fake.png"
    fake.write_text("hello")
    config = write_config(tmp_path, images)
    _expect_one_line_error(tmp_path, capsys, ["--config", str(config), "--data.style", str(fake)], "not an image")


def test_real_process_reports_bad_input_without_traceback(tmp_path, images):
    config = write_config(tmp_path, images, data={"content": str(tmp_path / "missing.jpg")})
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "fit", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "nst-lightning: error: image not found" in result.stderr


OVERLAY_OVERRIDES = {
    "multiscale.yaml": ["--model.scales", "[32, 64]", "--model.scale_steps", "[1, 1]"],
    "print.yaml": ["--model.scales", "[32, 64]", "--model.scale_steps", "[1, 1]", "--model.tile_size", "64"],
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "overlay", sorted(p.name for p in (REPO / "configs").glob("*.yaml") if p.name not in ("default.yaml", "batch.yaml"))
)
def test_every_example_config_runs_in_miniature(tmp_path, monkeypatch, overlay):
    """Each shipped overlay, on the shipped sample images, shrunk to 64 px and 2 steps."""
    monkeypatch.chdir(tmp_path)  # the configs' paths are relative to the configs: any folder will do
    run_cli(
        "--config",
        str(REPO / "configs" / "default.yaml"),
        "--config",
        str(REPO / "configs" / overlay),
        "--model.weights",
        "random",
        "--data.image_size",
        "64",
        "--trainer.max_steps",
        "2",
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
        "--output.path",
        str(tmp_path / "out.png"),
        *OVERLAY_OVERRIDES.get(overlay, []),
    )
    assert max(Image.open(tmp_path / "out.png").size) == 64


# ---------------------------------------------------------------- configuration refused before anything loads


def _must_not_load(*args, **kwargs):
    raise AssertionError("the backbone weights were loaded although the configuration was refused")


@pytest.mark.parametrize(
    "args, config_overrides, message",
    [
        (["--model.bogus", "1"], {}, "unrecognized arguments: --model.bogus"),
        ([], {"model": {"bogus": 1}}, "bogus"),
        (["--model.style_weight", "abc"], {}, "Parser key \"model.style_weight\": Expected a <class 'float'>"),
        (["--trainer.max_steps", "many"], {}, 'Parser key "trainer.max_steps"'),
    ],
)
def test_unknown_keys_and_wrong_types_get_one_line(
    tmp_path, images, capsys, monkeypatch, args, config_overrides, message
):
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    config = write_config(tmp_path, images, **config_overrides)
    with pytest.raises(SystemExit) as exit_info:
        run_cli("--config", str(config), *args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("nst-lightning: error:") and err.count("\n") == 1, err
    # jsonargparse's own messages changed case over its versions ("Unrecognized arguments").
    assert message.lower() in err.lower() and "--help" in err and "usage" not in err


@pytest.mark.parametrize(
    "override, message",
    [
        (["--data.style_blend_weights", "[-1.0]"], ">= 0 with a positive sum"),
        (["--data.style_blend_weights", "[1.0, 2.0]"], "one weight per style"),
        (["--model.backbone", "alexnet"], "unknown backbone"),
        (["--trainer.max_steps", "0"], "trainer.max_steps must be at least 1"),
        (["--trainer.max_steps", "-1"], "trainer.max_steps must be at least 1"),
        (["--data.image_size", "0"], "data.image_size must be a positive"),
        (["--model.style_layers", "[conv1_1, relu9_9]"], "unknown layer name(s) relu9_9"),
        (["--model.content_weight", "0", "--model.style_weight", "0"], "both 0"),
        (["--model.tv_weight", "-1"], "tv_weight must be"),
        (["--model.lbfgs_history_size", "0"], "lbfgs_history_size must be at least 1"),
        (["--output.snapshot_every_n_steps", "-5"], "snapshot_every_n_steps must be 0 (off)"),
        (["--guard.stall_steps", "-1"], "guard.stall_steps must be 0 (off)"),
        (["--output.path", "out/result.gif89"], "cannot tell the image format"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_the_weights_load(
    tmp_path, images, capsys, monkeypatch, override, message
):
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    config = write_config(tmp_path, images)
    _expect_one_line_error(tmp_path, capsys, ["--config", str(config), *override], message)


def test_mask_of_the_wrong_size_gets_one_clear_line(tmp_path, images, capsys):
    mask = tmp_path / "mask.png"
    Image.new("L", (7, 7), 255).save(mask)
    config = write_config(tmp_path, images, data={"style_masks": [str(mask)]})
    _expect_one_line_error(tmp_path, capsys, ["--config", str(config)], "give masks of the content image's size")


def test_an_unwritable_log_folder_is_refused_before_anything_runs(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    config = write_config(tmp_path, images, trainer={"default_root_dir": str(blocker / "runs")})
    _expect_one_line_error(tmp_path, capsys, ["--config", str(config)], "cannot write to trainer.default_root_dir")


# ---------------------------------------------------------------- odd images through the whole tool


def test_one_pixel_images_run(tmp_path, capsys):
    dots = {"content": make_image(tmp_path / "c.png", 1, 1, seed=1), "style": make_image(tmp_path / "s.png", 1, 1)}
    config = write_config(tmp_path, dots, trainer={"max_steps": 2})
    run_cli("--config", str(config))
    assert Image.open(tmp_path / "out" / "result.png").size == (32, 32)


def test_a_very_thin_image_is_one_clear_line(tmp_path, images, capsys):
    thin = make_image(tmp_path / "thin.png", 1000, 1)
    config = write_config(tmp_path, images, data={"content": str(thin)})
    _expect_one_line_error(tmp_path, capsys, ["--config", str(config)], "32x1 px after resizing")


def test_a_decompression_bomb_is_one_clear_line(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setenv("NST_MAX_IMAGE_PIXELS", "500")  # the 40x30 content image is 1,200 pixels
    config = write_config(tmp_path, images)
    _expect_one_line_error(tmp_path, capsys, ["--config", str(config)], "NST_MAX_IMAGE_PIXELS=1200")


def test_a_run_that_cannot_fit_in_memory_is_refused_with_a_smaller_size(tmp_path, images, capsys, monkeypatch):
    monkeypatch.setattr("nst_lightning.run.runtime.available_bytes", lambda device="cpu": 2 * 2**30)
    config = write_config(tmp_path, images, data={"image_size": 4096})
    _expect_one_line_error(tmp_path, capsys, ["--config", str(config)], "try data.image_size")


def test_top_level_help_names_both_commands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "fit" in out and "batch" in out and "style transfer" in out


@pytest.mark.parametrize(
    "amx, args, expected",
    [
        (True, [], "bf16-mixed"),  # nothing set, a CPU with AMX: the faster precision
        (True, ["--trainer.precision", "32-true"], "32-true"),  # the user's choice stands
        (False, [], None),  # no AMX: Lightning's default, 32-true
    ],
)
def test_precision_is_chosen_only_where_the_config_sets_none(
    tmp_path, images, monkeypatch, caplog, amx, args, expected
):
    import yaml

    monkeypatch.setattr("nst_lightning.run.runtime.cpu_has_amx_bf16", lambda: amx)
    config = write_config(tmp_path, images, trainer={"max_steps": 2})
    with caplog.at_level("INFO"):
        run_cli("--config", str(config), *args)
    saved = yaml.safe_load((version_dir(tmp_path) / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == expected
    assert ("AMX" in caplog.text) == (expected == "bf16-mixed" and not args)
    assert (tmp_path / "out" / "result.png").exists()
