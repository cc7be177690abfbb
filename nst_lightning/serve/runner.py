"""``python -m nst_lightning.serve.runner JOB_ID fit ...``: one server job, run as ``nst-lightning fit`` (the same
entry point, checks and exit statuses), stopped with one SIGTERM like the command line when the server goes away."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

SERVER_PID_VARIABLE = "NST_SERVER_PID"  # the server's process id, given to its runs
WATCH_SECONDS = 0.25  # how often a run looks whether its server is still there


def stop_with_server(server: int | None = None, every: float = WATCH_SECONDS) -> threading.Thread:
    """SIGTERM this process, once, when the server that started it (process ``server``, default: this one's
    parent as the server named it) is gone: the run then saves its image and checkpoint, which the next start
    resumes from. A thread that polls the parent's process id, rather than the kernel's parent-death signal:
    that signal comes again each time the run passes from one of the dying server's threads to the next, and a
    second SIGTERM quits at once, without the checkpoint."""
    if server is None:
        named = os.environ.get(SERVER_PID_VARIABLE, "")
        server = int(named) if named.isdigit() else os.getppid()

    def watch() -> None:
        while os.getppid() == server:
            time.sleep(every)
        os.kill(os.getpid(), signal.SIGTERM)  # once: this thread ends here

    thread = threading.Thread(target=watch, name="nst-server-watch", daemon=True)
    thread.start()
    return thread


def main(argv: list[str]) -> None:
    """Runs ``argv[1:]`` (``fit ...``) with :func:`~nst_lightning.cli.fit.fit_main`, the command line's ``fit``
    once its arguments are checked (the server checked them); ``argv[0]`` is the job's id, there so that the
    server can tell its runs from other processes."""
    stop_with_server()
    from nst_lightning.cli.fit import fit_main
    from nst_lightning.io.console import session

    sys.argv = sys.argv[:1]  # the run's arguments are fit_main's: Lightning's CLI warns where argv has others too
    with session(verbose=True):  # run.log: the tool's notes (the tiles, the history chosen), Lightning's lines
        fit_main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
