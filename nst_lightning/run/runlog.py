"""The run's TensorBoard record: its real settings as hparams with the final losses as their metrics, and no folder
left behind by a run that failed before its first step."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from nst_lightning.io.console import summary_line
from nst_lightning.io.files import is_remote, remove_file
from nst_lightning.run.callbacks import ImageWriter
from nst_lightning.run.model import image_model

# LightningCLI's record of how to rebuild the module: not a setting of the run.
NOT_SETTINGS = ("_instantiator",)
# What a run writes into its folder before its first step: the logger's and SaveConfigCallback's files.
RUN_FILES = ("config.yaml", "hparams.yaml")
RUN_SUBFOLDERS = ("checkpoints", "snapshots")


def _settings(params: Any) -> dict[str, Any]:
    params = vars(params) if not isinstance(params, Mapping) else params
    return {key: value for key, value in dict(params).items() if key not in NOT_SETTINGS}


class RunLogger(TensorBoardLogger):
    """Lightning's TensorBoard logger, with three changes: the hparams hold the run's settings only (no
    ``_instantiator``, no ``hp_metric`` of -1: :class:`RunRecord` gives the final losses as their metrics);
    and a run that fails before logging its first step removes the folder it made (``version_N`` with a
    config.yaml and nothing else of use), so that failed attempts leave no empty runs behind."""

    def __init__(self, save_dir: str | Path, name: str | None = "lightning_logs", **kwargs: Any) -> None:
        kwargs.setdefault("default_hp_metric", False)
        super().__init__(save_dir, name=name, **kwargs)
        self.logged_steps = False
        # A folder of its own: with no version given, the logger takes the next free number.
        self._new_folder = kwargs.get("version") is None or not os.path.isdir(self.log_dir)
        self._new_root = not os.path.isdir(self.root_dir)  # lightning_logs itself

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        super().log_hyperparams(_settings(params), *args, **kwargs)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.logged_steps = True
        super().log_metrics(metrics, step)

    def finalize(self, status: str) -> None:
        super().finalize(status)  # closes the event file first
        if status == "failed" and not self.logged_steps and self._new_folder:
            remove_run_folder(Path(self.log_dir))
            if self._new_root:
                remove_run_folder(Path(self.root_dir))  # only if that left it empty


def resumed_version(ckpt_path: str | Path | None, save_dir: str | Path, name: str = "lightning_logs") -> str | None:
    """The run folder (``version_N``) that a resume from ``ckpt_path`` continues: the one the checkpoint lies in
    (``<save_dir>/<name>/version_N/checkpoints/*.ckpt``, as the interruption's message names it), so that one
    image's curves, snapshots and checkpoints stay in one TensorBoard run; None for a checkpoint kept anywhere
    else (the run gets a new folder)."""
    if not ckpt_path or is_remote(ckpt_path) or is_remote(save_dir):
        return None
    try:
        ckpt = Path(ckpt_path).resolve()
        logs = (Path(save_dir) / (name or "")).resolve()
    except (OSError, RuntimeError):
        return None
    run = ckpt.parent.parent
    if ckpt.parent.name != "checkpoints" or run.parent != logs or not run.name.startswith("version_"):
        return None
    return run.name if run.is_dir() else None


def latest_version(folder: str | Path) -> str | None:
    """The highest-numbered ``version_N`` in ``folder`` (a batch pair's runs), or None: a pair resumed from its
    interruption's checkpoint goes on in the run folder it was interrupted in."""
    numbers = []
    for path in Path(folder).glob("version_*"):
        suffix = path.name.removeprefix("version_")
        if suffix.isdigit() and path.is_dir():
            numbers.append(int(suffix))
    return f"version_{max(numbers)}" if numbers else None


def remove_run_folder(folder: Path) -> None:
    """Removes what a run writes before its first step (:data:`RUN_FILES`, its event files, empty
    :data:`RUN_SUBFOLDERS`), then the folder if that left it empty; anything else keeps it."""
    if is_remote(folder) or not folder.is_dir():
        return
    for path in [*(folder / name for name in RUN_FILES), *folder.glob("events.out.tfevents.*")]:
        remove_file(path)
    for path in [*(folder / name for name in RUN_SUBFOLDERS), folder]:
        try:
            path.rmdir()
        except OSError:  # not empty (or not there): what is in it stays
            pass


class RunRecord(L.Callback):
    """At the end of a run: the final image's losses (one evaluation, no gradient), given to TensorBoard as
    the metrics of the run's settings (HPARAMS tab) and kept in :attr:`final_losses` for the summary line."""

    def __init__(self) -> None:
        self.final_losses: dict[str, float] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = image_model(pl_module)
        if model is None:
            return
        with torch.no_grad():
            losses = model.final_losses()
        self.final_losses = {name: float(value) for name, value in losses.items()}
        if not trainer.is_global_zero:
            return
        metrics = {f"final/{'loss' if name == 'total' else name}": value for name, value in self.final_losses.items()}
        metrics = {name: value for name, value in metrics.items() if "/style_" not in name}  # the totals only
        settings = _settings(getattr(pl_module, "hparams", {}))
        datamodule = trainer.datamodule
        settings.update(_settings(getattr(datamodule, "hparams", {})) if datamodule is not None else {})
        settings.update(max_steps=trainer.max_steps, precision=str(trainer.precision))
        settings["device"] = trainer.strategy.root_device.type
        metrics["final/iterations"] = trainer.global_step
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.log_hyperparams(settings, metrics)


def final_losses(trainer: L.Trainer) -> dict[str, float]:
    """The finished image's losses (``total`` among them), once the run's :class:`RunRecord` has them; else empty."""
    record = next((c for c in trainer.callbacks if isinstance(c, RunRecord)), None)
    return record.final_losses if record is not None else {}


def run_summary(trainer: L.Trainer, seconds: float) -> str | None:
    """The summary line of a finished run (see :func:`~nst_lightning.io.console.summary_line`); None where the run
    wrote no image of its own."""
    writer = next((c for c in trainer.callbacks if isinstance(c, ImageWriter)), None)
    if writer is None or not trainer.is_global_zero:
        return None
    logger = trainer.logger
    return summary_line(
        writer.path,
        trainer.global_step,
        trainer.max_steps,
        final_losses(trainer).get("total"),
        seconds,
        trainer.log_dir if logger is not None else None,
        logger.root_dir if isinstance(logger, TensorBoardLogger) else None,
    )
