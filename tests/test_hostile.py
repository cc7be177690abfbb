"""The holes a probe run as a hostile user found (issue 12), each through the real command: outputs that
are inputs, interrupted batch pairs, special files, full disks, hangs, tracebacks and misleading messages.
Tiny images, random weights, a few steps; a FIFO made with os.mkfifo; a full disk faked by patching."""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import stat
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from lightning import Callback
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nst_lightning.errors import ConfigError
from nst_lightning.main import cli_main
from nst_lightning.run.checkpoint import estimate_checkpoint_bytes
from nst_lightning.run.data import StyleTransferDataModule
from tests.conftest import make_image, write_config

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX FIFOs, links and signals")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    # cli_main(args) stands for the command line: pytest's own arguments must not leak into it.
    monkeypatch.setattr(sys, "argv", ["cli.py"])


@pytest.fixture
def no_hang():
    """Fails a test that blocks (on a FIFO, say) instead of hanging the suite: SIGALRM after 60 s
    interrupts the blocked call (PEP 475 retries it unless the handler raises)."""

    if not hasattr(signal, "SIGALRM"):  # Windows: no alarm, and no FIFOs to block on either
        yield
        return

    def timeout(signum, frame):
        raise TimeoutError("the command blocked (a hang)")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _must_not_load(*args, **kwargs):
    raise AssertionError("the backbone weights were loaded although the run was refused")


def _must_not_resize(*args, **kwargs):
    raise AssertionError("an image was resized although the run was refused")


def one_line(capsys, args: list[str], message: str, code: int = 1) -> str:
    """Runs the command, which must end with ``code`` and one error line containing ``message``."""
    with pytest.raises(SystemExit) as exit_info:
        cli_main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and message in lines[0], err
    return lines[0]


def fit(config: Path, *args: str) -> list[str]:
    return ["fit", "--config", str(config), *args]


def loss_steps(run: Path) -> list[int]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [event.step for event in acc.Scalars("loss")]


# ---------------------------------------------------------------- 1. an output that is an input


@posix_only
@pytest.mark.parametrize("how", ["content", "symlink", "hard link", "style", "mask"])
def test_an_output_that_is_an_input_is_refused_before_anything_runs(tmp_path, images, capsys, monkeypatch, how):
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    content = images["content"]
    mask = tmp_path / "mask.png"
    Image.new("L", (40, 30), 255).save(mask)
    output = {"content": content, "style": tmp_path / "style.png", "mask": mask}.get(how)
    style = images["style"]
    if how == "style":  # a PNG style, so that the output's extension can name it
        style = make_image(tmp_path / "style.png", 32, 32, seed=2)
    if how == "symlink":
        output = tmp_path / "link.png"
        output.symlink_to(content)
    if how == "hard link":
        output = tmp_path / "hard.png"
        os.link(content, output)
    config = write_config(tmp_path, {"content": content, "style": style}, data={"style_masks": [str(mask)]})
    before = {path: path.read_bytes() for path in (content, style, mask)}
    line = one_line(capsys, fit(config, "--output.path", str(output)), "which the run would replace")
    assert f"output.path {output}" in line and "choose another output.path" in line
    assert {path: path.read_bytes() for path in before} == before


def test_the_runs_config_file_may_not_be_the_config_it_reads(tmp_path, images, capsys, monkeypatch):
    # A logger with a fixed version writes its config.yaml where the --config file is: refused.
    config = write_config(tmp_path, images, trainer={"max_steps": 2})
    logger = "{class_path: lightning.pytorch.loggers.TensorBoardLogger, init_args: {save_dir: runs, version: 0}}"
    monkeypatch.chdir(tmp_path)
    cli_main(fit(config, "--trainer.logger", logger))
    saved = tmp_path / "runs" / "lightning_logs" / "version_0" / "config.yaml"
    before = saved.read_bytes()
    line = one_line(capsys, fit(saved, "--trainer.logger", logger, "--overwrite"), "the run's config file")
    assert f"--config {saved}" in line
    assert saved.read_bytes() == before


def test_a_batch_that_would_write_over_its_images_is_refused(tmp_path, images, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = make_image(folder / "photo.png", 40, 30, seed=1)
    before = photo.read_bytes()
    config = write_config(tmp_path, images, trainer={"max_steps": 2})
    args = ["batch", "--config", str(config), "--batch.contents", str(folder), "--batch.styles", str(images["style"])]
    line = one_line(capsys, [*args, "--batch.output_dir", str(folder), "--batch.name", "{content}.png"], "replace")
    assert "batch.contents" in line and "photo.png" in line
    assert photo.read_bytes() == before and os.listdir(folder) == ["photo.png"]


# ---------------------------------------------------------------- 2, 3. an interrupted batch pair


class InterruptOnce(Callback):
    """Sends SIGINT to this process as step ``step`` of the pair whose content is ``content`` starts
    (the pair stops after it), once (a marker file remembers it): the same command run again is not
    interrupted."""

    def __init__(self, content: str, step: int, marker: str):
        self.content, self.step, self.marker = content, step, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        mine = Path(trainer.datamodule.content).name == self.content
        if mine and trainer.global_step == self.step and not Path(self.marker).exists():
            Path(self.marker).touch()
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.slow
@posix_only
def test_an_interrupted_batch_pair_is_never_taken_for_done_and_resumes(tmp_path, images, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for n in (1, 2, 3):
        make_image(folder / f"c{n}.png", 32, 32, seed=n)
    config = write_config(tmp_path, images, trainer={"max_steps": 6}, output={"log_image_every_n_steps": 0})
    stop = (
        "--trainer.callbacks+={class_path: tests.test_hostile.InterruptOnce, "
        f"init_args: {{content: c2.png, step: 2, marker: {tmp_path / 'interrupted'}}}}}"
    )
    out = tmp_path / "batch_out"
    command = ["batch", "--config", str(config), "--batch.contents", str(folder)]
    command += ["--batch.styles", str(images["style"]), "--batch.output_dir", str(out), stop]

    with pytest.raises(SystemExit) as exit_info:
        cli_main(command)
    assert exit_info.value.code == 130
    captured = capsys.readouterr()
    err = captured.err
    (line,) = [line for line in err.splitlines() if line.startswith("nst-lightning: interrupted:")]
    # The summary counts every pair, the one not started too, and the interrupted pair's real time.
    assert "batch: 1 of 3 pairs done, 0 failed, 1 interrupted, 1 not started" in captured.out
    (stopped,) = [row for row in captured.out.splitlines() if row.lstrip().startswith("INTERRUPTED")]
    assert "stopped after step 3 of 6" in stopped and "(0.0 s)" not in stopped
    assert re.search(r"not run +3 .*c3\.png x .*: not started", captured.out)
    # The partial image has a name that says so; the final path does not exist (2).
    assert not (out / "c2__style.png").exists() and (out / "c2__style.partial.png").is_file()
    assert f"the partial image is in {out / 'c2__style.partial.png'}" in line
    # The advice is what works (3): not --ckpt_path, which batch does not take.
    pending = tmp_path / "runs" / "lightning_logs" / "batch" / "c2__style" / "interrupted.ckpt"
    assert "--ckpt_path" not in line
    assert line.endswith(
        "to go on, run the same command again, with --batch.skip_existing true to skip the 1 pair(s) done: "
        f"pair 2 resumes from its checkpoint {pending}"
    )
    assert torch.load(pending, weights_only=True)["global_step"] == 3

    # Run again as advised: pair 1 is skipped, pair 2 resumes at step 3 (it is not "skipped (exists)").
    assert (out / "c1__style.png").is_file()
    cli_main([*command, "--batch.skip_existing", "true"])  # exit status 0: no SystemExit
    captured = capsys.readouterr()
    assert "pair 1/3 skipped" in captured.err and f"pair 2/3: resuming from {pending}" in captured.err
    assert "batch: 2 of 3 pairs done, 0 failed, 1 skipped" in captured.out
    runs = sorted((pending.parent).glob("version_*"))
    assert len(runs) == 1, "the pair went on in the run folder it was interrupted in"
    assert loss_steps(runs[0]) == [0, 1, 2, 3, 4, 5], "the pair went on from its checkpoint"
    assert (out / "c2__style.png").is_file() and not (out / "c2__style.partial.png").exists()
    assert not pending.exists(), "a finished pair's checkpoint is not resumed again"


def test_a_batch_checkpoint_of_other_settings_starts_the_pair_over(tmp_path, images, capsys):
    from nst_lightning.batch.command import BatchCLI
    from nst_lightning.batch.pairs import make_pairs, pending_checkpoint
    from nst_lightning.batch.runs import fit_pair

    config = write_config(tmp_path, images, trainer={"max_steps": 2}, output={"log_image_every_n_steps": 0})
    cli_main(["fit", "--config", str(config)])  # a checkpoint of a run with style_weight 1e6
    (ckpt,) = (tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    args = ["--config", str(config), "--batch.output_dir", str(tmp_path / "b"), "--model.style_weight", "10"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = BatchCLI(args)
    (pair,) = make_pairs([images["content"]], [images["style"]], tmp_path / "b", "{content}.png")
    pending = pending_checkpoint(cli.root_dir, pair)
    pending.parent.mkdir(parents=True)
    shutil.copy(ckpt, pending)
    assert fit_pair(cli, pair, {})[0]
    err = capsys.readouterr().err
    assert "cannot resume from" in err and "model.style_weight was 1000000.0, now 10.0" in err
    assert "starting the pair over" in err and (tmp_path / "b" / "content.png").is_file()
    assert not pending.exists()


# ---------------------------------------------------------------- 4. special files as outputs


@posix_only
@pytest.mark.parametrize("kind", ["fifo", "link to /dev/null", "character device"])
def test_an_output_that_is_a_special_file_is_left_alone(tmp_path, images, capsys, monkeypatch, kind):
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    output = tmp_path / "x.png"
    if kind == "fifo":
        os.mkfifo(output)
    elif kind == "link to /dev/null":
        output.symlink_to("/dev/null")
    else:
        try:
            os.mknod(output, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        except PermissionError:
            pytest.skip("making a device node needs privileges this test does not have")
    config = write_config(tmp_path, images)
    one_line(capsys, fit(config, "--output.path", str(output)), "not a regular file")
    assert not stat.S_ISREG(os.stat(output).st_mode), "the special file is still there"


@posix_only
def test_a_batch_output_that_is_a_special_file_is_refused(tmp_path, images, capsys):
    out = tmp_path / "b"
    out.mkdir()
    os.mkfifo(out / "content__style.png")
    config = write_config(tmp_path, images, trainer={"max_steps": 2})
    one_line(capsys, ["batch", "--config", str(config), "--batch.output_dir", str(out)], "not a regular file")
    assert stat.S_ISFIFO(os.stat(out / "content__style.png").st_mode)


# ---------------------------------------------------------------- 5. a full disk


def test_a_disk_without_room_for_the_run_is_refused_before_the_first_step(tmp_path, images, capsys, monkeypatch):
    real = shutil.disk_usage
    # 20 kB free: the 32x24 image fits, its checkpoint (image, L-BFGS history, targets) does not.
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=20_000))
    config = write_config(tmp_path, images, output={"snapshot_every_n_steps": 0, "log_image_every_n_steps": 0})
    line = one_line(capsys, fit(config), "but only 19.5 kB is free there")
    assert "the run's image, snapshots and checkpoint need about" in line and "free some disk space" in line
    assert not (tmp_path / "out" / "result.png").exists() and not list(tmp_path.rglob("*.ckpt"))


def test_the_checkpoint_estimate_covers_the_real_checkpoint(tmp_path, images):
    config = write_config(tmp_path, images, trainer={"max_steps": 4})
    cli_main(fit(config))
    (ckpt,) = (tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    estimate = estimate_checkpoint_bytes(24, 32, hparams, max_steps=4)
    assert ckpt.stat().st_size <= estimate <= 4 * ckpt.stat().st_size + 2**17


def test_a_finished_image_that_cannot_be_written_is_kept_elsewhere(tmp_path, images, capsys, monkeypatch):
    import nst_lightning.io.image_io as image_io

    real = image_io.atomic_write
    out = tmp_path / "out"

    def full_disk(path, write):
        if Path(path).parent == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(image_io, "atomic_write", full_disk)
    config = write_config(tmp_path, images, trainer={"max_steps": 2})
    line = one_line(capsys, fit(config), "No space left on device")
    kept = Path(line.split("the finished image was saved to ")[1].split(" instead")[0])
    run = tmp_path / "runs" / "lightning_logs" / "version_0"
    assert kept.parent.parent == run and kept.name == "result.png"
    assert Image.open(kept).size == (32, 24)


# ---------------------------------------------------------------- 6. FIFOs as inputs never block


@posix_only
@pytest.mark.parametrize("key", ["--data.content", "--data.style", "--data.style_masks", "--ckpt_path", "--config"])
def test_a_fifo_as_an_input_is_one_line_not_a_hang(tmp_path, images, capsys, no_hang, key):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    config = write_config(tmp_path, images)
    value = f"[{fifo}]" if key == "--data.style_masks" else str(fifo)
    code = 2 if key == "--config" else 1
    line = one_line(capsys, [*fit(config), key, value], "named pipe (FIFO)", code)
    assert str(fifo) in line


# ---------------------------------------------------------------- 7, 9, 10. trainer settings


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trainer.num_nodes", "2"], "would start 2 processes"),
        (["--trainer.devices", "2"], "would start 2 processes"),
        (["--trainer.devices", "2", "--trainer.strategy", "ddp"], "would start 2 processes"),
        (["--trainer.devices", "0"], "trainer.devices 0 selects no device"),
        (["--trainer.accelerator", "mps"], "trainer.accelerator mps cannot be used on this machine"),
        (["--trainer.accelerator", "tpu"], "trainer.accelerator tpu cannot be used on this machine"),
        (["--trainer.accelerator", "gpu"], "trainer.accelerator gpu cannot be used on this machine"),
        (["--trainer.accelerator", "cuda"], "trainer.accelerator cuda cannot be used on this machine"),
    ],
)
def test_trainer_settings_that_cannot_work_are_one_line_before_the_weights_load(
    tmp_path, images, capsys, monkeypatch, no_hang, args, message
):
    accelerator = args[1] if args[0] == "--trainer.accelerator" else None
    if accelerator in ("gpu", "cuda") and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    if accelerator == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has MPS")
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    one_line(capsys, fit(write_config(tmp_path, images), *args), message)


def test_batch_num_nodes_without_other_nodes_is_refused(tmp_path, images, capsys, monkeypatch, no_hang):
    for name in [*os.environ]:  # no launcher announces other nodes
        if name.startswith(("SLURM_", "LSB_", "TORCHELASTIC_")) or name in ("NODE_RANK", "KUBERNETES_PORT"):
            monkeypatch.delenv(name)
    config = write_config(tmp_path, images, trainer={"max_steps": 2})
    args = ["batch", "--config", str(config), "--batch.output_dir", str(tmp_path / "b"), "--batch.num_nodes", "2"]
    monkeypatch.setattr(sys, "argv", ["cli.py", *args])  # a sharded batch re-runs the command line
    one_line(capsys, args, "this process would wait for them forever")


def test_a_binary_config_file_is_one_line(tmp_path, capsys):
    binary = tmp_path / "config.yaml"
    binary.write_bytes(bytes(range(256)) * 4)
    one_line(capsys, ["fit", "--config", str(binary)], "is not a text file", code=2)


# ---------------------------------------------------------------- 8. absurd sizes are refused by estimate


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data.image_size", "100000"], "data.image_size 100000 makes the content image 100000x75000 px"),
        (["--data.image_size", "1000000000"], "lower data.image_size: the images alone fit up to about"),
        (["--data.style_scale", "10000"], "data.style_scale 10000 makes the style image 320000x320000 px"),
    ],
)
def test_absurd_sizes_are_refused_before_anything_is_allocated(tmp_path, images, capsys, monkeypatch, args, message):
    # The refusal comes from the estimate, whatever the machine: never from running out.
    monkeypatch.setattr("nst_lightning.run.runtime.available_bytes", lambda device="cpu": 8 * 2**30)
    monkeypatch.setattr("nst_lightning.core.features.load_backbone", _must_not_load)
    one_line(capsys, fit(write_config(tmp_path, images), *args), message)


def test_a_small_style_enlarged_past_a_thin_content_is_refused_before_it_is_resized(tmp_path, capsys, monkeypatch):
    # A 1024x16 photo and a 32x24 painting at --size 1024: the painting becomes 1024x768, whose forward pass
    # (for the targets) is the run's peak. The content's estimate alone fits; the run is refused all the same.
    from nst_lightning.run.memory import check_fits

    thin, style = make_image(tmp_path / "thin.png", 1024, 16), make_image(tmp_path / "style.png", 32, 24)
    free = 512 * 2**20
    assert check_fits(16, 1024, weights="random", available=free)
    monkeypatch.setattr("nst_lightning.run.runtime.available_bytes", lambda device="cpu": free)
    monkeypatch.setattr("nst_lightning.run.data.resized", _must_not_resize)
    out = tmp_path / "out.png"
    args = [str(thin), str(style), "-o", str(out), "--size", "1024", "--weights", "random", "--device", "cpu"]
    # Without tiles: over tiles (the default where the whole image does not fit) this run fits, and runs.
    line = one_line(capsys, [*args, "--set", "model.tile_size=0"], "a 1024x16 px run with a 1024x768 px style image")
    assert 0 < float(line.split("try data.style_scale ")[1].split(",")[0]) < 1
    assert not out.exists()


def test_the_datamodule_checks_before_it_resizes(images, monkeypatch):
    monkeypatch.setattr("nst_lightning.run.runtime.available_bytes", lambda device="cpu": 8 * 2**30)
    data = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=100_000)
    with pytest.warns(UserWarning, match="upscaling"), pytest.raises(ConfigError, match="lower data.image_size"):
        data.inputs()


# ---------------------------------------------------------------- 11, 12. what a weights file or an image really is


def test_non_finite_weights_are_named_at_load(tmp_path, images, capsys, weights_file):
    state = torch.load(weights_file, weights_only=True)
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    damaged = tmp_path / "nan.pth"
    torch.save(state, damaged)
    line = one_line(capsys, fit(write_config(tmp_path, images), "--model.weights", str(damaged)), "NaN or infinite")
    assert str(damaged) in line and "features.0.weight" in line and "became nan" not in line


@posix_only
@pytest.mark.parametrize(
    "key, make, message",
    [
        ("--model.weights", "fifo", "is a named pipe (FIFO)"),
        ("--model.weights", "/dev/zero", "is a character device, not a weights file"),
        ("--data.content", "loop", "is a symbolic link loop"),
        ("--data.style", "/dev/zero", "is a character device, not an image file"),
    ],
)
def test_an_input_that_is_no_file_says_what_it_is(tmp_path, images, capsys, no_hang, key, make, message):
    path = Path(make)
    if make == "fifo":
        path = tmp_path / "weights.pth"
        os.mkfifo(path)
    elif make == "loop":
        path = tmp_path / "loop.png"
        path.symlink_to(path)
    line = one_line(capsys, fit(write_config(tmp_path, images), key, str(path)), message)
    assert "not found" not in line


# ---------------------------------------------------------------- 14. a 1x1 image is upscaled with a word


def test_a_one_pixel_image_is_upscaled_with_one_warning(tmp_path):
    dots = {"content": make_image(tmp_path / "c.png", 1, 1, seed=1), "style": make_image(tmp_path / "s.png", 1, 1)}
    config = write_config(tmp_path, dots, trainer={"max_steps": 2})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli_main(fit(config))
    upscaled = [str(w.message) for w in caught if "upscaling" in str(w.message)]
    assert len(upscaled) == 1, upscaled
    assert "c.png (1x1 px) to 32x32 px" in upscaled[0] and "s.png (1x1 px) to 32x32 px" in upscaled[0]
    assert Image.open(tmp_path / "out" / "result.png").size == (32, 32)


# ---------------------------------------------------------------- 15. nothing written outside the run's folders


def test_without_a_logger_the_run_keeps_to_its_own_folder(tmp_path, images, monkeypatch):
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "config.yaml"
    mine.write_text("# the user's own config\n")
    config = write_config(tmp_path, images, trainer={"max_steps": 2, "default_root_dir": None, "logger": False})
    cli_main(fit(config))
    assert mine.read_text() == "# the user's own config\n"
    run = tmp_path / "lightning_logs" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["trainer"]["logger"] is False
    assert list((run / "checkpoints").glob("*.ckpt")) and list((run / "snapshots").glob("*.png"))
    expected = ["config.yaml", "content.png", "lightning_logs", "out", "style.jpg", "tiny.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected, "nothing else in the working folder"
