"""The command line: LightningCLI over StyleTransfer and StyleTransferDataModule."""

from __future__ import annotations

import sys
import warnings

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from nst_lightning.callbacks import ImageWriter
from nst_lightning.data import StyleTransferDataModule
from nst_lightning.errors import NSTError
from nst_lightning.module import StyleTransfer
from nst_lightning.runtime import set_default_threads

# Trainer defaults that differ from Lightning's: the seed's 300 iterations, one GPU at most
# (one image is one optimisation), and a scalar per step in TensorBoard.
TRAINER_DEFAULTS = {
    "trainer.max_steps": 300,
    "trainer.devices": 1,
    "trainer.log_every_n_steps": 1,
}


class StyleTransferCLI(LightningCLI):
    """LightningCLI with the ``output:`` section (an :class:`ImageWriter`) and the ``fit`` command only."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(StyleTransfer, StyleTransferDataModule, *args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {"fit": {"model", "train_dataloaders", "val_dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ImageWriter, "output")
        parser.set_defaults(TRAINER_DEFAULTS)


def cli_main(args: list[str] | None = None) -> None:
    """Entry point of ``python cli.py`` (and the ``nst-lightning`` command).

    A problem with the user's input ends the run with one line on stderr and exit status 1.
    Torch uses one thread per physical core unless ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) says
    otherwise.
    """
    set_default_threads()
    # The loader only paces the steps: worker processes would not help. The extractor is meant to
    # stay in eval mode. Neither needs a warning on every run.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", r".*module\(s\) in eval mode.*")
    # Raised inside Lightning 2.6 itself on every step; nothing a user can act on.
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    try:
        StyleTransferCLI(args=args)
    except NSTError as err:
        print(f"nst-lightning: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
