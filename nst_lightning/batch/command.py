"""``batch``'s command line: :class:`BatchCLI`, the ``fit`` command's :class:`~nst_lightning.cli.fit.StyleTransferCLI`
with a ``batch:`` section; :mod:`nst_lightning.batch.runs` runs the pairs, each one a LightningCLI run of its own
configuration built here."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningArgumentParser
from lightning.pytorch.trainer.states import TrainerStatus

from nst_lightning.batch import runs as batch
from nst_lightning.batch.pairs import BatchSettings, Pair
from nst_lightning.cli.fit import StyleTransferCLI
from nst_lightning.errors import CheckpointError, ConfigError
from nst_lightning.run import checks
from nst_lightning.run.checkpoint import check_same_config, read_checkpoint
from nst_lightning.run.guard import RunGuard
from nst_lightning.run.runlog import RunLogger, latest_version

# In a batch, unlike ``fit``: no per-pair progress bar or model summary (the bar is over pairs), and
# no checkpoints at the end of a pair (each is hundreds of MB at 512 px, and a finished pair is not
# resumed); an interrupted pair still gets its checkpoint, from which the next run resumes it. The
# configuration may turn them back on.
BATCH_TRAINER_DEFAULTS = dict.fromkeys(
    ("trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.enable_checkpointing"), False
)


class BatchCLI(StyleTransferCLI):
    """``python cli.py batch``: the ``fit`` command's configuration plus a ``batch:`` section
    (:class:`~nst_lightning.batch.pairs.BatchSettings`), and the :class:`~nst_lightning.batch.runs.PairRunner` of
    :func:`nst_lightning.batch.runs.run_batch`.

    Constructed on the command line's arguments, it parses and checks every section once (so a bad
    setting is one error, not one failure per pair), building the model and the trainer once as a
    check; :meth:`run_pair` then runs each pair as a LightningCLI run of that pair's configuration.
    Parse errors are raised as :class:`ConfigError` rather than printed with the usage.
    """

    writes_output_path = False  # output.path is not used: each pair has its own output

    def __init__(self, args: ArgsType, trainer_overrides: dict[str, Any] | None = None) -> None:
        self.pair_run = trainer_overrides is not None
        parser_kwargs = {
            "exit_on_error": False,
            "description": "Stylise every content image with every style image (see batch.* below).",
        }
        overrides = trainer_overrides if self.pair_run else {"logger": False}  # the check builds a trainer
        try:
            super().__init__(args=args, run=False, parser_kwargs=parser_kwargs, trainer_overrides=overrides)
        except argparse.ArgumentError as err:
            message = " ".join(str(err).split())
            raise ConfigError(f"{message} (python cli.py batch --help lists the keys)") from None
        self.settings: BatchSettings = self.config_init.batch
        self.root_dir = Path(self.config.trainer.default_root_dir or ".")
        self.accelerator = self.config.trainer.accelerator
        self.overwrite = bool(self.config.output.overwrite)
        self.step_progress: batch.StepProgress | None = None
        if not self.pair_run:  # the classes were a check: the pairs build their own
            self.model = self.datamodule = self.trainer = self.config_init = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(BatchSettings, "batch")
        # The pairs come from batch.contents and batch.styles; "" marks data.content/style unset.
        parser.set_defaults({"data.content": "", "data.style": "", **BATCH_TRAINER_DEFAULTS})

    def after_instantiate_classes(self) -> None:
        if self.pair_run:  # the check's model records nothing: each pair's config.yaml gets its own
            super().after_instantiate_classes()

    def contents_and_styles(self) -> tuple[list[str], list[str]]:
        """batch.contents and batch.styles, or data.content and data.style where they are null."""
        chosen = []
        for key, fallback in (("contents", "content"), ("styles", "style")):
            entries = getattr(self.settings, key)
            if entries is None:
                value = checks.plain(self.config.data[fallback])
                if not value:
                    raise ConfigError(f"no {fallback} images: set batch.{key} (files, folders or glob patterns)")
                entries = [value] if isinstance(value, str) else list(value)
            chosen.append(entries)
        return chosen[0], chosen[1]

    def pair_config(self, pair: Pair) -> Namespace:
        """This batch's configuration for one pair; its config.yaml reruns exactly that pair with ``batch``."""
        config = self.config.clone()
        config.data.content = str(pair.content)
        config.data.style = str(pair.style)
        config.output.path = str(pair.output)
        config.batch.contents = [str(pair.content)]
        config.batch.styles = [str(pair.style)]
        config.batch.output_dir = str(pair.output.parent)
        config.batch.name = pair.output.name.replace("{", "{{").replace("}", "}}")
        config.batch.skip_existing = False
        config.batch.devices = config.batch.num_nodes = 1
        return config

    def run_pair(self, pair: Pair, placement: dict[str, Any], resume: Path | None, pending: Path) -> tuple[bool, str]:
        """One pair (see :meth:`nst_lightning.batch.runs.PairRunner.run_pair`), built by LightningCLI from
        :meth:`pair_config`; ``placement`` overrides trainer settings (the device of this process)."""
        config = self.pair_config(pair)
        overrides = dict(placement)
        runs = self.root_dir / "lightning_logs" / "batch"
        if config.trainer.logger in (None, True):
            # A pair resumed from its interruption goes on in the run folder it stopped in: one curve per pair.
            version = latest_version(runs / pair.run) if resume is not None else None
            overrides["logger"] = RunLogger(save_dir=runs, name=pair.run, version=version)
        elif config.trainer.logger is False:
            # No logger: the pair's snapshots and config.yaml still need a folder of their own.
            overrides["default_root_dir"] = str(runs / pair.run)
        files = [item for item in self.input_files(config) if item[0] == "--config"]
        del config.config  # the files were read: the pair's values are in the namespace
        run = BatchCLI(config, trainer_overrides=overrides)
        for callback in run.trainer.callbacks:
            if isinstance(callback, RunGuard):
                callback.interrupted_path = pending
        if self.step_progress is not None:  # the batch's bar follows the pair's steps
            run.trainer.callbacks.append(self.step_progress)
        try:
            self.check_run_outputs(run.trainer, [*run.input_files(), *files])
            if resume is not None:  # the same checks as fit's --ckpt_path, before the pair starts
                checkpoint = read_checkpoint(resume, mmap=True)
                model, data = checks.plain(run.config.model.as_dict()), checks.plain(run.config.data.as_dict())
                check_same_config(resume, checkpoint, model=model, data=data)
                del checkpoint
            run.trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=resume)
            return run.trainer.state.status == TrainerStatus.FINISHED, str(run.trainer.log_dir or "")
        except CheckpointError as err:
            # Refused before the first step (its settings, targets or size): not a failure of the pair.
            if resume is not None and run.trainer.global_step == 0:
                raise batch.ResumeRefused(str(err)) from None
            raise
