"""The command line's settings: LightningCLI over StyleTransfer and StyleTransferDataModule, the ``fit`` command.

It builds settings and nothing else: every section is checked (:mod:`nst_lightning.run.checks`) before
anything loads, then LightningCLI builds the classes and runs ``Trainer.fit``. ``batch`` is
:class:`~nst_lightning.batch.command.BatchCLI`, the same CLI class with a ``batch:`` section. The entry point,
which turns errors into one line and an exit status, is :func:`nst_lightning.main.cli_main`.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning
from jsonargparse import ActionConfigFile, Namespace
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ProgressBar as AnyProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import CheckpointIO

from nst_lightning import names
from nst_lightning.cli.parsing import StyleTransferArgumentParser, absolute_paths
from nst_lightning.core.backbones import resolve_backbone
from nst_lightning.errors import EXIT_ERROR, CheckpointError, Interrupted, NSTError, stop
from nst_lightning.io.console import ProgressBar
from nst_lightning.io.files import check_new_output, check_outputs_apart, check_writable_dir, is_remote
from nst_lightning.io.image_io import check_writable
from nst_lightning.run import checks
from nst_lightning.run.callbacks import ImageWriter, partial_path
from nst_lightning.run.checkpoint import AtomicCheckpointIO, check_same_config, read_checkpoint
from nst_lightning.run.data import StyleTransferDataModule, check_files_fit
from nst_lightning.run.guard import RunGuard
from nst_lightning.run.memory import out_of_memory
from nst_lightning.run.module import StyleTransfer
from nst_lightning.run.precision import choose_precision
from nst_lightning.run.runlog import RunLogger, RunRecord, resumed_version, run_summary

# Trainer defaults that differ from Lightning's: the seed's 300 iterations, one GPU at most
# (one image is one optimisation), and a scalar per step in TensorBoard.
TRAINER_DEFAULTS = {"trainer.max_steps": 300, "trainer.devices": 1, "trainer.log_every_n_steps": 1}


def zero_weight_note(content_weight: float, style_weight: float) -> str | None:
    """What a run with one weight 0 (not both: refused) makes: the command line's warning, a server job's note."""
    if style_weight == 0 < content_weight:
        return "model.style_weight is 0: the result is the photo as the network sees it, with no style (default 1e6)"
    if content_weight == 0 < style_weight:
        return "model.content_weight is 0: the result is the painting's texture, with none of the photo's layout"
    return None


class StyleTransferCLI(LightningCLI):
    """LightningCLI with the ``output:`` (:class:`ImageWriter`) and ``guard:`` (:class:`RunGuard`) sections and the
    ``fit`` command only. Settings that cannot work are refused before the model (and its weights) loads."""

    # Whether output.path is this command's image (a batch names its own outputs).
    writes_output_path = True

    def __init__(
        self,
        *args,
        trainer_overrides: dict[str, Any] | None = None,
        verbose: bool = False,
        callbacks: Sequence[Callback] = (),
        **kwargs,
    ) -> None:
        self.started = time.perf_counter()
        self.trainer_overrides = dict(trainer_overrides or {})
        self.more_callbacks = list(callbacks)  # besides the config's (the command's own: --watch's feed)
        self.verbose = verbose
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("description", "nst-lightning: neural style transfer (Gatys et al.) with Lightning.")
        parser_kwargs.setdefault(
            "epilog",
            "commands: 'fit' stylises one image (fit --help lists every setting; --weights FILE and --backbone NAME "
            "stand for --model.weights, --model.backbone); 'batch' many pairs (nst-lightning batch --help).",
        )
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(StyleTransfer, StyleTransferDataModule, *args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """LightningCLI's, with a :class:`StyleTransferArgumentParser` (``parser_class`` is not in Lightning 2.4)."""
        kwargs.setdefault("dump_header", [f"lightning.pytorch=={lightning.__version__}"])
        parser = StyleTransferArgumentParser(**kwargs)
        parser.add_argument("-c", "--config", action=ActionConfigFile, help="a config file, or a shipped config's name")
        return parser

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ImageWriter, "output")
        parser.add_lightning_class_args(RunGuard, "guard")
        parser.set_defaults(TRAINER_DEFAULTS)

    @staticmethod
    def _command(config: Namespace) -> Namespace:
        """The part of ``config`` for the subcommand being run (``fit``), or all of it (``batch``)."""
        subcommand = config.get("subcommand")
        return config[subcommand] if subcommand else config

    def _subcommand_config(self) -> Namespace:
        return self._command(self.config)

    def check_parsed(self) -> None:
        """Runs on the parsed configuration before any file it names is opened (the web app's confinement)."""

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """LightningCLI's parsing; ``model.backbone: auto`` made the weights file's backbone; then ``--ckpt_path``
        checked before anything loads: a readable nst-lightning checkpoint, made with this run's model and data
        settings (a difference is refused with the list of differing keys). A run normalised with measured layer
        means goes on with the checkpoint's means, not with fresh measurements."""
        super().parse_arguments(parser, args)
        absolute_paths(self.config)  # what the classes, config.yaml and hparams get
        self.check_parsed()
        config = self._subcommand_config()
        config.model.backbone = resolve_backbone(config.model.backbone, checks.plain(config.model.weights))
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in names.SPECIAL_CKPT_PATHS or is_remote(ckpt_path):
            return
        if config.get("weights_only") is False:
            raise CheckpointError(
                "checkpoints are only read with weights_only=True (a checkpoint cannot run code): "
                "drop --weights_only false"
            )
        checkpoint = read_checkpoint(ckpt_path, mmap=True)
        saved_means = (checkpoint.get("hyper_parameters") or {}).get("layer_means")
        if config.model.get("layer_means") is None and saved_means and config.model.get("normalize"):
            config.model.layer_means = dict(saved_means)
        model, data = checks.plain(config.model.as_dict()), checks.plain(config.data.as_dict())
        check_same_config(ckpt_path, checkpoint, model=model, data=data)

    def _parse_ckpt_path(self) -> None:
        """Nothing: LightningCLI's own version would overwrite this run's model settings with the
        checkpoint's, silently, where :meth:`parse_arguments` refuses a difference.

        Private API of LightningCLI, overridden because there is no public switch for it (pinned by
        tests/test_private_api.py, which fails if LightningCLI stops calling it).
        """

    def before_instantiate_classes(self) -> None:
        """Refuses settings that cannot work before the model, and its weights, load."""
        config = self._subcommand_config()
        checks.check_max_steps(config.trainer.max_steps)
        data = checks.plain(config.data.as_dict())
        checks.check_data(**data)
        checks.check_output(**config.output.as_dict())
        checks.check_guard(**config.guard.as_dict())
        choose_precision(config)
        checks.check_trainer_settings(config.trainer, compile=config.model.compile)
        checks.check_model(**checks.plain(config.model.as_dict()))
        if note := zero_weight_note(config.model.content_weight, config.model.style_weight):
            print(f"nst-lightning: warning: {note}", file=sys.stderr)
        root = config.trainer.default_root_dir
        if root is None or not is_remote(root):
            check_writable_dir(root or os.getcwd(), "trainer.default_root_dir")
        if self.writes_output_path:
            output = Path(config.output.path)
            check_outputs_apart(
                [("output.path", output, "output.path"), ("the partial image", partial_path(output), "output.path")],
                self.input_files(config),
            )
            check_new_output(output, config.output.overwrite, "output.path")
            check_writable(output)
        if data["content"]:  # a batch sets its images pair by pair
            check_files_fit(**data)  # from the files' headers: nothing is decoded or resized yet

    def input_files(self, config: Any | None = None) -> list[tuple[str, Path]]:
        """Every file the run reads, as (setting, path): images, masks, init, weights, checkpoint, configs."""
        config = config if config is not None else self._subcommand_config()
        files: list[tuple[str, Path]] = []

        def add(setting: str, values: Any) -> None:
            values = checks.plain(values)
            for value in [values] if isinstance(values, str) else list(values or []):
                if value and not is_remote(value):
                    files.append((setting, Path(str(value))))

        add("data.content", config.data.content)
        add("data.style", config.data.style)
        add("data.style_masks", config.data.style_masks)
        if config.model.init not in names.INITS:
            add("model.init", config.model.init)
        if config.model.weights not in ("imagenet", "random"):
            add("model.weights", config.model.weights)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in names.SPECIAL_CKPT_PATHS:
            add("--ckpt_path", str(ckpt_path))
        add("--config", [str(getattr(path, "absolute", path)) for path in config.get("config") or []])
        return files

    @staticmethod
    def check_run_outputs(trainer: Trainer, inputs: Sequence[tuple[str, Path]]) -> None:
        """The files a run writes in its log folder (config.yaml, hparams.yaml, snapshots, checkpoints) must not be
        inputs either (known once the logger exists); a checkpoint may replace the one the run resumes from."""
        log_dir = Path(trainer.log_dir) if trainer.log_dir is not None else None
        outputs: list[tuple[str, Path, str]] = []
        fix = "trainer.default_root_dir (or the logger's version)"
        if log_dir is not None and not is_remote(log_dir):
            outputs += [
                ("the run's config file", log_dir / "config.yaml", fix),
                ("the run's hyper-parameter file", log_dir / "hparams.yaml", fix),
                ("the run's snapshots", log_dir / "snapshots" / "step_*.png", fix),
            ]
        check_outputs_apart(outputs, inputs)
        checkpoints = RunGuard.checkpoint_dir(trainer)
        if not is_remote(checkpoints):
            others = [(setting, path) for setting, path in inputs if setting != "--ckpt_path"]
            check_outputs_apart([("the run's checkpoints", checkpoints / "*.ckpt", fix)], others)

    def before_fit(self) -> None:
        """Called by LightningCLI with the trainer built, just before ``Trainer.fit``."""
        self.check_run_outputs(self.trainer, self.input_files())

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """LightningCLI's, with these changes: atomic checkpoints (:class:`AtomicCheckpointIO`, unless the config
        names a CheckpointIO plugin); a :class:`RunLogger` fed by a :class:`RunRecord`; the console's
        :class:`~nst_lightning.io.console.ProgressBar`; the model summary only with ``--verbose`` (unless
        ``trainer.enable_model_summary`` says); a run without a logger in a ``lightning_logs/version_N`` of its
        own (Lightning would write its files straight into the working folder, over any config.yaml there);
        and settings that cannot work here as one :class:`ConfigError`."""
        kwargs = {**self.trainer_overrides, **kwargs}
        trainer = self._subcommand_config().trainer
        built = self._command(self.config_init).trainer
        plugins = checks.as_list(built.plugins)
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            kwargs.setdefault("plugins", [*plugins, AtomicCheckpointIO()])
        callbacks = [*checks.as_list(built.callbacks), RunRecord(), *self.more_callbacks]
        if trainer.enable_progress_bar is not False and not any(isinstance(c, AnyProgressBar) for c in callbacks):
            callbacks.append(ProgressBar())
        kwargs.setdefault("callbacks", callbacks)
        if trainer.enable_model_summary is None:
            kwargs.setdefault("enable_model_summary", self.verbose)
        root = trainer.default_root_dir or os.getcwd()
        if trainer.logger in (None, True) and "logger" not in kwargs:
            # A resume from a checkpoint of a run folder continues that folder (one run, one TensorBoard curve).
            version = resumed_version(self._subcommand_config().get("ckpt_path"), root)
            kwargs["logger"] = RunLogger(save_dir=root, version=version)
            if version is not None:  # its checkpoints folder holds the one resumed from: expected, not a warning
                warnings.filterwarnings("ignore", ".*Checkpoint directory .* exists and is not empty.*")
        if trainer.logger is False and "logger" not in kwargs and "default_root_dir" not in kwargs:
            if not is_remote(root):
                # The numbering TensorBoard would use; the logger itself is not used (nothing written).
                kwargs["default_root_dir"] = TensorBoardLogger(save_dir=root).log_dir
        try:
            return super().instantiate_trainer(**kwargs)
        except checks.trainer_errors() as err:
            raise checks.trainer_error(trainer, err) from None

    def after_fit(self) -> None:
        """Called by LightningCLI once ``Trainer.fit`` returns: the run's summary line, on stdout."""
        if line := run_summary(self.trainer, time.perf_counter() - self.started):
            print(line, flush=True)

    def after_instantiate_classes(self) -> None:
        """Puts the layer means the model was normalised with into the config (``model.layer_means``), so
        that the run's saved config.yaml says which were used and rerunning it uses exactly those."""
        self._subcommand_config().model.layer_means = self.model.hparams.get("layer_means")


def fit_main(argv: list[str], verbose: bool = False, callbacks: Sequence[Callback] = ()) -> None:
    """Runs ``fit`` (``argv`` starts with it) and turns what stops it into one line and an exit status (see
    :func:`nst_lightning.main.cli_main`); the web app's job processes call this too. ``callbacks``: more of the
    run's callbacks, besides those its config names (not saved in its config)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from nst_lightning.cli.fithelp import shortened

    try:
        with shortened(argv, "fit") as args:  # --help: this tool's settings first; --help-all: all of Lightning's
            StyleTransferCLI(args=args, verbose=verbose, callbacks=callbacks)
    except Interrupted as err:
        stop("interrupted", str(err), err.exit_code)
    except NSTError as err:
        stop("error", str(err), EXIT_ERROR)
    except SIGTERMException:  # Lightning's own SIGTERM handling, before RunGuard took over
        stop("interrupted", "SIGTERM before the optimisation started: nothing was written", 143)
    except KeyboardInterrupt:
        stop("interrupted", "Ctrl-C before the optimisation started: nothing was written", 130)
    except Exception as err:  # noqa: BLE001 - the device ran out of memory: one line; anything else is a bug
        if (shortage := out_of_memory(err)) is None:
            raise
        stop("error", str(shortage), EXIT_ERROR)
    except SystemExit as exit_:
        # Lightning answers a Ctrl-C inside fit, before RunGuard is armed, with sys.exit(1).
        if isinstance(exit_.__context__, KeyboardInterrupt):
            stop("interrupted", "Ctrl-C before the optimisation started: nothing was written", 130)
        raise
