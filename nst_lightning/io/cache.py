"""The user's cache folder, and what is kept there: each network's layer means, measured once per weights file.

Normalising a network (``model.normalize``) divides each layer by its mean activation on the calibration images;
measuring those takes a second or more (five images through the network), the same second at every start. The
means are kept in ``$NST_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/nst-lightning``, else
``~/.cache/nst-lightning``, one small JSON file per network: keyed by the backbone, the weights file's identity
(its path, size and modification time; ``imagenet`` by the torch hub's file), the pooling, the deepest layer
and the calibration images. A file that cannot be read or does not match is ignored and written again; a folder
that cannot be written is no error (the means are measured again next time). The run's saved config records the
means used (``model.layer_means``) either way.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nst_lightning.io.files import atomic_write, file_stamp

CACHE_ENV = "NST_LIGHTNING_CACHE"
"""The environment variable that moves the cache folder."""
_FORMAT = 1  # bump when what a cache file holds, or how the means are measured, changes


def cache_dir() -> Path:
    """``$NST_LIGHTNING_CACHE``, else ``$XDG_CACHE_HOME/nst-lightning``, else ``~/.cache/nst-lightning``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "nst-lightning"


def weights_identity(weights: str | None, hub_file: Path | None = None) -> list[Any] | None:
    """What tells one weights file from another: ``random`` as it is (seeded), a file (``hub_file`` for
    ``imagenet``) as its absolute path, size and modification time; None where there is no file to go by."""
    if weights == "random":
        return ["random"]
    path = hub_file if weights == "imagenet" else Path(weights) if weights else None
    stamp = file_stamp(path) if path is not None else None
    return None if stamp is None else [os.path.abspath(path), *stamp]


def _calibration_identity(images: Path, size: int) -> list[Any]:
    return [size, sorted([path.name, *(file_stamp(path) or ())] for path in images.glob("*.jpg"))]


def means_key(backbone: str, weights: list[Any], pooling: str, deepest: str, images: Path, size: int) -> dict[str, Any]:
    """The cache key of one normalised network (see the module's docstring)."""
    return {
        "format": _FORMAT,
        "backbone": backbone,
        "weights": weights,
        "pooling": pooling,
        "deepest": deepest,
        "calibration": _calibration_identity(images, size),
    }


def _file(key: Mapping[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir() / "layer_means" / f"{key['backbone']}-{digest}.json"


def load_means(key: Mapping[str, Any]) -> dict[str, float] | None:
    """The means kept for ``key``, or None (none kept, or a file that is damaged or holds another key)."""
    try:
        stored = json.loads(_file(key).read_text(encoding="utf-8"))
        means = stored["means"]
        if stored["key"] != json.loads(json.dumps(key)) or not isinstance(means, dict):
            return None
        values = {str(name): float(value) for name, value in means.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # damaged or foreign: measured again
        return None
    return values if values and all(math.isfinite(value) for value in values.values()) else None


def store_means(key: Mapping[str, Any], means: Mapping[str, float]) -> None:
    """Keeps ``means`` for ``key`` (atomically: a reader never sees half a file); a failure is no error."""
    text = json.dumps({"key": key, "means": dict(means)}, indent=1, sort_keys=True).encode()
    try:
        atomic_write(_file(key), lambda handle: handle.write(text))
    except OSError:  # a read-only or full disk: the means are measured again next time
        pass
