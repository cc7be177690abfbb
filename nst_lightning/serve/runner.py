"""``python -m nst_lightning.serve.runner JOB_ID fit ...``: one server job, run as ``nst-lightning fit`` (the same
entry point, checks and exit statuses), stopped with SIGTERM like the command line when the server goes away."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def stop_with_parent() -> None:
    """On Linux, SIGTERM this process when the server that started it dies (then the run saves its image and
    checkpoint, which the next start resumes from); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the server died before the line above took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str]) -> None:
    """Runs ``argv[1:]`` (``fit ...``) with :func:`~nst_lightning.main.cli_main`; ``argv[0]`` is the job's id, there
    so that the server can tell its runs from other processes."""
    stop_with_parent()
    from nst_lightning.main import cli_main

    cli_main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
