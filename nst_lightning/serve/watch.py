"""``nst-lightning CONTENT STYLE ... --watch [PORT]``: the web app's live page for one command-line run.

The command line's side, which loads nothing heavy: the extra's check and the port, both before torch loads
(:func:`check_extras`, :func:`listen`) and the run's progress in memory (:class:`Hub`). The server is
:mod:`.watch_app` (read-only: GET and HEAD, nothing from a client reaches a file or the run), whose
:func:`~nst_lightning.serve.watch_app.watching` serves the page while the run lasts; the run feeds the hub through
:class:`~nst_lightning.serve.watch_feed.WatchFeed`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from nst_lightning.errors import ConfigError

HOST = "127.0.0.1"
EXTRAS = ("fastapi", "uvicorn")
JOB_ID = "run"
"""The one job the page shows, as the web app's API names it (``/api/jobs/run``)."""


def check_extras() -> None:
    """``--watch`` needs the web app's extra: one line naming what to install when it is missing (looked for, not
    imported: this comes before torch loads)."""
    missing = []
    for name in EXTRAS:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken or blocked module
            found = False
        if not found:
            missing.append(name)
    if missing:
        names = ", ".join(missing)
        raise ConfigError(f"--watch needs the web app's extra ({names} missing): pip install 'nst-lightning[web]'")


def listen(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` (0: a free port), before anything runs: a port in use is one line."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((HOST, port))
        listener.listen(64)
    except OSError as err:
        listener.close()
        raise ConfigError(
            f"--watch cannot listen on {HOST}:{port} ({err.strerror or err}): give another port, or --watch 0 for a "
            "free one"
        ) from None
    return listener


def url(listener: socket.socket) -> str:
    return f"http://{HOST}:{listener.getsockname()[1]}/"


class Hub:
    """A watched run's progress, in memory: the records a server job's ``progress.jsonl`` holds (``start``, steps
    with their losses, ``preview``), the latest image as PNG bytes and the command's state. The run's threads
    write it, the server's read it."""

    def __init__(self, names: dict[str, Any]) -> None:
        self.names = names
        self.state = "running"
        self.error: str | None = None
        self._records: list[dict[str, Any]] = []
        self._image: bytes | None = None
        self._streams = 0
        self._changed = threading.Condition()

    def add(self, *records: dict[str, Any]) -> None:
        with self._changed:
            self._records.extend(records)

    def records(self) -> list[dict[str, Any]]:
        """The records so far (a copy)."""
        with self._changed:
            return list(self._records)

    def set_image(self, png: bytes, step: int) -> None:
        """The image after ``step`` steps, as PNG bytes (encoded off the loop's thread)."""
        with self._changed:
            self._image = png
            self._records.append({"preview": step, "time": time.time()})

    def image(self) -> bytes | None:
        with self._changed:
            return self._image

    def finish(self, state: str, error: str | None = None) -> None:
        with self._changed:
            self.state, self.error = state, error

    @contextlib.contextmanager
    def stream(self) -> Iterator[None]:
        """Counts an open event stream while it lasts."""
        with self._changed:
            self._streams += 1
        try:
            yield
        finally:
            with self._changed:
                self._streams -= 1
                self._changed.notify_all()

    def wait_streams(self, timeout: float) -> None:
        """Waits (up to ``timeout`` s) until every event stream has ended: each has sent the last state."""
        with self._changed:
            self._changed.wait_for(lambda: self._streams == 0, timeout)


def finished_state(code: object) -> tuple[str, str | None]:
    """The page's state of a command that ended with exit status ``code`` (SystemExit's), and the error shown."""
    if code in (None, 0):
        return "done", None
    if code in (130, 143):
        return "cancelled", "the command was stopped: the terminal says where its image and checkpoint are"
    return "failed", f"the command ended with exit status {code}: the terminal says why"
