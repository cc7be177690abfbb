"""Interruption (real signals to a real CLI process), numerical faults and stall reports."""

import io
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning import Callback
from lightning.pytorch.plugins import TorchCheckpointIO
from PIL import Image

from nst_lightning.cli.fit import StyleTransferCLI
from nst_lightning.core.objective import Objective
from nst_lightning.errors import Interrupted, NumericalError
from nst_lightning.io.files import atomic_write
from nst_lightning.io.image_io import load_image, tensor_to_pil
from nst_lightning.main import cli_main
from nst_lightning.run.checkpoint import AtomicCheckpointIO
from nst_lightning.run.guard import INTERRUPTED_CHECKPOINT, LossWatch, RunGuard, optimizer_kind
from tests.conftest import datamodule, leftovers, make_module, make_trainer, start_cli, wait_for, write_config

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def run_dir(tmp_path: Path, n: int = 0) -> Path:
    return tmp_path / "runs" / "lightning_logs" / f"version_{n}"


def long_run(tmp_path: Path, images) -> Path:
    """A config that would run for hours: it is still running whenever a signal comes."""
    return write_config(
        tmp_path,
        images,
        trainer={"max_steps": 1_000_000},
        output={"snapshot_every_n_steps": 1, "log_image_every_n_steps": 0},
    )


def interrupt(tmp_path: Path, config: Path, *signals: int) -> tuple[int, str]:
    """Start the CLI, wait until its first step is done, send ``signals``; (exit status, stderr)."""
    process = start_cli(tmp_path, config)
    try:
        first_step = run_dir(tmp_path) / "snapshots" / "step_000001.png"
        wait_for(lambda: first_step.exists() or process.poll() is not None, what="the first step")
        assert process.poll() is None, (tmp_path / "stderr.txt").read_text()
        for signum in signals:
            process.send_signal(signum)
        # The step in progress takes milliseconds here; the limit only guards against a hang.
        code = process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    return code, (tmp_path / "stderr.txt").read_text()


def check_files_complete(folder: Path) -> None:
    """No temporary files left; every image and checkpoint reads back completely."""
    assert leftovers(folder) == []
    for path in folder.rglob("*.png"):
        with Image.open(path) as img:
            img.load()
    for path in folder.rglob("*.ckpt"):
        torch.load(path, weights_only=True)


@pytest.mark.slow
@posix_only
@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_saves_image_and_checkpoint_and_the_run_resumes(tmp_path, images, signum, code, capsys):
    config = long_run(tmp_path, images)
    status, stderr = interrupt(tmp_path, config, signum)

    assert status == code, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.startswith("nst-lightning: interrupted:")]
    assert len(lines) == 1, stderr
    ckpt = run_dir(tmp_path) / "checkpoints" / INTERRUPTED_CHECKPOINT
    assert f"--ckpt_path {ckpt}" in lines[0]
    assert "Wrote the partial image (interrupted)" in stderr
    check_files_complete(tmp_path)

    # The partial image goes beside the output, never to it: the final path only holds a finished image.
    partial = tmp_path / "out" / "result.partial.png"
    assert f"the partial image is in {partial}" in lines[0]
    assert not (tmp_path / "out" / "result.png").exists()
    # It holds exactly the checkpoint's image, and the checkpoint the L-BFGS state of that step.
    saved = torch.load(ckpt, weights_only=True)
    step = saved["global_step"]
    assert step >= 1 and f"stopped after step {step} of" in lines[0]
    output = np.asarray(Image.open(partial))
    state = saved["optimizer_states"][0]["state"][0]
    # DeviceLBFGS's result is its last accepted point (the image parameter holds the next trial step).
    result = state["x"].view_as(saved["state_dict"]["image"])
    np.testing.assert_array_equal(output, np.asarray(tensor_to_pil(result)))
    assert state["n_iter"] == step

    # The printed resume command (the same command plus --ckpt_path) continues from that image and state.
    record = tmp_path / "first_step.pt"
    recorder = f"--trainer.callbacks+={{class_path: tests.test_guard.FirstStep, init_args: {{path: {record}}}}}"
    cli_main(["fit", "--config", str(config), "--trainer.max_steps", str(step + 2), "--ckpt_path", str(ckpt), recorder])
    first = torch.load(record, weights_only=True)
    assert first["step"] == step
    torch.testing.assert_close(first["image"], saved["state_dict"]["image"])
    assert first["n_iter"] == step, "the L-BFGS history came back"
    # In the run folder it was interrupted in (one TensorBoard run per image).
    assert len(list((run_dir(tmp_path, 0) / "checkpoints").glob(f"*step={step + 2}.ckpt"))) == 1
    assert not run_dir(tmp_path, 1).exists()
    # Finished: the image is at the final path, and the partial one is gone.
    assert Image.open(tmp_path / "out" / "result.png").size == (32, 24) and not partial.exists()


class FirstStep(Callback):
    """Saves the step, image and L-BFGS iteration count at the start of a (resumed) run to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        state = trainer.optimizers[0].state[pl_module.image]
        record = {"step": trainer.global_step, "image": pl_module.image.detach().clone(), "n_iter": state["n_iter"]}
        torch.save(record, self.path)


class SlowDisk(Callback):
    """Makes checkpoint writes stop halfway for ``seconds`` (a stuck disk), after touching ``marker``."""

    def __init__(self, marker: str, seconds: float = 600.0):
        self.marker, self.seconds = marker, seconds

    def setup(self, trainer, pl_module, stage):
        marker, seconds = self.marker, self.seconds

        class StuckIO(AtomicCheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None):
                def write(handle):
                    buffer = io.BytesIO()
                    torch.save(checkpoint, buffer)
                    data = buffer.getvalue()
                    handle.write(data[: len(data) // 2])
                    handle.flush()
                    Path(marker).touch()
                    time.sleep(seconds)
                    handle.write(data[len(data) // 2 :])

                atomic_write(path, write)

        trainer.strategy.checkpoint_io = StuckIO()


@pytest.mark.slow
@posix_only
def test_a_second_ctrl_c_quits_at_once_without_damaging_files(tmp_path, images):
    # The first Ctrl-C stops the run; while its checkpoint is half written (the disk is stuck), a
    # second one quits: no checkpoint, no temporary file, and the image written before stays whole.
    marker = tmp_path / "checkpoint-half-written"
    config = long_run(tmp_path, images)
    slow = f"--trainer.callbacks+={{class_path: tests.test_guard.SlowDisk, init_args: {{marker: {marker}}}}}"
    process = start_cli(tmp_path, config, slow)
    try:
        wait_for(lambda: (run_dir(tmp_path) / "snapshots" / "step_000001.png").exists(), what="the first step")
        process.send_signal(signal.SIGINT)
        wait_for(marker.exists, what="the interruption's checkpoint write")
        process.send_signal(signal.SIGINT)
        status = process.wait(timeout=120)  # the stuck write would take 600 s
    finally:
        if process.poll() is None:
            process.kill()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert status == 130, stderr
    assert "Traceback" not in stderr and "SIGINT received again: quitting at once" in stderr
    assert not list(tmp_path.rglob("*.ckpt"))
    check_files_complete(tmp_path)
    assert Image.open(tmp_path / "out" / "result.partial.png").size == (32, 24)


class SendSignal(Callback):
    def __init__(self, at_step: int, signum: int = signal.SIGINT):
        self.at_step, self.signum = at_step, signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


@posix_only
def test_the_step_in_progress_finishes_before_the_run_stops(tmp_path, images):
    # In-process: the signal arrives while step 3 starts; the run stops after it, not in its middle.
    guard = RunGuard()
    trainer = make_trainer(tmp_path, 50, callbacks=[guard, SendSignal(at_step=2)])
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as info:
        trainer.fit(make_module(), datamodule=datamodule(images))
    assert info.value.step == 3 and info.value.exit_code == 130
    assert info.value.checkpoint == tmp_path / "checkpoints" / INTERRUPTED_CHECKPOINT
    assert torch.load(info.value.checkpoint, weights_only=True)["global_step"] == 3
    assert signal.getsignal(signal.SIGINT) is previous, "the handlers in place before fit are back"


def test_the_command_lines_trainer_writes_checkpoints_atomically(tmp_path, images):
    # A Trainer plugin, which the command line adds (RunGuard no longer swaps it in from a callback).
    config = write_config(tmp_path, images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = StyleTransferCLI(args=["--config", str(config)], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    # A CheckpointIO of the configuration's own stays.
    plugin = "{class_path: lightning.pytorch.plugins.TorchCheckpointIO}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = StyleTransferCLI(args=["--config", str(config), "--trainer.plugins", plugin], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is TorchCheckpointIO


# ---------------------------------------------------------------- stalls


def test_loss_watch_reports_a_rise_once():
    watch = LossWatch(stall_steps=0, optimizer="lbfgs")
    assert watch.update(1, 10.0) == [] and watch.update(2, 8.0) == []
    (message,) = watch.update(3, 20.0)
    assert "the loss rose at step 3, from 8 to 20" in message and "strong_wolfe" in message
    assert watch.update(4, 50.0) == [], "once per run"
    line_search = LossWatch(stall_steps=0, optimizer="strong_wolfe")
    line_search.update(1, 1.0)
    assert "line search accepted a worse point" in line_search.update(2, 2.0)[0]


def test_loss_watch_names_the_optimiser_that_made_the_step():
    adam = LossWatch(stall_steps=0, optimizer="adam")
    adam.update(1, 1.0)
    (message,) = adam.update(2, 2.0)
    assert "Adam" in message and "L-BFGS" not in message and "strong_wolfe" not in message
    assert optimizer_kind(torch.optim.Adam([torch.zeros(1, requires_grad=True)])) == "adam"
    lbfgs = torch.optim.LBFGS([torch.zeros(1, requires_grad=True)], line_search_fn="strong_wolfe")
    assert optimizer_kind(lbfgs) == "strong_wolfe"


def test_loss_watch_reads_a_falling_negative_loss_as_falling():
    watch = LossWatch(stall_steps=5, optimizer="lbfgs")
    losses = [-1.0 - 0.1 * step for step in range(30)]
    assert not [m for step, loss in enumerate(losses, 1) for m in watch.update(step, loss)]
    (message,) = watch.update(31, -1.0)
    assert "rose" in message


def test_loss_watch_reports_a_stalled_loss_once():
    watch = LossWatch(stall_steps=5)
    losses = [10.0, 5.0, 4.0] + [3.9999] * 10
    messages = [(step, m) for step, loss in enumerate(losses, 1) for m in watch.update(step, loss)]
    assert len(messages) == 1
    step, message = messages[0]
    assert step == 8 and "improved by less than 0.1% in the last 5 steps" in message
    improving = LossWatch(stall_steps=5)
    assert not [m for step in range(1, 50) for m in improving.update(step, 0.9**step)]


def test_a_run_whose_image_stops_moving_ends_early_with_a_warning(tmp_path, images):
    # Content loss only, starting at the content image: the gradient is zero, L-BFGS returns at once.
    module = make_module(init="content", style_weight=0.0)
    trainer = make_trainer(tmp_path, 20, callbacks=[RunGuard()])
    with pytest.warns(UserWarning, match="has not changed in the last 2 steps.*below L-BFGS's tolerance"):
        trainer.fit(module, datamodule=datamodule(images))
    assert trainer.global_step == 2


def test_an_image_that_stops_moving_on_a_levelled_loss_is_called_finished_not_stuck():
    image = torch.nn.Parameter(torch.rand(1, 3, 4, 4))
    image.grad = torch.ones_like(image)  # above L-BFGS's tolerance: not the converged case
    trainer = SimpleNamespace(optimizers=[torch.optim.LBFGS([image])])
    levelled, falling = LossWatch(stall_steps=0), LossWatch(stall_steps=0)
    for step in range(1, 40):
        levelled.update(step, 8.2 - 0.001 * step)  # 0.25% over 20 steps
        falling.update(step, 8.2 * 0.99**step)  # 18% over 20 steps
    assert levelled.levelled_off() == pytest.approx(0.02 / 8.181, rel=1e-3)
    assert falling.levelled_off() is None and LossWatch(stall_steps=0).levelled_off() is None
    message = RunGuard._still_message(trainer, image, 39, levelled)
    assert "levelled off (down 0.24% over the last 20 steps)" in message and "finished" in message
    assert "lower model.lr" not in message
    assert "lower model.lr" in RunGuard._still_message(trainer, image, 39, falling)


# ---------------------------------------------------------------- numerical faults


class Diverging(Objective):
    """A loss whose gradient is infinite although its value is finite (sqrt at 0)."""

    def forward(self, image):
        losses = super().forward(image)
        losses["total"] = losses["total"] + (image - image.detach()).abs().sqrt().sum()
        return losses


def test_a_non_finite_gradient_is_caught_at_that_step(tmp_path, images):
    module = make_module()
    module.objective.__class__ = Diverging  # the module's own objective, with the diverging term
    with pytest.raises(NumericalError, match="gradient became non-finite at step 0"):
        make_trainer(tmp_path, 3).fit(module, datamodule=datamodule(images))


def test_a_diverging_run_keeps_its_last_finite_image(tmp_path, images):
    module = make_module(lr=100.0, lbfgs_line_search=None)  # a line search would shorten the steps
    with pytest.raises(NumericalError, match=r"loss became inf at step \d+: .*lower model.lr"):
        make_trainer(tmp_path, 50).fit(module, datamodule=datamodule(images))
    assert module.trainer.global_step >= 1
    assert torch.isfinite(module.image).all()
    torch.testing.assert_close(module.image.detach(), module.evaluator.last_finite_image)
    with torch.no_grad():
        assert torch.isfinite(module(module.image)["total"])


def test_cli_numerical_fault_is_one_line_and_the_output_holds_the_last_finite_image(tmp_path, images, capsys):
    config = write_config(tmp_path, images, trainer={"max_steps": 50}, model={"lr": 100.0, "lbfgs_line_search": None})
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config)])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and "lower model.lr" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "out" / "result.png").exists(), "an unfinished run never writes the final path"
    output = load_image(tmp_path / "out" / "result.partial.png")
    assert output.shape == (1, 3, 24, 32) and torch.isfinite(output).all()


def _one_error_line_and_the_old_output_kept(tmp_path, config, capsys) -> str:
    """Runs ``config`` with ``--overwrite`` over an existing output; returns the one error line it must end with."""
    output = tmp_path / "out" / "result.png"
    output.parent.mkdir()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(output)
    before = output.read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config), "--overwrite"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert output.read_bytes() == before, "nothing better than the old output was computed"
    return lines[0]


def test_cli_out_of_memory_is_one_line_and_keeps_the_partial_image(tmp_path, images, capsys, monkeypatch):
    """The allocator failing mid-run (the memory plan's estimate short, as under a tight ulimit -v): one line
    naming the settings that give headroom, the image so far in the .partial file, the old output untouched."""
    forward, calls = Objective.forward, []

    def failing(self, image):
        calls.append(1)
        if len(calls) > 6:  # a few steps in: there is an image to keep
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                "tried to allocate 215808000 bytes. Error code 12 (Cannot allocate memory)"
            )
        return forward(self, image)

    monkeypatch.setattr(Objective, "forward", failing)
    config = write_config(tmp_path, images, trainer={"max_steps": 50})
    line = _one_error_line_and_the_old_output_kept(tmp_path, config, capsys)
    assert "out of memory (asked for 206 MiB more)" in line and "model.tile_size" in line, line
    assert load_image(tmp_path / "out" / "result.partial.png").shape == (1, 3, 24, 32)


def test_cli_absurd_style_weight_names_it_and_leaves_the_old_output(tmp_path, images, capsys):
    # 1e44 times the (small, random-weights) style loss overflows float32 at the first evaluation.
    line = _one_error_line_and_the_old_output_kept(
        tmp_path, write_config(tmp_path, images, model={"style_weight": 1e44}), capsys
    )
    assert "at step 0: model.style_weight=1e+44" in line and "lower model.style_weight" in line


def test_interrupted_message_and_exit_codes():
    err = Interrupted(signal.SIGTERM, 7, 300)
    assert err.exit_code == 143 and str(err) == "SIGTERM: stopped after step 7 of 300"
    err.image, err.checkpoint = "out.png", "run/interrupted.ckpt"
    assert str(err).endswith(
        "partial image is in out.png; to go on, run the same command with --ckpt_path run/interrupted.ckpt"
    )


def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    "where", ["nst_lightning.core.features.load_backbone", "nst_lightning.run.module.StyleTransfer.setup"]
)
def test_ctrl_c_before_the_optimisation_exits_130_with_one_line(tmp_path, images, capsys, monkeypatch, where):
    # Loading the weights runs outside Trainer.fit; setup runs inside it, where Lightning answers
    # KeyboardInterrupt with sys.exit(1): both end as 130 and one line.
    monkeypatch.setattr(where, _ctrl_c)
    config = write_config(tmp_path, images)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(config)])
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "nst-lightning: interrupted: Ctrl-C before the optimisation started: nothing was written" in err
    assert "Traceback" not in err and not (tmp_path / "out" / "result.png").exists()
