"""A job's settings: the user's JSON of config keys made into ``fit``'s arguments, checked by the CLI's own code."""

from __future__ import annotations

import argparse
import json
import re
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nst_lightning.errors import NSTError

SECTIONS = ("data", "model", "guard")
"""Sections whose keys a job may set (the server sets the files and the output itself)."""
TRAINER_KEYS = ("trainer.max_steps", "trainer.precision")
"""The trainer settings a job may set; the rest (devices, logger, callbacks, folders) are the server's."""
TOP_KEYS = ("seed_everything",)
SERVER_KEYS = ("data.content", "data.style", "data.style_masks")
"""Keys under :data:`SECTIONS` that the server sets from the uploads."""
NAMED_WEIGHTS = ("imagenet", "random")
_KEY_IN_MESSAGE = re.compile(r"\b((?:data|model|trainer|guard|output)\.[A-Za-z_][\w.\[\]]*)")
_VALIDATE = threading.Lock()  # one LightningCLI parse at a time (it sets the global seed)


class SettingsError(NSTError):
    """A setting the server refuses; ``key`` names it (None when no one key is at fault)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"style_weight": 1e5}}`` (or ``{"model.style_weight": 1e5}``) as ``{"model.style_weight": 1e5}``."""
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and prefix == "" and "." not in key:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _plain_value(key: str, value: Any) -> str:
    """The command-line text of one value: scalars and lists of scalars only (no class paths, no objects)."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, (Mapping, list)) for item in items):
        raise SettingsError(f"{key} takes a number, a string or a list of them, not an object", key)
    if isinstance(value, str):
        return value
    return json.dumps(value)


def settings_arguments(settings: Mapping[str, Any], weights: Mapping[str, str]) -> list[str]:
    """``fit``'s dotted flags for a job's ``settings`` (config keys, nested or dotted). ``weights`` maps the
    names the server offers for ``model.weights`` to what the run gets (a name, or a file of the server's).

    Raises :class:`SettingsError` naming the key for one the server sets itself or does not offer; whether a
    value fits its key is left to :func:`validate`, which runs the command line's own parser and checks."""
    if not isinstance(settings, Mapping):
        raise SettingsError('settings must be a JSON object of config keys, such as {"data": {"image_size": 256}}')
    arguments = []
    for key, value in flatten(settings).items():
        section = key.split(".", 1)[0]
        allowed = (section in SECTIONS and "." in key) or key in TRAINER_KEYS or key in TOP_KEYS
        if key in SERVER_KEYS or section == "output":
            raise SettingsError(f"{key} is set by the server from the uploads: leave it out of the settings", key)
        if not allowed:
            raise SettingsError(
                f"{key} is not a setting a job can change: use data.*, model.*, guard.*, "
                f"{', '.join(TRAINER_KEYS)} or seed_everything",
                key,
            )
        if key == "model.weights":
            if value not in weights:
                raise SettingsError(f"model.weights {value!r} is not offered here: choose {', '.join(weights)}", key)
            value = weights[value]
        if key == "model.init" and value not in ("content", "style", "noise"):
            raise SettingsError("model.init must be content, style or noise (a file cannot be given here)", key)
        arguments.append(f"--{key}={_plain_value(key, value)}")
    return arguments


def fit_arguments(
    folder: Path, content: Path, styles: list[Path], settings: list[str], preview_every: int
) -> list[str]:
    """The arguments of ``nst-lightning fit`` that run a job whose files are in ``folder``: the uploads, the
    user's ``settings`` (from :func:`settings_arguments`), the output, logs and checkpoints in ``folder``."""
    style = str(styles[0]) if len(styles) == 1 else json.dumps([str(path) for path in styles])
    progress = {
        "class_path": "nst_lightning.serve.progress.JobProgress",
        "init_args": {"folder": str(folder), "preview_every_n_steps": preview_every},
    }
    return [
        "fit",
        f"--data.content={content}",
        f"--data.style={style}",
        *settings,
        f"--output.path={folder / 'result.png'}",
        f"--trainer.default_root_dir={folder}",
        "--trainer.enable_progress_bar=false",
        f"--trainer.callbacks={json.dumps([progress])}",
    ]


def _key_of(message: str) -> str | None:
    found = _KEY_IN_MESSAGE.search(message.replace("--", " "))
    return found.group(1).rstrip(".:") if found else None


def validate(arguments: list[str]) -> dict[str, Any]:
    """Parses ``fit``'s ``arguments`` and runs the command line's checks on them, as ``nst-lightning fit`` would
    before it loads anything; returns the parsed settings (model, data, trainer.max_steps) as plain values.
    Raises :class:`SettingsError` with the command line's own message and the key it names."""
    from nst_lightning import checks
    from nst_lightning.cli import StyleTransferCLI
    from nst_lightning.runtime import quiet_lightning

    class _Parsed(Exception):
        pass

    class _ParseOnly(StyleTransferCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            raise _Parsed(self.config)

    args = [arg for arg in arguments if arg != "fit"]
    try:
        with _VALIDATE, quiet_lightning(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ParseOnly(args=args, run=False, parser_kwargs={"exit_on_error": False})
    except _Parsed as parsed:
        config = parsed.args[0]
        return {
            "model": checks.plain(config.model.as_dict()),
            "data": checks.plain(config.data.as_dict()),
            "max_steps": config.trainer.max_steps,
        }
    except argparse.ArgumentError as err:
        message = " ".join(str(err).split())
        raise SettingsError(message, _key_of(message)) from None
    except NSTError as err:
        message = str(err)
        raise SettingsError(message, _key_of(message)) from None
    raise SettingsError("the settings could not be checked")  # _ParseOnly always raises
