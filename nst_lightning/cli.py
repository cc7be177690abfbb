"""The command line: LightningCLI over StyleTransfer and StyleTransferDataModule."""

from __future__ import annotations

import codecs
import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nst_lightning.callbacks import ImageWriter, partial_path
from nst_lightning.checkpoint import check_same_config, read_checkpoint
from nst_lightning.data import StyleTransferDataModule
from nst_lightning.errors import CheckpointError, ConfigError, Interrupted, NSTError
from nst_lightning.guard import RunGuard
from nst_lightning.image_io import check_outputs_apart, check_writable, check_writable_dir, file_kind
from nst_lightning.module import INITS, StyleTransfer
from nst_lightning.runtime import automatic_precision, keep_freed_memory, set_default_threads

# Trainer defaults that differ from Lightning's: the seed's 300 iterations, one GPU at most
# (one image is one optimisation), and a scalar per step in TensorBoard.
TRAINER_DEFAULTS = {
    "trainer.max_steps": 300,
    "trainer.devices": 1,
    "trainer.log_every_n_steps": 1,
}
# ``--ckpt_path`` values that Lightning resolves itself once the trainer exists.
_SPECIAL_CKPT_PATHS = {"last", "best", "hpc"}
# Exit statuses: a bad command line or config (argparse's convention), a user-facing error.
EXIT_USAGE, EXIT_ERROR = 2, 1
# Options whose value jsonargparse may read as a file: --config, and a section given as a file.
_FILE_OPTIONS = ("--config", "-c", "--model", "--data", "--trainer", "--output", "--guard", "--batch")
# What a Trainer raises for settings that cannot work on this machine (no GPU, devices 0, no torch_xla).
_TRAINER_ERRORS = (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError)
_ACCELERATORS = ("gpu", "cuda", "mps", "tpu", "hpu", "xla")


class StyleTransferArgumentParser(LightningArgumentParser):
    """Reports a bad command line or config file (an unknown key, a wrong type) as one line; the usage
    text that argparse would print first is one ``--help`` away."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        detail = " ".join(str(message).split())
        sys.stderr.write(f"nst-lightning: error: {detail} (--help lists every key and its type)\n")
        self.exit(EXIT_USAGE)


class StyleTransferCLI(LightningCLI):
    """LightningCLI with the ``output:`` section (an :class:`ImageWriter`), the ``guard:`` section (a
    :class:`RunGuard`) and the ``fit`` command only. Settings that cannot work are refused before
    the model (and its weights) loads."""

    # Whether output.path is this command's image (a batch names its own outputs).
    writes_output_path = True

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", StyleTransferArgumentParser)
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        parser_kwargs.setdefault("description", "nst-lightning: neural style transfer (Gatys et al.) with Lightning.")
        parser_kwargs.setdefault(
            "epilog",
            "commands: 'fit' stylises one image (python cli.py fit --help lists every setting); "
            "'batch' stylises many content/style pairs (python cli.py batch --help).",
        )
        kwargs["parser_kwargs"] = parser_kwargs
        super().__init__(StyleTransfer, StyleTransferDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ImageWriter, "output")
        parser.add_lightning_class_args(RunGuard, "guard")
        parser.set_defaults(TRAINER_DEFAULTS)

    def _subcommand_config(self):
        subcommand = self.config.get("subcommand")
        return self.config[subcommand] if subcommand else self.config

    def _parse_ckpt_path(self) -> None:
        """Checks ``--ckpt_path`` before anything loads: a readable nst-lightning checkpoint, made with
        the model and data settings of this run.

        LightningCLI's own version would instead overwrite this run's model settings with the
        checkpoint's, silently; here a difference is refused with the list of differing keys.
        """
        config = self._subcommand_config()
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or str(ckpt_path) in _SPECIAL_CKPT_PATHS or "://" in str(ckpt_path):
            return
        if config.get("weights_only") is False:
            raise CheckpointError(
                "checkpoints are only read with weights_only=True (a checkpoint cannot run code): "
                "drop --weights_only false"
            )
        checkpoint = read_checkpoint(ckpt_path, mmap=True)
        saved_means = (checkpoint.get("hyper_parameters") or {}).get("layer_means")
        if config.model.get("layer_means") is None and saved_means and config.model.get("normalize"):
            # The run goes on with the network it was normalised with, not with fresh measurements.
            config.model.layer_means = dict(saved_means)
        check_same_config(ckpt_path, checkpoint, model=config.model.as_dict(), data=config.data.as_dict())

    def before_instantiate_classes(self) -> None:
        """Refuses settings that cannot work before the model, and its weights, load."""
        config = self._subcommand_config()
        max_steps = config.trainer.max_steps
        if max_steps is None or max_steps < 1:
            raise ConfigError(
                f"trainer.max_steps must be at least 1 (one step is one L-BFGS iteration), got {max_steps}"
            )
        # These classes are cheap to build (no weights, no images): a throw-away build checks their
        # settings now rather than after the model has loaded.
        data = StyleTransferDataModule(**config.data.as_dict())
        for section, cls in (("output", ImageWriter), ("guard", RunGuard)):
            cls(**config[section].as_dict())
        self._choose_precision(config)
        check_trainer_settings(config.trainer)
        root = config.trainer.default_root_dir
        if root is None or "://" not in str(root):
            check_writable_dir(root or os.getcwd(), "trainer.default_root_dir")
        if self.writes_output_path:
            output = Path(config.output.path)
            check_outputs_apart(
                [("output.path", output, "output.path"), ("the partial image", partial_path(output), "output.path")],
                self.input_files(config),
            )
            check_writable(output)
        if config.data.content:  # a batch sets its images pair by pair
            data.check_sizes()  # from the files' headers: nothing is decoded or resized yet

    def input_files(self, config: Any | None = None) -> list[tuple[str, Path]]:
        """Every file the run reads, as (setting, path): the images, masks, init image, weights file,
        checkpoint and config files. No output may be one of them."""
        config = config if config is not None else self._subcommand_config()
        files: list[tuple[str, Path]] = []

        def add(setting: str, values: Any) -> None:
            for value in [values] if isinstance(values, str) else list(values or []):
                if value and "://" not in str(value):
                    files.append((setting, Path(str(value))))

        add("data.content", config.data.content)
        add("data.style", config.data.style)
        add("data.style_masks", config.data.style_masks)
        if config.model.init not in INITS:
            add("model.init", config.model.init)
        if config.model.weights not in ("imagenet", "random"):
            add("model.weights", config.model.weights)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and str(ckpt_path) not in _SPECIAL_CKPT_PATHS:
            add("--ckpt_path", str(ckpt_path))
        add("--config", [str(getattr(path, "absolute", path)) for path in config.get("config") or []])
        return files

    def check_run_outputs(self, trainer: Trainer, inputs: Sequence[tuple[str, Path]]) -> None:
        """The files a run writes in its log folder (config.yaml, hparams.yaml, snapshots,
        checkpoints) must not be inputs either; known once the trainer (and its logger) exists.

        A checkpoint may replace the one the run resumes from: it is a later state of the same run.
        """
        log_dir = Path(trainer.log_dir) if trainer.log_dir is not None else None
        outputs: list[tuple[str, Path, str]] = []
        fix = "trainer.default_root_dir (or the logger's version)"
        if log_dir is not None and "://" not in str(log_dir):
            outputs += [
                ("the run's config file", log_dir / "config.yaml", fix),
                ("the run's hyper-parameter file", log_dir / "hparams.yaml", fix),
                ("the run's snapshots", log_dir / "snapshots" / "step_*.png", fix),
            ]
        check_outputs_apart(outputs, inputs)
        checkpoints = RunGuard.checkpoint_dir(trainer)
        if "://" not in str(checkpoints):
            others = [(setting, path) for setting, path in inputs if setting != "--ckpt_path"]
            check_outputs_apart([("the run's checkpoints", checkpoints / "*.ckpt", fix)], others)

    def before_fit(self) -> None:
        """Called by LightningCLI with the trainer built, just before ``Trainer.fit``."""
        self.check_run_outputs(self.trainer, self.input_files())

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """LightningCLI's, with two changes: a run without a logger still gets a folder of its own,
        ``lightning_logs/version_N`` (Lightning would put its config.yaml, snapshots and checkpoints
        straight into ``default_root_dir``, the working folder by default, over any config.yaml
        there); and settings that cannot work here are one :class:`ConfigError`."""
        trainer = self._subcommand_config().trainer
        if trainer.logger is False and "logger" not in kwargs and "default_root_dir" not in kwargs:
            root = trainer.default_root_dir or os.getcwd()
            if "://" not in str(root):
                # The numbering TensorBoard would use; the logger itself is not used (nothing written).
                kwargs["default_root_dir"] = TensorBoardLogger(save_dir=root).log_dir
        try:
            return super().instantiate_trainer(**kwargs)
        except _TRAINER_ERRORS as err:
            raise trainer_error(trainer, err) from None

    def after_instantiate_classes(self) -> None:
        model = getattr(self, "model", None)  # the batch command builds its models later, per pair
        if model is not None:
            record_layer_means(self._subcommand_config(), model)

    @staticmethod
    def _choose_precision(config) -> None:
        """Where the config sets no ``trainer.precision`` (nor a precision plugin), the fastest that
        reaches the float32 result on this machine (:func:`~nst_lightning.runtime.automatic_precision`)."""
        trainer = config.trainer
        if trainer.precision is not None or trainer.plugins:
            return
        chosen = automatic_precision(trainer.accelerator)
        if chosen is None:
            return
        trainer.precision = chosen
        rank_zero_info(
            f"trainer.precision is not set: using {chosen}, since this CPU computes bfloat16 in AMX tiles "
            f"(about 2x faster); the last {config.model.float32_final_steps} iterations run in float32 "
            "(model.float32_final_steps); --trainer.precision 32-true keeps float32 throughout"
        )


def record_layer_means(config, model: StyleTransfer) -> None:
    """Puts the layer means the model was normalised with into ``config`` (``model.layer_means``), so
    that the run's saved config.yaml says which were used and rerunning it uses exactly those."""
    config.model.layer_means = model.hparams.get("layer_means")


def trainer_error(trainer: Any, err: BaseException) -> ConfigError:
    """The one line for trainer settings that Lightning refuses on this machine."""
    detail = " ".join(str(err).split()) or type(err).__name__
    accelerator = trainer.accelerator
    if isinstance(accelerator, str) and accelerator.lower() in _ACCELERATORS:
        return ConfigError(
            f"trainer.accelerator {accelerator} cannot be used on this machine ({detail}): use --trainer.accelerator "
            "cpu, or auto (a GPU where there is one)"
        )
    return ConfigError(
        f"the trainer settings cannot work here (trainer.accelerator {accelerator}, trainer.devices "
        f"{trainer.devices}): {detail}"
    )


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning's info lines (devices, seed, tips, "Trainer.fit stopped") off inside: for a
    throw-away Trainer, and for a batch, which prints a line per pair instead. Warnings still show."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def check_trainer_settings(trainer: Any) -> None:
    """Refuses, before anything loads, trainer settings that cannot work: an accelerator this machine
    does not have, no device, and more than one process for one image (``devices 2`` or
    ``num_nodes 2`` would run the same optimisation several times over, or wait for good for
    nodes that never come). A throw-away Trainer (nothing is run or written) resolves the settings
    as the real one will."""
    devices = trainer.devices
    if devices in (0, "0") or (isinstance(devices, (list, tuple)) and not devices):
        raise ConfigError(f"trainer.devices {devices} selects no device: set trainer.devices 1")
    plain = {
        key: trainer[key]
        for key in ("accelerator", "devices", "num_nodes", "strategy")
        if isinstance(trainer[key], (str, int, list))
    }
    try:
        with quiet_lightning(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trial = Trainer(
                **plain, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
            )
    except _TRAINER_ERRORS as err:
        raise trainer_error(trainer, err) from None
    if trial.world_size > 1:
        raise ConfigError(
            f"trainer.devices {trainer.devices} and trainer.num_nodes {trainer.num_nodes} would start "
            f"{trial.world_size} processes, each doing the same image (and a second node on this machine would be "
            "waited for forever): one image is one optimisation on one device, so set trainer.devices 1 and "
            "trainer.num_nodes 1; to share many images among devices, use batch.devices / batch.num_nodes "
            "with python cli.py batch"
        )


def check_config_files(argv: Sequence[str]) -> None:
    """A ``--config`` file (or a section given as a file) is read by jsonargparse, which would block
    for good on a FIFO and end in a UnicodeDecodeError traceback on a binary file: only regular
    files of UTF-8 text get that far. A value that is not a path is left to jsonargparse."""
    values = []
    for position, arg in enumerate(argv):
        option, equals, value = arg.partition("=")
        if option in _FILE_OPTIONS and equals:
            values.append((option, value))
        elif arg in _FILE_OPTIONS and position + 1 < len(argv):
            values.append((arg, argv[position + 1]))
    for option, value in values:
        kind = file_kind(value)
        if kind in ("missing", "file"):
            if kind == "file":
                _check_text(option, Path(value))
            continue  # missing: not a path (inline YAML), or jsonargparse says it is not found
        raise ConfigError(f"{option} {value} is {kind}, not a config file: give a YAML file")


def _check_text(option: str, path: Path) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"{option} {path} is not a text file (it is not UTF-8): give a YAML config file") from None
    except OSError as err:
        raise ConfigError(f"cannot read {option} {path}: {err.strerror or err}") from None


def _stop(prefix: str, message: str, code: int) -> NoReturn:
    print(f"nst-lightning: {prefix}: {message}", file=sys.stderr)
    raise SystemExit(code) from None


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``python cli.py`` (and the ``nst-lightning`` command): ``fit`` runs one
    optimisation, ``batch`` many (see :mod:`nst_lightning.batch`).

    Exit status: 0 when the run is done; 1 with one line on stderr for a problem with the input (or
    a batch in which some pair failed); 2 for a command line or config that does not parse;
    128 + the signal's number after Ctrl-C (130) or SIGTERM (143), once the partial image and a
    checkpoint are saved.
    Torch uses one thread per physical core unless ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) says
    otherwise; freed memory is kept for the next iteration (see :func:`~nst_lightning.runtime.keep_freed_memory`).
    """
    set_default_threads()
    keep_freed_memory()
    # The loader only paces the steps: worker processes would not help. The extractor is meant to
    # stay in eval mode. Neither needs a warning on every run.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", r".*module\(s\) in eval mode.*")
    # Raised inside Lightning 2.6 itself on every step; nothing a user can act on.
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    argv = sys.argv[1:] if args is None else list(args)
    try:
        check_config_files(argv)
    except NSTError as err:
        _stop("error", str(err), EXIT_USAGE)
    if argv[:1] == ["batch"]:
        _batch_main(argv[1:])
        return
    try:
        StyleTransferCLI(args=args)
    except Interrupted as err:
        _stop("interrupted", str(err), err.exit_code)
    except NSTError as err:
        _stop("error", str(err), EXIT_ERROR)
    except SIGTERMException:  # Lightning's own SIGTERM handling, before RunGuard took over
        _stop("interrupted", "SIGTERM before the optimisation started: nothing was written", 143)
    except KeyboardInterrupt:
        _stop("interrupted", "Ctrl-C before the optimisation started: nothing was written", 130)
    except SystemExit as exit_:
        # Lightning answers a Ctrl-C inside fit, before RunGuard is armed, with sys.exit(1).
        if isinstance(exit_.__context__, KeyboardInterrupt):
            _stop("interrupted", "Ctrl-C before the optimisation started: nothing was written", 130)
        raise


def _batch_main(args: list[str]) -> None:
    from nst_lightning.batch import batch_main  # imports this module

    try:
        status = batch_main(args)
    except Interrupted as err:
        _stop("interrupted", f"the batch stopped at {err}", err.exit_code)
    except NSTError as err:
        _stop("error", str(err), EXIT_ERROR)
    except KeyboardInterrupt:
        _stop("interrupted", "Ctrl-C: the batch stopped (batch.skip_existing: true skips the pairs done)", 130)
    if status:
        raise SystemExit(status)
