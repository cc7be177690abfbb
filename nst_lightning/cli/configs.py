"""The shipped configs: where they are, found by name (``--config default``), listed (``nst-lightning configs``).

The shipped configs are the repository's ``configs/`` folder. A wheel installs it beside the package, as
``nst_lightning_configs/``, so that the paths inside (``../nst_lightning/samples/...``, relative to the
config file) name the same sample images in a checkout and in an installed package.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from nst_lightning.errors import ConfigError

_PACKAGE_PARENT = Path(__file__).resolve().parents[2]
# Where the shipped configs are: installed from a wheel, or in a checkout (an editable install, cli.py).
_SHIPPED_DIRS = (_PACKAGE_PARENT / "nst_lightning_configs", _PACKAGE_PARENT / "configs")
CONFIG_OPTIONS = ("--config", "-c")


def shipped_dir() -> Path | None:
    """The folder of the shipped configs, or None where there is none (a package installed without them)."""
    for folder in _SHIPPED_DIRS:
        if (folder / "default.yaml").is_file():
            return folder
    return None


def shipped_configs() -> dict[str, Path]:
    """The shipped configs by name (the file name without ``.yaml``), sorted; ``default`` first."""
    folder = shipped_dir()
    if folder is None:
        return {}
    names = sorted(folder.glob("*.yaml"), key=lambda p: (p.stem != "default", p.stem))
    return {path.stem: path for path in names}


def description(path: Path) -> str:
    """A config's one-line description: its first comment line."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def config_list() -> str:
    """What ``nst-lightning configs`` prints: each shipped config's name and description, and how to use them."""
    configs = shipped_configs()
    if not configs:
        return "no shipped configs found beside the package (reinstall nst-lightning)"
    width = max(len(name) for name in configs)
    lines = [f"  {name:<{width}}  {description(path)}" for name, path in configs.items()]
    folder = shipped_dir()
    return "\n".join(
        [
            f"Shipped configs (in {folder}); use one by name from any folder, e.g. nst-lightning fit --config default;",
            "an overlay goes after default: --config default --config quick. Paths inside a config are relative to it.",
            *lines,
        ]
    )


def _looks_like_a_name(value: str) -> bool:
    """A bare word such as ``default`` or ``quick.yaml``, not a path or inline YAML (``{...}``, ``key: value``)."""
    return bool(value) and not any(char in value for char in "/\\:{}[]\n ") and not value.startswith(".")


def resolve_config_names(argv: Sequence[str]) -> list[str]:
    """``argv`` with each ``--config NAME`` that is not a file but names a shipped config (``default``,
    ``quick.yaml``) replaced by that config's path. A file of that name in the working folder comes first;
    a bare name that is neither is a :class:`ConfigError` listing the names."""
    args = list(argv)
    for position, arg in enumerate(args):
        option, equals, value = arg.partition("=")
        if option in CONFIG_OPTIONS and equals:
            index = position
        elif arg in CONFIG_OPTIONS and position + 1 < len(args):
            index, option, value = position + 1, arg, args[position + 1]
        else:
            continue
        if os.path.lexists(value) or not _looks_like_a_name(value):
            continue
        configs = shipped_configs()
        path = configs.get(value[:-5] if value.endswith(".yaml") else value)
        if path is None:
            names = ", ".join(configs) or "none found"
            raise ConfigError(
                f"--config {value}: no such file, nor a shipped config of that name (shipped: {names}; "
                "nst-lightning configs describes them)"
            )
        args[index] = f"{option}={path}" if index == position else str(path)
    return args
