"""A weights file explains itself: which backbone a state dict is, read from its convolutions' names and shapes.

A file may hold torchvision's whole model (``features.0.weight``, ``classifier.*``), its ``features`` alone
(``0.weight``), or Caffe-style names (``conv1_1.weight``, Keras' ``block1_conv1.weight``), under any common
prefix (``module.``, ``features.``); a classifier (``classifier.*``, ``fc*``) is ignored. The file is
recognised as the backbone whose layers it fits exactly (:func:`recognise`, given each backbone's
:class:`Layout` by :mod:`nst_lightning.core.backbones`, which resolves ``model.backbone: auto`` with it); anything
else is refused in one line saying what the file looks like.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from nst_lightning.errors import WeightsError
from nst_lightning.io.files import file_kind

LABELS = {"vgg19": "VGG-19", "vgg16": "VGG-16", "resnet18": "ResNet-18"}
_VGG_DEPTHS = {8: 11, 10: 13, 13: 16, 16: 19}  # convolutions -> VGG-n
_RESNETS = {
    ((2, 2, 2, 2), False): 18,
    ((3, 4, 6, 3), False): 34,
    ((3, 4, 6, 3), True): 50,
    ((3, 4, 23, 3), True): 101,
    ((3, 8, 36, 3), True): 152,
}
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


@dataclass(frozen=True)
class Layout:
    """What one backbone's feature layers hold: each key's shape (batch norm's step counters aside) and, for a
    VGG, the layer index of each Caffe-style convolution name (``conv1_1``: 0)."""

    shapes: dict[str, tuple[int, ...]]
    conv_indices: dict[str, int] | None = None


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


def _caffe_to_indices(body: dict[str, str], layout: Layout) -> dict[str, str] | None:
    """``conv1_1.weight`` (or Keras' ``block1_conv1.weight``) keys renamed to the layer indices of ``layout``;
    None when ``body`` does not use those names or ``layout`` is no VGG's."""
    if not body or layout.conv_indices is None or not all(_CAFFE.fullmatch(key) for key in body):
        return None
    renamed = {}
    for key, original in body.items():
        block, number, k_block, k_number, kind = _CAFFE.fullmatch(key).groups()
        name = f"conv{block or k_block}_{number or k_number}"
        if name not in layout.conv_indices:
            return None
        renamed[f"{layout.conv_indices[name]}.{kind}"] = original
    return renamed


def recognise(state: Mapping[str, Tensor], source: str, layouts: Mapping[str, Layout]) -> tuple[str, dict[str, Tensor]]:
    """(the backbone of ``layouts`` that ``state`` is, its feature layers' state dict in that backbone's own keys).

    Raises :class:`WeightsError` saying what ``state`` looks like when it fits none of them."""
    body = _body(state)
    for backbone, layout in layouts.items():
        for keys in (body, _caffe_to_indices(body, layout)):
            found = {key: tuple(state[original].shape) for key, original in (keys or {}).items()}
            if keys and {key: shape for key, shape in found.items() if not key.endswith(_COUNTER)} == layout.shapes:
                return backbone, {key: state[original] for key, original in keys.items()}
    *others, last = (LABELS.get(name, name) for name in layouts)
    raise WeightsError(
        f"the weights file {source} holds {_describe(body, state, layouts)}: this tool takes a state dict of a "
        f"{', '.join(others)} or {last} (torchvision's keys, or Caffe's conv1_1 names)"
    )


def _describe(body: dict[str, str], state: Mapping[str, Tensor], layouts: Mapping[str, Layout]) -> str:
    """What a state dict that is none of the backbones looks like, in a few words."""
    shapes = {key: tuple(state[original].shape) for key, original in body.items()}
    convs = [key for key, shape in shapes.items() if len(shape) == 4]
    if not convs:
        return f"no convolution weights (keys such as {', '.join(list(state)[:3]) or 'none'})"
    if any(key.startswith("layer1.") for key in shapes):
        blocks = tuple(len({key.split(".")[1] for key in shapes if key.startswith(f"layer{i}.")}) for i in range(1, 5))
        depth = _RESNETS.get((blocks, any(".conv3." in key for key in shapes)))
        if depth == 18 and "resnet18" in layouts:
            difference = _first_difference(shapes, "resnet18", layouts["resnet18"])
            return f"a ResNet-18 whose layers' shapes are not torchvision's ({difference})"
        return f"a ResNet-{depth}" if depth else f"a ResNet-like network with {blocks} blocks"
    vgg_like = all(_CAFFE.fullmatch(key) or re.fullmatch(r"\d+\.\w+", key) for key in shapes)
    if not vgg_like:
        return f"an unknown network ({len(convs)} convolutions, keys such as {', '.join(list(state)[:3])})"
    first = shapes[min(convs, key=lambda key: [int(n) for n in re.findall(r"\d+", key)])]
    if first[:3] == (3, 3, 3) and first[3] != 3:
        return (
            f"a VGG-like network with {len(convs)} convolutions whose kernels are in TensorFlow's order "
            "(height, width, in, out), not torch's (out, in, height, width)"
        )
    if any(shapes[key][2:] != (3, 3) for key in convs):
        alexnet = len(convs) == 5 and first[2:] == (11, 11)
        return "an AlexNet" if alexnet else f"a stack of {len(convs)} convolutions, not all 3x3 as a VGG's"
    depth = _VGG_DEPTHS.get(len(convs))
    name = f"VGG-{depth}" if depth else f"VGG-like network with {len(convs)} convolutions"
    if any("running_" in key for key in shapes):
        return f"a {name} with batch normalisation (vgg{depth}_bn), which this tool does not build"
    backbone = {16: "vgg16", 19: "vgg19"}.get(depth or 0)
    if backbone not in layouts:
        return f"a {name}"
    difference = _first_difference(shapes, backbone, layouts[backbone])
    return f"a {name} whose layers' shapes are not torchvision's ({difference})"


def _first_difference(shapes: dict[str, tuple[int, ...]], backbone: str, layout: Layout) -> str:
    expected = layout.shapes
    names = {key: key for key in shapes}  # the file's own name of each of the backbone's keys
    if all(_CAFFE.fullmatch(key) for key in shapes):
        names = _caffe_to_indices(names, layout) or {}
        shapes = {key: shapes[original] for key, original in names.items()}
    for key, shape in expected.items():
        if shapes.get(key) != shape:
            found = "missing" if key not in shapes else "x".join(map(str, shapes[key]))
            return f"{names.get(key, key)} is {found} where {LABELS[backbone]} has {'x'.join(map(str, shape))}"
    extra = sorted(set(shapes) - set(expected) - {key for key in shapes if key.endswith(_COUNTER)})
    return f"{names[extra[0]]} is not a layer of {LABELS[backbone]}" if extra else "layers in another order"
