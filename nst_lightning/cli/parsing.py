"""How the command line's settings are read: paths relative to the config file that holds them, and the parser
that reports a bad command line or config as one line."""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from nst_lightning.errors import EXIT_USAGE
from nst_lightning.names import SEED_MAX
from nst_lightning.run.checks import InputPath


def absolute_paths(value: Any) -> Any:
    """``value`` with every :data:`~nst_lightning.run.checks.InputPath` jsonargparse parsed (relative to the config
    file that held it, or to the working folder) made absolute, in place for a namespace: so that the classes,
    the run's saved config.yaml and its hparams name the same files from any folder."""
    if isinstance(value, InputPath):
        return InputPath(os.fspath(value)) if str(value) else value
    if isinstance(value, Namespace):
        for key in list(value.keys()):
            value[key] = absolute_paths(value[key])
        return value
    if isinstance(value, list):
        return [absolute_paths(item) for item in value]
    return value


class StyleTransferArgumentParser(LightningArgumentParser):
    """Reports a bad command line or config file (an unknown key, a wrong type) as one line; the usage
    text that argparse would print first is one ``--help`` away. Options are never abbreviated: argparse would
    read ``--weights`` as Lightning's ``--weights_only`` (``--weights`` is
    :data:`~nst_lightning.cli.early.SHORTHANDS`' instead)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def parse_args(self, *args: Any, **kwargs: Any) -> Namespace:
        """jsonargparse's parse, then ``seed_everything`` within numpy's range (Lightning raises a bare ValueError)."""
        config = super().parse_args(*args, **kwargs)
        command = config.get("subcommand") if isinstance(config, Namespace) else None
        seed = config.get(f"{command}.seed_everything" if command else "seed_everything")
        if isinstance(seed, int) and not isinstance(seed, bool) and not 0 <= seed <= SEED_MAX:
            self.error(
                f"seed_everything must be a whole number from 0 to {SEED_MAX} (or true for a random one), got {seed}"
            )
        return config

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            super().error(message, ex)
        detail = " ".join(str(message).split())
        sys.stderr.write(f"nst-lightning: error: {detail} (--help lists every key and its type)\n")
        self.exit(EXIT_USAGE)
