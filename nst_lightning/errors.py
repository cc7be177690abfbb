"""User-facing errors.

Anything raised as an :class:`NSTError` is a problem with the user's input or environment, not a
bug: the command line prints its message as one line and exits non-zero, without a traceback.
Messages name the problem and the fix.
"""

import signal
import sys
from typing import NoReturn

# Exit status of a problem with the input (or a batch in which some pair failed).
EXIT_ERROR = 1
# Exit status of a bad command line or config (argparse's convention).
EXIT_USAGE = 2


class NSTError(Exception):
    """Base class of the errors that the CLI reports as one clear line."""


class ConfigError(NSTError, ValueError):
    """A configuration value that cannot work (unknown layer, bad weight, too small an image...)."""


class ImageError(NSTError):
    """An image that cannot be read, or an output that cannot be written."""


class WeightsError(NSTError):
    """Backbone weights that cannot be had or do not fit the network."""


class NumericalError(NSTError):
    """The optimisation produced a non-finite loss or gradient."""


class OutOfMemory(NSTError):
    """The device ran out of memory during a run that its memory plan let start (see ``run.memory.out_of_memory``)."""


class CheckpointError(NSTError):
    """A checkpoint that cannot be read, written, or resumed from with this configuration."""


class Interrupted(NSTError):
    """The run was stopped by SIGINT (Ctrl-C) or SIGTERM at a step boundary, after saving its work.

    The callbacks that save the work fill in :attr:`image` and :attr:`checkpoint` (or
    :attr:`checkpoint_error`) before the exception leaves ``Trainer.fit``; a caller that resumes
    runs its own way (``batch``) sets :attr:`advice`, how to go on, instead of the ``--ckpt_path``
    default. The CLI exits with :attr:`exit_code`, 128 + the signal number (130 for SIGINT, 143 for
    SIGTERM), as shells do.
    """

    def __init__(self, signum: int, step: int, max_steps: int) -> None:
        super().__init__(signum, step, max_steps)
        self.signum, self.step, self.max_steps = signum, step, max_steps
        self.image: object | None = None
        self.checkpoint: object | None = None
        self.checkpoint_error: str | None = None
        self.advice: str | None = None

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        try:
            name = signal.Signals(self.signum).name
        except ValueError:
            name = f"signal {self.signum}"
        text = f"{name}: stopped after step {self.step} of {self.max_steps}"
        if self.image is not None:
            text += f"; the partial image is in {self.image}"
        if self.checkpoint is None and self.checkpoint_error:
            text += f"; no checkpoint could be written: {self.checkpoint_error}"
        if self.advice:
            text += f"; to go on, {self.advice}"
        elif self.checkpoint is not None:
            text += f"; to go on, run the same command with --ckpt_path {self.checkpoint}"
        return text


def stop(prefix: str, message: str, code: int) -> NoReturn:
    """Ends the command with one line on stderr (``nst-lightning: error: ...``) and exit status ``code``."""
    print(f"nst-lightning: {prefix}: {message}", file=sys.stderr)
    raise SystemExit(code) from None
