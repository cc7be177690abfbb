"""Checkpoints: atomic writes (a simulated full disk), safe reads, refusal of foreign or mismatched ones."""

import inspect
import io
import os
import re
import resource
import subprocess
import sys
import types

import pytest
import torch
from lightning import Trainer
from PIL import Image

from nst_lightning.errors import CheckpointError
from nst_lightning.main import cli_main
from nst_lightning.run.checkpoint import AtomicCheckpointIO, read_checkpoint
from nst_lightning.run.guard import RunGuard
from tests.conftest import cli_command, leftovers, make_image, write_config


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])


@pytest.fixture
def finished_run(tmp_path, images):
    """A 2-step run: its config and its checkpoint."""
    config = write_config(tmp_path, images, trainer={"max_steps": 2})
    cli_main(["fit", "--config", str(config)])
    (ckpt,) = (tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    return config, ckpt


def test_a_failed_checkpoint_write_keeps_the_previous_file(tmp_path, monkeypatch):
    checkpoint_io = AtomicCheckpointIO()
    target = tmp_path / "run.ckpt"
    checkpoint_io.save_checkpoint({"state_dict": {"image": torch.zeros(2)}}, target)
    before = target.read_bytes()

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode)))
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint there is unchanged"):
        checkpoint_io.save_checkpoint({"state_dict": {"image": torch.ones(2)}}, target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["run.ckpt"]


def test_a_checkpoint_the_memory_cannot_copy_is_streamed_to_its_file(tmp_path, monkeypatch):
    # A 3000 px run under `ulimit -v 12000000` had its image written and then died serialising its L-BFGS history
    # into memory (MemoryError, reported by torch's zip writer as "unexpected pos"): the checkpoint is streamed.
    import nst_lightning.run.checkpoint as checkpoint_module

    class NoRoom(io.BytesIO):
        def write(self, data):
            raise MemoryError

    monkeypatch.setattr(checkpoint_module, "io", types.SimpleNamespace(BytesIO=NoRoom))  # torch's own io untouched
    target = tmp_path / "run.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"image": torch.arange(6.0)}}, target)
    monkeypatch.undo()
    assert torch.equal(torch.load(target, weights_only=True)["state_dict"]["image"], torch.arange(6.0))
    assert os.listdir(tmp_path) == ["run.ckpt"]


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE")
def test_a_full_disk_during_a_run_is_one_line_and_keeps_the_image(tmp_path, images):
    # The child may not write files over 1 MB (EFBIG, as a full disk gives ENOSPC): the images and
    # logs fit, the ~2.5 MB checkpoint at the end of the run does not (the room check before the run
    # sees a disk with room: the limit is on file sizes).
    config = write_config(tmp_path, images, trainer={"max_steps": 3})

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(
        cli_command(config), cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=small_files, env=env
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and "cannot write checkpoint" in lines[0] and "File too large" in lines[0], result.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and leftovers(tmp_path) == []
    # All 3 steps were done: the image is the finished one, said to be complete, at the final path.
    assert "The run's 3 steps are done: wrote the complete image to" in result.stderr
    assert "partial" not in result.stderr and not (tmp_path / "out" / "result.partial.png").exists()
    with Image.open(tmp_path / "out" / "result.png") as img:  # the run's image, written whole
        img.load()
        assert img.size == (32, 24)


class FullDisk:
    """A file whose disk fills up after a few bytes."""

    def __init__(self, handle):
        self.handle = handle

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()

    def write(self, data):
        self.handle.write(b"partial checkpoint")
        self.handle.flush()
        raise OSError(28, "No space left on device")


class Payload:
    """Unpickling this would create a file: weights_only=True must refuse it instead."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _bad_checkpoints(tmp_path, finished):
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    weights = tmp_path / "vgg19.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, weights)
    other_model = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"layer.weight": torch.zeros(1)}, "optimizer_states": [], "loops": {}}, other_model)
    weights_only = tmp_path / "weights-only.ckpt"
    full = torch.load(finished, weights_only=True)
    torch.save({k: v for k, v in full.items() if k not in ("optimizer_states", "loops")}, weights_only)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(finished.read_bytes()[:5000])
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"image": Payload(str(tmp_path / "pwned"))}}, evil)
    return [
        (tmp_path / "missing.ckpt", "checkpoint not found"),
        (tmp_path, "is a folder"),
        (text, "cannot read checkpoint"),
        (weights, "not a Lightning checkpoint"),
        (other_model, "checkpoint of another model"),
        (weights_only, "holds no optimizer_states and no loops"),
        (truncated, "cannot read checkpoint"),
        (evil, "cannot read checkpoint.*weights_only=True"),
    ]


def test_bad_checkpoint_files_get_clear_errors_and_never_run_code(tmp_path, finished_run):
    for path, message in _bad_checkpoints(tmp_path, finished_run[1]):
        with pytest.raises(CheckpointError, match=message):
            read_checkpoint(path)
        with pytest.raises(CheckpointError, match=message):
            AtomicCheckpointIO().load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_cli_refuses_bad_checkpoints_in_one_line_before_loading_the_model(tmp_path, finished_run, capsys, monkeypatch):
    config, ckpt = finished_run
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    for path, message in _bad_checkpoints(tmp_path, ckpt):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(config), "--ckpt_path", str(path)])
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("nst-lightning: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err
        assert re.search(message, lines[0]), lines[0]
    assert not (tmp_path / "pwned").exists()


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was built although the checkpoint was unusable")


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.style_weight", "10"], "model.style_weight was 1000000.0, now 10.0"),
        (["--model.style_layers", "[conv1_1]"], "model.style_layers was"),
        (["--data.image_size", "24"], "data.image_size was 32, now 24"),
    ],
)
def test_resuming_with_other_settings_is_refused(finished_run, capsys, monkeypatch, override, message):
    config, ckpt = finished_run
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--trainer.max_steps", "4", "--ckpt_path", str(ckpt), *override])
    assert exit_info.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and message in lines[0], lines
    assert f"--config {ckpt.parent.parent / 'config.yaml'}" in lines[0]


def test_a_checkpoint_in_the_old_layout_resumes(finished_run, capsys):
    # Checkpoints written before the objective became a module keep its targets and the content image at the top
    # of the state dict (checkpoint.upgrade_state_dict moves them under objective.).
    config, ckpt = finished_run
    checkpoint = torch.load(ckpt, weights_only=True)
    state = checkpoint["state_dict"]
    moved = [key for key in state if key.startswith("objective.")]
    assert moved, "nothing to move: the test no longer checks the upgrade"
    for key in moved:
        state[key.removeprefix("objective.")] = state.pop(key)
    old = ckpt.with_name("old-layout.ckpt")
    torch.save(checkpoint, old)
    cli_main(["fit", "--config", str(config), "--trainer.max_steps", "3", "--ckpt_path", str(old), "--overwrite"])
    assert "done:" in capsys.readouterr().out


def test_resuming_with_another_style_image_is_refused(tmp_path, finished_run, capsys):
    config, ckpt = finished_run
    other = make_image(tmp_path / "other_style.png", 32, 32, seed=7)
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--data.style", str(other), "--overwrite"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and "made from another style image" in lines[0], lines


def test_weights_only_false_is_refused(finished_run, capsys):
    config, ckpt = finished_run
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--weights_only", "false"])
    if "weights_only" in inspect.signature(Trainer.fit).parameters:
        assert exit_info.value.code == 1
        assert "only read with weights_only=True" in capsys.readouterr().err
    else:  # before Lightning 2.6 fit takes no weights_only: the key is unknown, refused as such
        assert exit_info.value.code == 2 and "--weights_only" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="weights_only=True"):
        AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=False)


def test_library_use_refuses_a_checkpoint_of_other_settings(tmp_path, images):
    # Without the CLI, StyleTransfer.on_load_checkpoint makes the same check.
    from tests.conftest import datamodule, make_module, make_trainer

    trainer = make_trainer(tmp_path, 1, callbacks=[RunGuard()])
    trainer.fit(make_module(), datamodule=datamodule(images))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(CheckpointError, match="model.style_weight was 1000000.0, now 10.0"):
        make_trainer(tmp_path, 2, callbacks=[RunGuard()]).fit(
            make_module(style_weight=10.0), datamodule=datamodule(images), ckpt_path=tmp_path / "run.ckpt"
        )


def test_a_checkpoint_of_other_images_is_refused():
    from nst_lightning.run.checkpoint import check_same_targets
    from tests.test_objective import inputs, objective

    loss = objective()
    with torch.no_grad():
        loss.set_targets(inputs())
    state = {name: value.clone() for name, value in loss.state_dict().items() if "targets" in name}
    check_same_targets(loss, state)
    state["style_targets.conv1_1.0.gram"] *= 2
    with pytest.raises(CheckpointError, match="another style image"):
        check_same_targets(loss, state)
    state["content_targets.conv2_1.target"] = torch.zeros(1, 1)
    with pytest.raises(CheckpointError, match="content target .* has shape"):
        check_same_targets(loss, state)
