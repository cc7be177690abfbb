"""The weights a job may pick: only what this server can load, each with the backbones it loads with.

``imagenet`` is offered for the backbones whose download is already in the torch hub cache, checked (the
server may be offline), each file of the weights folder for the backbone read from it (a file that is no backbone of
this tool is left out, with the reason), and ``random`` (tests) for every backbone, last.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nst_lightning.errors import NSTError
from nst_lightning.names import NAMED_WEIGHTS
from nst_lightning.serve.settings import SettingsError, flatten

WEIGHT_SUFFIXES = (".pth", ".pt")


@dataclass
class Offer:
    """The weights offered: ``paths`` maps each name to what the run gets (a name, or a file of the server's),
    ``backbones`` each name to the backbones it loads with (the first is the one the page picks), ``refused``
    each file of the weights folder that is not offered to the reason."""

    paths: dict[str, str] = field(default_factory=dict)
    backbones: dict[str, list[str]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)


def offered_weights(weights_dir: Path | None) -> Offer:
    """What a job may pick for ``model.weights`` on this server (see the module's docstring)."""
    from nst_lightning.core.backbones import BACKBONES, check_cached_hash, file_backbone, hub_cache_file

    offer = Offer()
    cached = []
    for name in BACKBONES:
        if hub_cache_file(name).is_file():
            try:
                check_cached_hash(hub_cache_file(name))  # a damaged download would fail every job
                cached.append(name)
            except NSTError as err:
                offer.refused[f"imagenet ({name})"] = str(err)
    if cached and "imagenet" in NAMED_WEIGHTS:
        offer.paths["imagenet"], offer.backbones["imagenet"] = "imagenet", cached
    if weights_dir is not None and weights_dir.is_dir():
        for path in sorted(weights_dir.iterdir()):
            if path.suffix not in WEIGHT_SUFFIXES or not path.is_file():
                continue
            try:
                backbone = file_backbone(path.resolve())
            except NSTError as err:  # one line saying what the file is
                offer.refused[path.name] = str(err).replace(str(path.resolve()), path.name)
                continue
            offer.paths[path.name], offer.backbones[path.name] = str(path.resolve()), [backbone]
    if "random" in NAMED_WEIGHTS:
        offer.paths["random"], offer.backbones["random"] = "random", list(BACKBONES)
    return offer


def warnings_of(offer: Offer, weights_dir: Path) -> list[str]:
    """What the server says at its start about the weights: files left out, and no trained weights at all."""
    lines = [f"not offered to jobs: {reason}" for reason in offer.refused.values()]
    if set(offer.paths) <= {"random"}:
        lines.append(
            f"no trained weights to offer (jobs get random weights, which do not stylise): put a VGG-16 or VGG-19 "
            f"weights file in {weights_dir}, or the ImageNet download in the torch hub cache"
        )
    return lines


def check_choice(settings: Mapping[str, Any], offer: Offer, given_only: bool = False) -> None:
    """A job's ``model.weights`` (``imagenet`` when not given, as on the command line) must be offered, and its
    ``model.backbone`` (``auto`` when not given: the file's, or vgg19) one that those weights load with;
    ``given_only`` checks only weights the job gives. Raises :class:`SettingsError` naming the key; the message
    names settings, not command-line flags."""
    from nst_lightning.core.backbones import DEFAULT_BACKBONE
    from nst_lightning.names import AUTO

    if not isinstance(settings, Mapping):
        return  # settings_arguments says what settings must be
    chosen = flatten(settings)
    if given_only and "model.weights" not in chosen:
        return
    weights = chosen.get("model.weights", "imagenet")
    if not isinstance(weights, str) or weights not in offer.paths:
        shown = ", ".join(offer.paths) or "none (add weight files to the server's weights folder)"
        raise SettingsError(f"model.weights {weights!r} is not offered here: choose {shown}", "model.weights")
    backbone = chosen.get("model.backbone", AUTO)
    allowed = offer.backbones[weights]
    named = offer.paths[weights] in NAMED_WEIGHTS  # auto means vgg19 for these, the file's backbone for a file
    picked = (DEFAULT_BACKBONE if named else allowed[0]) if backbone == AUTO else backbone
    if picked not in allowed:
        why = f"{backbone} (meaning {picked})" if backbone == AUTO else repr(backbone)
        raise SettingsError(
            f"model.backbone {why} does not go with the weights {weights}: choose {' or '.join(allowed)}",
            "model.backbone",
        )
