"""The loss log: each step's losses reach TensorBoard and the callbacks a few steps late, every one of them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nst_lightning.errors import ImageError
from nst_lightning.run.callbacks import Background, ImageWriter
from nst_lightning.run.guard import RunGuard
from nst_lightning.run.losslog import FLUSH_EVERY, LossLog
from tests.conftest import LossRecorder, datamodule, make_module, make_trainer


def scalars(run: str) -> EventAccumulator:
    acc = EventAccumulator(run, size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


class Rows(Callback):
    """What the loss log hands on, and how late: the steps done when each row arrived."""

    def __init__(self):
        self.rows, self.done_when_seen, self.done = [], [], 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.done = trainer.global_step

    def on_losses(self, trainer, pl_module, rows):
        self.rows += rows
        self.done_when_seen += [self.done] * len(rows)


class Fails(Callback):
    def __init__(self, at: int):
        self.at = at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.at:
            raise RuntimeError("a fault mid-run")


@pytest.mark.slow
def test_tensorboard_holds_every_steps_losses_logged_a_few_steps_late(tmp_path, images):
    steps = 23  # two full copies of 10 rows and a part, the first step's on its own
    assert FLUSH_EVERY == 10
    reference, rows = LossRecorder(), Rows()
    module = make_module()
    logger = TensorBoardLogger(tmp_path, name="runs")
    trainer = make_trainer(tmp_path, steps, logger=logger, log_every_n_steps=1, callbacks=[reference, rows])
    trainer.fit(module, datamodule=datamodule(images))

    acc = scalars(logger.log_dir)
    losses = acc.Scalars("loss")
    assert [event.step for event in losses] == list(range(steps))
    assert [event.value for event in losses] == pytest.approx(reference.losses, rel=1e-6)
    for tag in ("loss/content", "loss/style", "loss/style_relu1_1", "loss/tv", "closure_evaluations"):
        assert [event.step for event in acc.Scalars(tag)] == list(range(steps)), tag
    assert sum(event.value for event in acc.Scalars("closure_evaluations")) == module.evaluations
    # The callbacks saw each step once, in order, and not later than the copy of its 10 rows allows.
    assert [row.step for row in rows.rows] == list(range(steps))
    assert [row.loss for row in rows.rows] == pytest.approx(reference.losses, rel=1e-6)
    assert all(seen - row.step <= FLUSH_EVERY for row, seen in zip(rows.rows, rows.done_when_seen, strict=True))
    assert max(seen - row.step for row, seen in zip(rows.rows, rows.done_when_seen, strict=True)) > 1, "lagged"
    # The progress bar showed the last loss read back during the loop: step 20's (21 and 22 came at the end).
    assert float(trainer.progress_bar_metrics["loss"]) == pytest.approx(reference.losses[20], rel=1e-6)


def test_a_run_that_fails_mid_copy_still_logs_every_step_it_did(tmp_path, images):
    logger = TensorBoardLogger(tmp_path, name="runs")
    reference = LossRecorder()
    trainer = make_trainer(tmp_path, 30, logger=logger, log_every_n_steps=1, callbacks=[reference, Fails(at=14)])
    with pytest.raises(RuntimeError, match="a fault mid-run"):
        trainer.fit(make_module(), datamodule=datamodule(images))
    losses = scalars(logger.log_dir).Scalars("loss")
    assert [event.step for event in losses] == list(range(14))
    assert [event.value for event in losses] == pytest.approx(reference.losses, rel=1e-6)


def test_log_every_n_steps_is_honoured(tmp_path, images):
    logger = TensorBoardLogger(tmp_path, name="runs")
    make_trainer(tmp_path, 12, logger=logger, log_every_n_steps=5).fit(make_module(), datamodule=datamodule(images))
    assert [event.step for event in scalars(logger.log_dir).Scalars("loss")] == [4, 9]


def test_rows_whose_names_change_keep_their_own_names():
    # A video's later frames add a temporal loss: the rows recorded before keep their columns.
    log, seen = LossLog(every=4), []
    listener = SimpleNamespace(on_losses=lambda trainer, module, rows: seen.extend(rows))
    trainer = SimpleNamespace(log_every_n_steps=1, loggers=[], callbacks=[listener])
    for step in range(3):
        log.record(step, {"loss": torch.tensor(float(step)), "closure_evaluations": 1})
    for step in range(3, 6):
        log.record(step, {"loss": torch.tensor(float(step)), "loss/temporal": torch.tensor(-1.0)})
    log.drain(trainer, None)
    assert [row.step for row in seen] == list(range(6))
    assert [row.loss for row in seen] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    assert seen[0].values == {"loss": 0.0, "closure_evaluations": 1.0}
    assert seen[5].values == {"loss": 5.0, "loss/temporal": -1.0}
    assert log.latest is seen[-1]


def test_the_image_worker_raises_its_error_on_the_loops_thread(tmp_path):
    background, written = Background(), []
    background.submit(written.append, torch.ones(1, 3, 2, 2))

    def fail(image):
        raise OSError("disk full")

    background.submit(fail, torch.zeros(1, 3, 2, 2))
    with pytest.raises(OSError, match="disk full"):
        background.finish()
    assert len(written) == 1 and torch.equal(written[0], torch.ones(1, 3, 2, 2))
    source = torch.zeros(2)
    background.submit(written.append, source)
    source += 1  # the worker has a copy: what the loop does next is not in it
    background.finish()
    assert torch.equal(written[-1], torch.zeros(2))


def test_the_guard_watches_a_new_loss_from_the_first_row_of_each_scale(tmp_path, images):
    # The rows of a coarse-to-fine run arrive late: the guard's loss watch starts afresh at the row of the step
    # that moved to the next scale, not when the guard sees the new image.
    guard, reference = RunGuard(stall_steps=0), LossRecorder()
    module = make_module(scales=[24, 32], scale_steps=[4, 5], lbfgs_line_search="strong_wolfe")
    make_trainer(tmp_path, 9, callbacks=[reference, guard]).fit(module, datamodule=datamodule(images))
    assert list(guard._watch.recent) == pytest.approx(reference.losses[4:], rel=1e-6)


def test_a_snapshot_that_cannot_be_written_on_the_worker_thread_fails_the_run_and_keeps_its_image(tmp_path, images):
    logger = TensorBoardLogger(tmp_path, name="runs", version=0)
    Path(logger.log_dir).mkdir(parents=True)
    (Path(logger.log_dir) / "snapshots").write_text("a file where the snapshots' folder goes")
    writer = ImageWriter(str(tmp_path / "out.png"), snapshot_every_n_steps=2, log_image_every_n_steps=3)
    trainer = make_trainer(tmp_path, 30, logger=logger, callbacks=[writer])
    with pytest.raises(ImageError, match="step_000002.png"):
        trainer.fit(make_module(), datamodule=datamodule(images))
    assert (tmp_path / "out.partial.png").is_file() and not (tmp_path / "out.png").exists()
    assert 2 <= trainer.global_step < 30, "raised on the loop's thread, once the worker's write failed"
