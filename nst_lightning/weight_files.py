"""A weights file explains itself: which backbone a state dict is, read from its convolutions' names and shapes.

A file may hold torchvision's whole model (``features.0.weight``, ``classifier.*``), its ``features`` alone
(``0.weight``), or Caffe-style names (``conv1_1.weight``, Keras' ``block1_conv1.weight``), under any common
prefix (``module.``, ``features.``); a classifier (``classifier.*``, ``fc*``) is ignored. The file is
recognised as the backbone whose layers it fits exactly, so ``model.backbone: auto`` (the default) takes
the backbone from the file; anything else is refused in one line saying what the file looks like.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nst_lightning.backbones import BACKBONES, backbone_spec, layer_names
from nst_lightning.errors import ConfigError, WeightsError
from nst_lightning.files import file_kind, file_stamp

AUTO = "auto"
"""``model.backbone``'s default: the backbone of the weights file, or :data:`DEFAULT_BACKBONE` without one."""
DEFAULT_BACKBONE = "vgg19"
"""The backbone for ``imagenet`` and ``random`` weights when ``model.backbone`` is ``auto`` (the seed's)."""
LABELS = {"vgg19": "VGG-19", "vgg16": "VGG-16", "resnet18": "ResNet-18"}
_VGG_DEPTHS = {8: 11, 10: 13, 13: 16, 16: 19}  # convolutions -> VGG-n
_RESNETS = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
            ((3, 4, 23, 3), True): 101, ((3, 8, 36, 3), True): 152}  # fmt: skip
_HEAD = re.compile(r"(classifier|fc\d*)")  # a classifier's first key segment: torchvision's, ResNet's, Caffe's
_CAFFE = re.compile(r"(?:conv(\d+)_(\d+)|block(\d+)_conv(\d+))\.(weight|bias)")
_COUNTER = "num_batches_tracked"  # batch norm's step counter: torch fills it in when a file lacks it


def read_state_dict(path: str | Path, shapes_only: bool = False) -> dict[str, Tensor]:
    """The state dict in the file ``path``, read with ``weights_only=True`` (a file cannot run code).

    ``shapes_only`` maps the file instead of reading it (what recognising it needs: keys and shapes) and
    skips the check for NaN and infinite values, which reads every value."""
    file = Path(path)
    kind = file_kind(file)  # from stat alone: a FIFO would block torch.load, /dev/zero never end
    if kind != "file":
        what = "weights file not found: " if kind == "missing" else ""
        found = "" if kind == "missing" else f" is {kind}, not a weights file"
        raise WeightsError(
            f"{what}{file}{found} (model.weights takes 'imagenet', 'random' or the path of a torchvision state dict)"
        )
    state: Any = None
    if shapes_only:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 - an older (non-zip) file cannot be mapped: read it below
            state = None
    try:
        if state is None:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Weights only load failed" in first:  # torch goes on to suggest weights_only=False: no
            first = "it is not a torch file, or it holds objects other than tensors"
        raise WeightsError(
            f"cannot load weights file {file}: {first} (it must be a torch state dict saved with torch.save)"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"{file} does not hold a state dict (a mapping of parameter names to tensors)")
    if shapes_only:
        return state
    # NaN or Inf in the weights would only show as a non-finite loss at the first step.
    damaged = [key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if damaged:
        more = f" and {len(damaged) - 1} more" if len(damaged) > 1 else ""
        raise WeightsError(
            f"weights file {file} holds NaN or infinite values (in {damaged[0]}{more}): the file is damaged; "
            "get the weights again"
        )
    return state


@functools.cache
def expected_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """The key and shape of every tensor of ``backbone``'s feature layers (from a weightless copy)."""
    spec = backbone_spec(backbone)
    with torch.device("meta"):
        state = spec.build().state_dict()
    return {key: tuple(value.shape) for key, value in state.items() if not key.endswith(_COUNTER)}


def _common_prefix(keys: list[str]) -> str:
    """The dotted segments every key starts with (``module.``, ``features.``), leaving each key two or more."""
    split = [key.split(".") for key in keys]
    prefix: list[str] = []
    while split and all(len(parts) > len(prefix) + 2 for parts in split):
        if len({parts[len(prefix)] for parts in split}) != 1:
            break
        prefix.append(split[0][len(prefix)])
    return "".join(f"{segment}." for segment in prefix)


def _body(state: Mapping[str, Tensor]) -> dict[str, str]:
    """The feature layers' keys of ``state``, without a common prefix or a classifier: {short key: key}."""
    outer = _common_prefix(list(state))
    body = {key[len(outer) :]: key for key in state if not _HEAD.fullmatch(key[len(outer) :].split(".")[0])}
    inner = _common_prefix(list(body))
    return {key[len(inner) :]: original for key, original in body.items()}


def _caffe_to_indices(body: dict[str, str], backbone: str) -> dict[str, str] | None:
    """``conv1_1.weight`` (or Keras' ``block1_conv1.weight``) keys renamed to ``backbone``'s layer indices;
    None when ``body`` does not use those names or ``backbone`` is no VGG."""
    if not body or not all(_CAFFE.fullmatch(key) for key in body) or BACKBONES[backbone].names is not layer_names:
        return None
    with torch.device("meta"):
        index = {name: str(i) for i, name in enumerate(layer_names(backbone_spec(backbone).build()))}
    renamed = {}
    for key, original in body.items():
        block, number, k_block, k_number, kind = _CAFFE.fullmatch(key).groups()
        name = f"conv{block or k_block}_{number or k_number}"
        if name not in index:
            return None
        renamed[f"{index[name]}.{kind}"] = original
    return renamed


def _fits(body: dict[str, str], state: Mapping[str, Tensor], backbone: str) -> bool:
    expected = expected_shapes(backbone)
    found = {key: tuple(state[original].shape) for key, original in body.items() if not key.endswith(_COUNTER)}
    return found == expected


def recognise(state: Mapping[str, Tensor], source: str) -> tuple[str, dict[str, Tensor]]:
    """(the backbone that ``state`` is, its feature layers' state dict in that backbone's own keys).

    Raises :class:`WeightsError` saying what ``state`` looks like when it is none of :data:`BACKBONES`."""
    body = _body(state)
    for backbone in BACKBONES:
        for keys in (body, _caffe_to_indices(body, backbone)):
            if keys is not None and _fits(keys, state, backbone):
                return backbone, {key: state[original] for key, original in keys.items()}
    *others, last = (LABELS[name] for name in BACKBONES)
    raise WeightsError(
        f"the weights file {source} holds {_describe(body, state)}: this tool takes a state dict of a "
        f"{', '.join(others)} or {last} (torchvision's keys, or Caffe's conv1_1 names)"
    )


def _describe(body: dict[str, str], state: Mapping[str, Tensor]) -> str:
    """What a state dict that is none of the backbones looks like, in a few words."""
    shapes = {key: tuple(state[original].shape) for key, original in body.items()}
    convs = [key for key, shape in shapes.items() if len(shape) == 4]
    if not convs:
        return f"no convolution weights (keys such as {', '.join(list(state)[:3]) or 'none'})"
    if any(key.startswith("layer1.") for key in shapes):
        blocks = tuple(len({key.split(".")[1] for key in shapes if key.startswith(f"layer{i}.")}) for i in range(1, 5))
        depth = _RESNETS.get((blocks, any(".conv3." in key for key in shapes)))
        if depth == 18:
            return f"a ResNet-18 whose layers' shapes are not torchvision's ({_first_difference(shapes, 'resnet18')})"
        return f"a ResNet-{depth}" if depth else f"a ResNet-like network with {blocks} blocks"
    vgg_like = all(_CAFFE.fullmatch(key) or re.fullmatch(r"\d+\.\w+", key) for key in shapes)
    if not vgg_like:
        return f"an unknown network ({len(convs)} convolutions, keys such as {', '.join(list(state)[:3])})"
    first = shapes[min(convs, key=lambda key: [int(n) for n in re.findall(r"\d+", key)])]
    if first[:3] == (3, 3, 3) and first[3] != 3:
        return f"a VGG-like network with {len(convs)} convolutions whose kernels are in TensorFlow's order " \
            "(height, width, in, out), not torch's (out, in, height, width)"  # fmt: skip
    if any(shapes[key][2:] != (3, 3) for key in convs):
        alexnet = len(convs) == 5 and first[2:] == (11, 11)
        return "an AlexNet" if alexnet else f"a stack of {len(convs)} convolutions, not all 3x3 as a VGG's"
    depth = _VGG_DEPTHS.get(len(convs))
    name = f"VGG-{depth}" if depth else f"VGG-like network with {len(convs)} convolutions"
    if any("running_" in key for key in shapes):
        return f"a {name} with batch normalisation (vgg{depth}_bn), which this tool does not build"
    backbone = {16: "vgg16", 19: "vgg19"}.get(depth or 0)
    if backbone is None:
        return f"a {name}"
    return f"a {name} whose layers' shapes are not torchvision's ({_first_difference(shapes, backbone)})"


def _first_difference(shapes: dict[str, tuple[int, ...]], backbone: str) -> str:
    expected = expected_shapes(backbone)
    names = {key: key for key in shapes}  # the file's own name of each of the backbone's keys
    if all(_CAFFE.fullmatch(key) for key in shapes):
        names = _caffe_to_indices(names, backbone) or {}
        shapes = {key: shapes[original] for key, original in names.items()}
    for key, shape in expected.items():
        if shapes.get(key) != shape:
            found = "missing" if key not in shapes else "x".join(map(str, shapes[key]))
            return f"{names.get(key, key)} is {found} where {LABELS[backbone]} has {'x'.join(map(str, shape))}"
    extra = sorted(set(shapes) - set(expected) - {key for key in shapes if key.endswith(_COUNTER)})
    return f"{names[extra[0]]} is not a layer of {LABELS[backbone]}" if extra else "layers in another order"


_RECOGNISED: dict[tuple[str, int, int], str] = {}


def file_backbone(path: str | Path) -> str:
    """The backbone of the weights file ``path`` (from its keys and shapes: the file is mapped, not read);
    remembered by (path, size, modification time) for the rest of the process."""
    stamp = file_stamp(path)
    key = (str(path), *stamp) if stamp is not None and file_kind(path) == "file" else None
    if key is None or key not in _RECOGNISED:
        backbone, _ = recognise(read_state_dict(path, shapes_only=True), str(path))
        if key is None:
            return backbone
        _RECOGNISED[key] = backbone
    return _RECOGNISED[key]


def mismatch(backbone: str, found: str, source: str) -> WeightsError:
    """The error for a ``model.backbone`` that the weights file contradicts: one line naming both."""
    return WeightsError(
        f"model.backbone is {backbone} but the weights file {source} holds a {LABELS[found]}: set model.backbone "
        f"to {found} or {AUTO} (the backbone of the file), or give {backbone} weights"
    )


def resolve_backbone(backbone: str, weights: str | None) -> str:
    """The backbone a run builds: ``backbone`` itself, checked against a weights file; for ``auto``, the
    file's backbone, or :data:`DEFAULT_BACKBONE` with ``imagenet`` or ``random`` weights (or none)."""
    if backbone != AUTO and backbone not in BACKBONES:
        raise ConfigError(f"unknown backbone {backbone!r}: choose {AUTO} (from the weights), {', '.join(BACKBONES)}")
    if weights is None or str(weights) in ("imagenet", "random"):
        return DEFAULT_BACKBONE if backbone == AUTO else backbone
    found = file_backbone(str(weights))
    if backbone not in (AUTO, found):
        raise mismatch(backbone, found, str(weights))
    return found
