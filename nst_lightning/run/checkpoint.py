"""Checkpoints: written atomically, read with ``weights_only=True``, checked before a run resumes.

Lightning 2.6's own ``TorchCheckpointIO`` writes through an fsspec transaction whose temporary file
lies in the system temporary folder (``tempfile.mkstemp()`` without ``dir``) and is then moved with
``shutil.move``: where that folder is on another filesystem (a tmpfs ``/tmp``, say) the move is a
copy into the target, which truncates a good checkpoint first, and nothing is synced to disk.
:class:`AtomicCheckpointIO` writes beside the target and renames instead (see
:func:`nst_lightning.io.files.atomic_write`). It is a Trainer plugin (``plugins=[AtomicCheckpointIO()]``),
which the command line adds unless the configuration names a CheckpointIO of its own.
"""

from __future__ import annotations

import io
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from torch import Tensor

from nst_lightning.core.objective import Objective
from nst_lightning.errors import CheckpointError, ConfigError
from nst_lightning.io.files import atomic_write, file_kind, is_remote
from nst_lightning.run.memory import estimate_peak

# Settings that may change when a run is resumed: ``init`` and ``seed`` only shape the first image,
# and the images are compared through the targets they give (``StyleTransfer.on_load_checkpoint``).
# A checkpoint's targets may differ from this run's by this much (relative) and still be "the same images".
TARGET_TOLERANCE = 1e-2
RESUME_FREE_KEYS = {"model": frozenset({"init", "seed"}), "data": frozenset({"content", "style"})}
# What a checkpoint needs to resume a run, beyond ``state_dict["image"]``.
_RESUME_KEYS = ("optimizer_states", "loops")


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint written by nst-lightning with ``torch.load(..., weights_only=True)``.

    Anything else (a missing file, a folder, a weights file, a checkpoint of another model, a pickle
    that would run code, a truncated file) raises a :class:`CheckpointError` that says what it is.
    With ``mmap`` the tensors are mapped rather than read, for a cheap look at the metadata.
    """
    file = Path(path)
    kind = file_kind(file)  # from stat alone: a FIFO would block torch.load for good
    if kind == "missing":
        raise CheckpointError(f"checkpoint not found: {file} (check --ckpt_path)")
    if kind == "folder":
        raise CheckpointError(f"{file} is a folder: --ckpt_path takes a .ckpt file, such as {file / 'last.ckpt'}")
    if kind != "file":
        raise CheckpointError(f"{file} is {kind}, not a checkpoint file: --ckpt_path takes a .ckpt file")
    try:
        checkpoint = torch.load(
            file, map_location=map_location, weights_only=True, mmap=mmap and zipfile.is_zipfile(file)
        )
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for a bad file
        detail = _first_line(err)
        if "Weights only load failed" in detail:  # torch's advice to retry with weights_only=False: no
            detail = "it is not a torch file, or it holds objects other than tensors and plain data"
        raise CheckpointError(
            f"cannot read checkpoint {file}: {detail} (--ckpt_path takes a .ckpt file written by "
            "nst-lightning; checkpoints are read with weights_only=True, so a file holding code is refused, not run)"
        ) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise CheckpointError(
            f"{file} is not a Lightning checkpoint (it has no state_dict): --ckpt_path takes a .ckpt file "
            "written by nst-lightning, not a weights file"
        )
    if not isinstance(checkpoint["state_dict"].get("image"), torch.Tensor):
        raise CheckpointError(
            f"{file} is a checkpoint of another model (it holds no stylised image): resume from a checkpoint "
            "that nst-lightning wrote (lightning_logs/version_N/checkpoints/*.ckpt)"
        )
    missing = [key for key in _RESUME_KEYS if key not in checkpoint]
    if missing:
        raise CheckpointError(
            f"{file} holds no {' and no '.join(missing)} (it was saved with weights only), so it cannot resume "
            "a run: use a checkpoint from lightning_logs/version_N/checkpoints/"
        )
    return checkpoint


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    return value


def config_differences(saved: Mapping, current: Mapping, section: str) -> list[str]:
    """``section.key`` settings whose value in a checkpoint (``saved``) differs from this run's.

    Keys only one side knows, private keys (``_instantiator``) and :data:`RESUME_FREE_KEYS` are skipped.
    """
    free = RESUME_FREE_KEYS.get(section, frozenset())
    differences = []
    for key, before in saved.items():
        if key.startswith("_") or key in free or key not in current:
            continue
        if _plain(before) != _plain(current[key]):
            differences.append(f"{section}.{key} was {_plain(before)!r}, now {_plain(current[key])!r}")
    return differences


def config_mismatch(path: str | os.PathLike, differences: Iterable[str]) -> CheckpointError:
    """The error for resuming ``path`` with other settings, pointing at the run's own config file."""
    config = Path(path).resolve().parent.parent / "config.yaml"
    how = "resume with the same settings"
    if file_kind(config) == "file":
        how = f"resume with that run's settings (--config {config})"
    return CheckpointError(
        f"checkpoint {path} was made with other settings ({'; '.join(differences)}): {how}, or start a new run "
        "without --ckpt_path"
    )


def check_same_config(path: str | os.PathLike, checkpoint: Mapping, model: Mapping, data: Mapping) -> None:
    """Refuse to resume ``checkpoint`` with model or data settings other than the ones it was made with."""
    differences = config_differences(checkpoint.get("hyper_parameters") or {}, model, "model")
    differences += config_differences(checkpoint.get("datamodule_hyper_parameters") or {}, data, "data")
    if differences:
        raise config_mismatch(path, differences)


def upgrade_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's state dict in today's layout, in place: in checkpoints written before the objective
    became a module of its own, the targets and the content image (``content_targets.*``,
    ``style_targets.*``, ``content_image``) sit at the top level; they move under ``objective.``."""
    for key in [k for k in state if k == "content_image" or k.startswith(("content_targets.", "style_targets."))]:
        state[f"objective.{key}"] = state.pop(key)
    return state


def saved_scale(state: Mapping[str, Any], image: torch.Tensor, sizes: Sequence[tuple[int, int]]) -> int | None:
    """The scale of a coarse-to-fine run (one (width, height) per scale in ``sizes``) at which a checkpoint's
    image was saved, where it is not ``image``'s; None where it is. Another size is refused."""
    saved = state.get("image")
    if saved is None or saved.shape == image.shape:
        return None
    shapes = [(*image.shape[:2], height, width) for width, height in sizes]
    if tuple(saved.shape) not in shapes:
        raise ConfigError(
            f"the checkpoint holds a {saved.shape[-1]}x{saved.shape[-2]} image but this run's is "
            f"{image.shape[-1]}x{image.shape[-2]}: resume with the same data.image_size, model.scales and images"
        )
    return shapes.index(tuple(saved.shape))


def check_resume(checkpoint: Mapping[str, Any], hparams: Mapping[str, Any], objective: Objective) -> None:
    """A checkpoint resumes this run only with its model settings (``hparams``) and with the targets that
    this run's images give (:func:`check_same_targets`): other images would give others."""
    differences = config_differences(checkpoint.get("hyper_parameters") or {}, hparams, "model")
    if differences:
        raise config_mismatch("the checkpoint", differences)
    prefix = "objective."
    state = checkpoint.get("state_dict") or {}
    check_same_targets(objective, {key[len(prefix) :]: v for key, v in state.items() if key.startswith(prefix)})


def check_same_targets(objective: Objective, saved: Mapping[str, Any]) -> None:
    """A checkpoint's targets (keys as in ``objective``'s state dict) must be the ones this run's images
    give: otherwise it came from other images (or other weights)."""
    buffers = dict(objective.named_buffers())
    for name, before in saved.items():
        current = buffers.get(name) if name.startswith(("content_targets.", "style_targets.")) else None
        if not isinstance(current, Tensor) or not isinstance(before, Tensor):
            continue
        which = "content" if name.startswith("content_targets.") else "style"
        if before.shape != current.shape:
            raise CheckpointError(
                f"the checkpoint's {which} target {name} has shape {tuple(before.shape)}, this run's "
                f"{tuple(current.shape)}: resume with the same images, layers and data.image_size"
            )
        before = before.to(device=current.device, dtype=current.dtype)
        if float((before - current).norm()) > TARGET_TOLERANCE * (float(current.norm()) or 1.0):
            raise CheckpointError(
                f"the checkpoint was made from another {which} image (or other weights): its target {name} "
                f"differs from this run's; resume with the same data.{which} and model.weights, or start a new "
                "run without --ckpt_path"
            )


def estimate_checkpoint_bytes(height: int, width: int, hparams: Mapping[str, Any], max_steps: int) -> int:
    """The size of a run's checkpoint, from the image size and the model's settings: the image, the
    optimiser's state (L-BFGS: two image-sized vectors per step of history, which torch's fills up over the
    first ``lbfgs_history_size`` steps and DeviceLBFGS holds from the first) and the targets, as
    :mod:`nst_lightning.run.memory` counts them."""
    history = hparams["lbfgs_history_size"]
    if hparams.get("lbfgs_line_search", "strong_wolfe") != "backtrack":  # not DeviceLBFGS
        history = max(1, min(history, max_steps))
    estimate = estimate_peak(
        height,
        width,
        hparams["content_layers"],
        hparams["style_layers"],
        backbone=hparams["backbone"],
        pooling=hparams["pooling"],
        optimizer=hparams["optimizer"],
        history_size=history,
        weights="random",  # the weights are not in checkpoints
    )
    return estimate.optimizer + estimate.targets + 2**16  # plus Lightning's metadata


def _serialise(checkpoint: dict[str, Any]) -> io.BytesIO | None:
    """``checkpoint`` serialised in memory, or None where the memory runs out on the way (torch's zip writer
    may report that MemoryError as a RuntimeError raised while it closes; the partial copy goes with it)."""
    buffer = io.BytesIO()
    try:
        torch.save(checkpoint, buffer)
    except (MemoryError, RuntimeError) as err:
        if not isinstance(err, MemoryError) and not isinstance(err.__context__, MemoryError):
            raise
        return None
    return buffer


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, made safe for local files.

    Saving writes a temporary file beside the target, syncs it and renames it over the target, so an
    interruption or a full disk never leaves a truncated checkpoint where a good one was; a failed
    write is a :class:`CheckpointError`. Loading always uses ``weights_only=True`` and checks that the
    file is an nst-lightning checkpoint (:func:`read_checkpoint`). Remote URLs go to Lightning's code.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or is_remote(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        # Serialised in memory first (as Lightning does): a write that fails half way then surfaces as
        # the OSError it is (ENOSPC, EFBIG...) rather than as an assertion inside torch's zip writer. Where the
        # memory cannot hold a second copy (a print-size run's L-BFGS history under `ulimit -v`), it is
        # streamed into the temporary file instead, and a failed write is whatever torch's writer raises.
        serialised = _serialise(checkpoint)
        try:
            if serialised is None:
                atomic_write(path, lambda handle: torch.save(checkpoint, handle))
            else:
                atomic_write(path, lambda handle: handle.write(serialised.getbuffer()))
        except (OSError, RuntimeError) as err:
            if isinstance(err, RuntimeError) and serialised is not None:
                raise
            raise CheckpointError(
                f"cannot write checkpoint {path}: {_first_line(err)} (free some disk space or point "
                "trainer.default_root_dir at a folder with room; any previous checkpoint there is unchanged)"
            ) from None

    def load_checkpoint(self, path: Any, map_location: Any = "cpu", weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise CheckpointError(
                "checkpoints are only read with weights_only=True (a checkpoint cannot run code): "
                "drop weights_only false"
            )
        if is_remote(path):
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        return read_checkpoint(path, map_location=map_location)
