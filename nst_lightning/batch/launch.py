"""Several processes over Lightning Fabric's launcher, shared by ``batch`` and ``video``: starting them, each
one's single-device Trainer placement, and the rank-zero switch a per-process Trainer needs."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities import rank_zero_only

from nst_lightning.errors import ConfigError

# How long the processes wait for each other at the end: one may finish its share (pairs, frames) long
# before another does.
GATHER_TIMEOUT = timedelta(days=7)


def start_fabric(accelerator: str, devices: int, num_nodes: int, accelerator_flag: str) -> Any:
    """A Fabric whose ``launch`` starts ``devices`` processes per node on ``num_nodes`` nodes (each re-running
    the command line), talking over Gloo; a setting Lightning refuses is one line naming ``accelerator_flag``."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    try:
        # Gloo carries the few objects the processes exchange, on every kind of device.
        strategy = DDPStrategy(process_group_backend="gloo", timeout=GATHER_TIMEOUT)
        return Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=strategy)
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"cannot start {devices} process(es) per node on {num_nodes} node(s) with "
            f"{accelerator_flag} {accelerator}: {' '.join(str(err).split())}"
        ) from None


def launch(fabric: Any, body: Callable[[Any], Any]) -> Any:
    """``fabric.launch(body)``: runs ``body(fabric)`` in every process and returns what it returns. Each process
    destroys its process group on the way out: one left to the interpreter's exit can abort the process
    (Gloo's worker threads outlive it: "terminate called without an active exception", exit -6)."""
    import torch.distributed as dist

    def guarded(fabric: Any) -> Any:
        try:
            return body(fabric)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()

    return fabric.launch(guarded)


def device_placement(fabric: Any) -> dict[str, Any]:
    """Trainer arguments that run a single-device Trainer on this process's device (a GPU, or the CPU)."""
    if fabric.device.type == "cuda":
        placement: dict[str, Any] = {"accelerator": "cuda", "devices": [fabric.device.index]}
    else:
        placement = {"accelerator": fabric.device.type, "devices": 1}
    placement.update(num_nodes=1, strategy="auto")
    return placement


@contextlib.contextmanager
def as_rank_zero() -> Iterator[None]:
    """Lightning's rank-zero-only switch reads 0 inside: each pair's Trainer is a single-device run
    of its own, whose logger and messages must work in every process of a sharded batch."""
    saved = getattr(rank_zero_only, "rank", 0)
    rank_zero_only.rank = 0
    try:
        yield
    finally:
        rank_zero_only.rank = saved
