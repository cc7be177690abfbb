"""The command line's mistakes that can be told before torch and Lightning load (which takes seconds): a
missing config file, an input image that is not there, an output that exists or is an input, a batch whose
outputs exist.

The few settings these need are read from the command line and its config files as jsonargparse reads them
(config files in order, then flags; the later wins; an input path in a config file is relative to that file),
and the checks are :mod:`nst_lightning.io.files`' and :mod:`nst_lightning.batch.pairs`', with their messages. Where a
value cannot be known this cheaply (a section given as a file, a key set in a way this reading does not follow),
and for a resumed run (whose checkpoint the full parse checks before anything else), the checks are left to the
full parse, which makes every check again: this module only makes a mistake quicker to
report, never a run different. Nothing here imports torch, Lightning or Pillow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from nst_lightning.errors import ConfigError
from nst_lightning.io.files import (
    check_image_file,
    check_new_output,
    check_outputs_apart,
    check_text_file,
    file_kind,
    is_remote,
)

# The settings that name files the run reads: relative to the config file that holds them (jsonargparse's
# path types), to the working folder on the command line.
INPUT_KEYS = ("data.content", "data.style", "data.style_masks", "model.init", "model.weights")
# Values of input settings that are not files.
NOT_FILES = ("", "content", "style", "noise", "imagenet", "random")
_CONFIG_OPTIONS = ("--config", "-c")
# Options whose value jsonargparse may read as a file: --config, and a section given as a file.
FILE_OPTIONS = ("--config", "-c", "--model", "--data", "--trainer", "--output", "--guard", "--batch")
# Options without a value of their own, and options after which the run does something else (or nothing).
_STOPS = ("-h", "--help", "--print_config")


SHORTHANDS = {"--weights": "--model.weights", "--backbone": "--model.backbone"}
"""The one-shot form's flags that ``fit`` and ``batch`` take too, as the dotted keys they stand for."""


def expand_shorthands(argv: list[str]) -> list[str]:
    """``argv`` with :data:`SHORTHANDS` (``--weights FILE``, ``--weights=FILE``) as the keys they stand for."""
    expanded = []
    for arg in argv:
        option, equals, value = arg.partition("=")
        expanded.append(f"{SHORTHANDS[option]}{equals}{value}" if option in SHORTHANDS else arg)
    return expanded


def check_config_files(argv: Sequence[str]) -> None:
    """A ``--config`` file (or a section given as a file) is read by jsonargparse, which would block
    for good on a FIFO and end in a UnicodeDecodeError traceback on a binary file: only regular
    files of UTF-8 text get that far. A ``--config`` that is neither a file nor inline YAML (a mapping) is
    refused here, before anything loads; other values that are not paths are left to jsonargparse."""
    values = []
    for position, arg in enumerate(argv):
        option, equals, value = arg.partition("=")
        if option in FILE_OPTIONS and equals:
            values.append((option, value))
        elif arg in FILE_OPTIONS and position + 1 < len(argv):
            values.append((arg, argv[position + 1]))
    for option, value in values:
        kind = file_kind(value)
        if kind == "file":
            check_text_file(value, option)
        elif kind != "missing":
            raise ConfigError(f"{option} {value} is {kind}, not a config file: give a YAML file")
        elif option in ("--config", "-c") and not _inline_yaml(value):
            raise ConfigError(
                f"{option} {value}: no such file (give the path of a YAML config file, or a shipped config's "
                "name: nst-lightning configs lists them)"
            )


def _inline_yaml(value: str) -> bool:
    """Whether a ``--config`` value is a config itself (a YAML mapping such as ``{model: {tv_weight: 1}}``)."""
    try:
        return isinstance(yaml.safe_load(value), dict)
    except yaml.YAMLError:
        return False


class Unknown(Exception):
    """A command line this reading does not follow: its checks are left to the full parse."""


_SECTIONS = ("model", "data", "trainer", "output", "guard", "batch")


def _flatten(tree: dict, base: Path, into: dict[str, tuple[Any, Path]], prefix: str = "") -> None:
    for key, value in tree.items():
        if not isinstance(key, str) or not (prefix or key in (*_SECTIONS, "seed_everything", "ckpt_path")):
            raise Unknown(key)  # not a config of fit or batch as this reading knows one
        if isinstance(value, dict) and not prefix:
            _flatten(value, base, into, f"{key}.")
        else:
            into[f"{prefix}{key}"] = (value, base)


def _config(value: str, into: dict[str, tuple[Any, Path]]) -> None:
    """The keys a ``--config`` value sets: a YAML file's, or inline YAML's (a mapping)."""
    kind = file_kind(value)
    if kind == "file":
        try:
            tree = yaml.safe_load(Path(value).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            raise Unknown(value) from None  # the full parse says what is wrong with it
        base = Path(value).parent
    else:
        try:
            tree = yaml.safe_load(value)
        except yaml.YAMLError:
            tree = None
        base = Path()
    if tree is None:
        return  # an empty file sets nothing
    if not isinstance(tree, dict):
        raise Unknown(value)
    _flatten(tree, base, into)


def read_settings(argv: Sequence[str]) -> dict[str, tuple[Any, Path]]:
    """The dotted keys that ``argv`` (the arguments after ``fit`` or ``batch``) sets, each as (value, the folder
    a relative input path in it is relative to). Raises :class:`Unknown` for a command line this reading does
    not follow (:func:`check_config_files` has checked the ``--config`` values)."""
    settings: dict[str, tuple[Any, Path]] = {}
    args, position = list(argv), 0
    while position < len(args):
        option, equals, value = args[position].partition("=")
        if option in _STOPS or not option.startswith("-"):
            raise Unknown(option)
        if not equals:
            if position + 1 >= len(args) or args[position + 1].startswith("--"):
                raise Unknown(option)  # a flag without a value: not one of those followed here
            value = args[position + 1]
            position += 1
        position += 1
        if option in _CONFIG_OPTIONS:
            _config(value, settings)
        elif option.startswith("--") and "." in option:
            try:
                parsed = yaml.safe_load(value)
            except yaml.YAMLError:
                parsed = value
            # A path stays as typed ("0001.jpg" is no number); a list or a bool is YAML's.
            settings[option[2:]] = (parsed if isinstance(parsed, (list, bool)) or parsed is None else value, Path())
        elif option in ("--ckpt_path", "--seed_everything"):
            settings[option[2:]] = (value, Path())
        else:
            raise Unknown(option)  # a section given as a file (--model FILE), or an option of the full parser
    return settings


def setting_paths(settings: dict[str, tuple[Any, Path]], key: str) -> list[Path]:
    """The files a setting names (one or a list), made absolute as jsonargparse makes them; [] if unset."""
    value, base = settings.get(key, (None, Path()))
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in values) or any(is_remote(item) for item in values):
        return []
    return [Path(os.path.join(os.getcwd(), base, item)) for item in values if item not in NOT_FILES]


def setting_string(settings: dict[str, tuple[Any, Path]], key: str) -> str | None:
    value = settings.get(key, (None,))[0]
    return value if isinstance(value, str) and value else None


def setting_flag(settings: dict[str, tuple[Any, Path]], key: str) -> bool | None:
    value = settings.get(key, (False,))[0]
    return value if isinstance(value, bool) else None


def check_fit(argv: Sequence[str]) -> None:
    """``fit``'s file mistakes, in the order the full checks meet them: the output is one of the inputs, or exists
    without ``--output.overwrite``; an input image is missing, a folder or a special file."""
    try:
        settings = read_settings(argv)
    except Unknown:
        return
    if setting_string(settings, "ckpt_path") is not None:
        return  # a resumed run: the full parse checks its checkpoint (with torch) before everything else
    inputs = [(key, path) for key in INPUT_KEYS for path in setting_paths(settings, key)]
    output, overwrite = setting_string(settings, "output.path"), setting_flag(settings, "output.overwrite")
    if output is not None and not is_remote(output):
        check_outputs_apart([("output.path", Path(output), "output.path")], inputs)
        if overwrite is not None:
            check_new_output(Path(output), overwrite, "output.path")
    for key in ("data.content", "data.style"):
        for path in setting_paths(settings, key):
            check_image_file(path)
