"""A job's settings: the user's JSON of config keys made into ``fit``'s arguments, checked by the CLI's own code."""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from nst_lightning.errors import NSTError
from nst_lightning.names import INITS, SEED_MAX

SECTIONS = ("data", "model", "guard")
"""Sections whose keys a job may set (the server sets the files and the output itself)."""
TRAINER_KEYS = ("trainer.max_steps", "trainer.precision")
"""The trainer settings a job may set; the rest (devices, logger, callbacks, folders) are the server's."""
TOP_KEYS = ("seed_everything",)
SERVER_KEYS = ("data.content", "data.style", "data.style_masks")
"""Keys under :data:`SECTIONS` that the server sets from the uploads."""
SEED_KEYS = ("seed_everything", "model.seed")
SEED_RANGE = (0, SEED_MAX)
"""What numpy takes as a seed (Lightning's seed_everything seeds numpy too)."""
INT64 = 2**63 - 1
DEFAULT_IMAGE_SIZE = 512
_KEY_IN_MESSAGE = re.compile(r"\b((?:data|model|trainer|guard|output)\.[A-Za-z_][\w.\[\]]*|seed_everything)")
_VALIDATE = threading.RLock()  # one LightningCLI parse at a time (it sets the global seed)


class SettingsError(NSTError):
    """A setting the server refuses; ``key`` names it (None when no one key is at fault)."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class JsonObject(dict):
    """A JSON object as parsed (``json.loads(..., object_pairs_hook=JsonObject)``), with the keys it gave more
    than once in ``repeated`` (a plain dict keeps the last one silently)."""

    def __init__(self, pairs: list[tuple[str, Any]]) -> None:
        super().__init__(pairs)
        seen: set[str] = set()
        self.repeated = [key for key, _ in pairs if key in seen or seen.add(key)]


def shown_key(key: str) -> str:
    """A key as a message shows it: quoted, with its code points, where it is empty or padded or has a look-alike
    or invisible letter."""
    return key if key and key.strip() == key and key.isascii() and key.isprintable() else json.dumps(key)


def _given_twice(key: str) -> SettingsError:
    return SettingsError(f"{shown_key(key)} is given twice (nested or dotted): send each setting once", key)


def flatten(settings: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"model": {"style_weight": 1e5}}`` (or ``{"model.style_weight": 1e5}``) as ``{"model.style_weight": 1e5}``.
    Raises :class:`SettingsError` for a key given twice (in one object of a :class:`JsonObject`, or nested and
    dotted), which would otherwise keep one of the values silently."""
    if repeated := getattr(settings, "repeated", None):
        raise _given_twice(f"{prefix}{repeated[0]}")
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        name = f"{prefix}{key}"
        nested = isinstance(value, Mapping) and prefix == "" and "." not in key
        for inner, inner_value in (flatten(value, f"{name}.") if nested else {name: value}).items():
            if inner in flat:
                raise _given_twice(inner)
            flat[inner] = inner_value
    return flat


def without_empty(settings: Any) -> Any:
    """A job's settings (config keys, nested or dotted) less the keys whose value is empty (``""`` or ``null``):
    an empty field of a form means the default, as a flag left out does. Anything but an object as it is."""
    if not isinstance(settings, Mapping):
        return settings
    return {key: value for key, value in flatten(settings).items() if value is not None and value != ""}


def may_set(key: str) -> bool:
    """Whether a job may set ``key`` (a parsed key, such as ``model.style_weight``)."""
    section = key.split(".", 1)[0]
    return (section in SECTIONS and "." in key and key not in SERVER_KEYS) or key in TRAINER_KEYS or key in TOP_KEYS


@functools.lru_cache(maxsize=1)
def known_keys() -> dict[str, str]:
    """The keys of ``fit``'s parser that a job may set, exactly as spelled there (no prefixes, no ``key+``), each
    with its type as text."""
    found: dict[str, str] = {}

    def collect(cli: Any) -> None:
        from nst_lightning.run.guard import RunGuard

        owners = {"model": cli.model_class, "data": cli.datamodule_class, "guard": RunGuard}
        owners["trainer"] = cli.trainer_class
        for key in cli.config.keys():  # the parsed configuration's keys, flat (dotted names)
            section, _, name = key.rpartition(".")
            if may_set(key) and section in owners:
                found[key] = str(inspect.signature(owners[section]).parameters[name].annotation)
            elif may_set(key):
                found[key] = "bool | int"  # seed_everything: Lightning's seed, or true for a random one

    with _VALIDATE:
        _parse(["--data.content=x.png", "--data.style=x.png"], check=False, hook=collect)
    return found


def _check_value(key: str, value: Any) -> None:
    """A value of the client's JSON: a scalar or a list of scalars; integers within 64 bits; finite numbers."""
    items = value if isinstance(value, list) else [value]
    if any(isinstance(item, (Mapping, list)) for item in items):
        raise SettingsError(f"{key} takes a number, a string or a list of them, not an object", key)
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool) and not -INT64 <= item <= INT64:
            raise SettingsError(f"{key}: {item} is out of range (a whole number within 64 bits)", key)
        if isinstance(item, float) and not math.isfinite(item):
            raise SettingsError(f"{key}: {item} is not a finite number", key)


def _check_seed(key: str, value: Any) -> None:
    if isinstance(value, bool) and key == "seed_everything":
        return  # true: a random seed, false: none
    if isinstance(value, bool) or not isinstance(value, int) or not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise SettingsError(f"{key} must be a whole number from {SEED_RANGE[0]} to {SEED_RANGE[1]}, got {value!r}", key)


def _plain_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def settings_arguments(settings: Mapping[str, Any], weights: Mapping[str, str]) -> list[str]:
    """``fit``'s dotted flags for a job's ``settings`` (config keys, nested or dotted). ``weights`` maps the
    names the server offers for ``model.weights`` to what the run gets (a name, or a file of the server's).

    Raises :class:`SettingsError` naming the key for one the server sets itself, does not offer, or that is not
    spelled as the parser spells it; a value of the wrong kind (an object, an integer beyond 64 bits, a seed out
    of range). Whether a value fits its key is left to :func:`validate`, which runs the command line's own parser
    and checks, and compares what it parsed with the server's own settings."""
    if not isinstance(settings, Mapping):
        raise SettingsError('settings must be a JSON object of config keys, such as {"data": {"image_size": 256}}')
    arguments = []
    for key, value in flatten(settings).items():
        bare = key.rstrip("+")
        shown = shown_key(key)
        if bare in SERVER_KEYS or key.split(".", 1)[0] == "output":
            raise SettingsError(f"{shown} is set by the server from the uploads: leave it out of the settings", key)
        if not may_set(bare):
            raise SettingsError(
                f"{shown} is not a setting a job can change: use data.*, model.*, guard.*, "
                f"{', '.join(TRAINER_KEYS)} or seed_everything",
                key,
            )
        if key != bare:
            raise SettingsError(
                f"{shown}: the append form is not taken here: send the whole list as {shown_key(bare)}", key
            )
        if key not in known_keys():
            raise SettingsError(f"{shown}: unrecognized setting (nst-lightning fit --help lists every key)", key)
        _check_value(key, value)
        if isinstance(value, list) and not any(kind in known_keys()[key] for kind in ("list", "Sequence")):
            raise SettingsError(f"{shown} takes one value, not a list", key)
        if key == "model.weights":
            if not isinstance(value, str) or value not in weights:
                raise SettingsError(f"model.weights {value!r} is not offered here: choose {', '.join(weights)}", key)
            value = weights[value]
        if key == "model.init" and value not in INITS:
            raise SettingsError("model.init must be content, style or noise (a file cannot be given here)", key)
        if key in SEED_KEYS:
            _check_seed(key, value)
        arguments.append(f"--{key}={_plain_value(value)}")
    return arguments


def longest_side(settings: Mapping[str, Any]) -> int | None:
    """The most pixels on an image's longest side that a job of these settings uses (``data.image_size`` times
    ``data.style_scale`` where it is over 1); None where the settings do not say it plainly."""
    flat = flatten(settings) if isinstance(settings, Mapping) else {}
    size, scale = flat.get("data.image_size", DEFAULT_IMAGE_SIZE), flat.get("data.style_scale", 1.0)
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (size, scale))
    if not numbers or not (1 <= size <= 1e5 and 0 < scale <= 1e3):
        return None
    return math.ceil(size * max(1.0, scale))


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


def _parse(arguments: list[str], check: bool = True, hook: Callable[[Any], None] | None = None) -> Any:
    """``fit``'s ``arguments`` parsed by the command line's parser (option names as spelled, no prefixes), then
    ``hook`` on the CLI (its ``config`` parsed), then (``check``) the command line's checks; returns the configuration.
    Raises :class:`SettingsError` with the command line's own message and the key it names."""
    from nst_lightning.cli.fit import StyleTransferCLI
    from nst_lightning.run.runtime import quiet_lightning

    class _Parsed(Exception):
        pass

    class _ParseOnly(StyleTransferCLI):
        def check_parsed(self) -> None:  # before the weights file or a checkpoint is read
            if hook is not None:
                hook(self)

        def before_instantiate_classes(self) -> None:
            if check:
                super().before_instantiate_classes()
            raise _Parsed(self.config)

    args = [arg for arg in arguments if arg != "fit"]
    try:
        with quiet_lightning(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _ParseOnly(args=args, run=False, parser_kwargs={"exit_on_error": False, "allow_abbrev": False})
    except _Parsed as parsed:
        return parsed.args[0]
    except argparse.ArgumentError as err:
        message = " ".join(str(err).split())
        raise SettingsError(message, _key_of(message)) from None
    except (NSTError, ValueError, TypeError, OverflowError) as err:  # ValueError: a seed numpy refuses
        message = " ".join(str(err).split()) or type(err).__name__
        raise SettingsError(message, getattr(err, "key", None) or _key_of(message)) from None
    raise SettingsError("the settings could not be checked")  # _ParseOnly always raises


def _confine(server: Any, config: Any, weights: Mapping[str, str]) -> None:
    """Refuses a parsed configuration that differs from the server's own (``server``) in a key a job may not set,
    or whose ``model.init`` / ``model.weights`` names a file the server does not offer, whatever spelling or form
    (prefix, ``key+``) reached the parser; and numbers the store or numpy cannot hold."""
    from nst_lightning.run import checks

    for key in sorted(set(server.keys()) | set(config.keys())):
        if not may_set(key) and checks.plain(server.get(key)) != checks.plain(config.get(key)):
            raise SettingsError(f"{key} is set by the server: leave it out of the settings", key)
    if checks.plain(config.model.init) not in INITS:
        raise SettingsError("model.init must be content, style or noise (a file cannot be given here)", "model.init")
    steps = config.trainer.max_steps
    if isinstance(steps, int) and steps > INT64:
        raise SettingsError(
            f"trainer.max_steps {steps} is over the most this server keeps ({INT64})", "trainer.max_steps"
        )
    _check_seed("model.seed", config.model.seed)
    # Last: where a job leaves model.weights out, its default (imagenet) may be what is not offered.
    offered = {*weights.values(), *(os.path.realpath(v) for v in weights.values() if os.path.isabs(v))}
    if str(checks.plain(config.model.weights)) not in offered:
        raise SettingsError(f"model.weights is not offered here: choose {', '.join(weights)}", "model.weights")


def validate(arguments: list[str], server_arguments: list[str], weights: Mapping[str, str]) -> dict[str, Any]:
    """Parses ``fit``'s ``arguments`` (the server's, ``server_arguments``, with the job's settings) and runs the
    command line's checks on them, as ``nst-lightning fit`` would before it loads anything; returns the parsed
    settings (model, data, trainer.max_steps) as plain values. What the parser made of the job's settings is
    compared with ``server_arguments`` parsed alone: a difference in a key a job may not set, a file as
    ``model.init`` or ``model.weights`` (other than the ``weights`` offered) is refused before any check runs, so
    that no setting, however spelled, reaches a server path. Raises :class:`SettingsError` naming the key."""
    from nst_lightning.run import checks

    with _VALIDATE:  # one LightningCLI parse at a time (it sets the global seed)
        server = _parse(server_arguments, check=False)
        config = _parse(arguments, hook=lambda cli: _confine(server, cli.config, weights))
    return {
        "model": checks.plain(config.model.as_dict()),
        "data": checks.plain(config.data.as_dict()),
        "max_steps": config.trainer.max_steps,
    }
