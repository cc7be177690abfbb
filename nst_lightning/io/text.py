"""How the project writes a path and a time for people: the standard library only, so that the rooms which
answer before Lightning loads (batch's plan and summary) write them as the console does."""

from __future__ import annotations

import contextlib
from pathlib import Path


def shown_path(path: str | Path) -> str:
    """A path as the user should type it: relative to the working directory when it lies inside it."""
    path = Path(path)
    with contextlib.suppress(ValueError, OSError):
        return str(path.absolute().relative_to(Path.cwd()))
    return str(path)


def duration(seconds: float) -> str:
    """``12.3 s`` under a minute, ``4m 05s`` under an hour, ``1h 02m 03s`` beyond."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"
