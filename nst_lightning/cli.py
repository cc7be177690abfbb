"""The command line: LightningCLI over StyleTransfer and StyleTransferDataModule."""

from __future__ import annotations

import os
import sys
import warnings
from typing import NoReturn

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from nst_lightning.callbacks import ImageWriter
from nst_lightning.checkpoint import check_same_config, read_checkpoint
from nst_lightning.data import StyleTransferDataModule
from nst_lightning.errors import CheckpointError, ConfigError, Interrupted, NSTError
from nst_lightning.guard import RunGuard
from nst_lightning.image_io import check_writable, check_writable_dir
from nst_lightning.module import StyleTransfer
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
        for section, cls in (("data", StyleTransferDataModule), ("output", ImageWriter), ("guard", RunGuard)):
            cls(**config[section].as_dict())
        self._choose_precision(config)
        root = config.trainer.default_root_dir
        if root is None or "://" not in str(root):
            check_writable_dir(root or os.getcwd(), "trainer.default_root_dir")
        check_writable(config.output.path)

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
