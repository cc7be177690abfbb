"""Mixed precision around an L-BFGS closure: loss scaling under 16-mixed, the float32 finish, the automatic choice
(and, on CUDA, TF32 and cuDNN autotuning).

Lightning's own 16-mixed plugin cannot drive L-BFGS ("AMP and the LBFGS optimizer are not compatible"):
``GradScaler.step`` takes no closure, and L-BFGS evaluates its closure several times per step. So the
closure scales itself, once per function evaluation, with the rest of ``torch.amp.GradScaler``'s public
API: ``scale`` the loss, ``unscale_`` the gradient, ``update`` the scale (backed off after an overflow,
grown after ``GROWTH_INTERVAL`` finite evaluations), and an overflowing gradient is recomputed at the
smaller scale, so that L-BFGS only ever sees finite gradients.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import Tensor

from nst_lightning.io.console import note
from nst_lightning.names import MIXED_PRECISIONS
from nst_lightning.run.runtime import automatic_precision, runs_on_cuda

# Dynamic loss scaling: the first scale, the factor after an overflow, finite evaluations before it doubles.
SCALE_START, SCALE_BACKOFF, GROWTH_INTERVAL = 2.0**16, 2.0**-4, 100
# Evaluations at ever smaller scales before an overflowing gradient is given up on.
SCALE_TRIES = 12


def float32_start(precision: str, max_steps: int, final_steps: int) -> int | None:
    """The first step of a mixed-precision run's float32 finish (its last ``final_steps`` steps); None
    where there is none (a float32 run, no finish, no step limit)."""
    if precision not in MIXED_PRECISIONS or max_steps < 0 or final_steps == 0:
        return None
    return max(max_steps - final_steps, 0)


def choose_precision(config: Any) -> None:
    """Where a configuration (a ``fit`` or ``batch`` namespace) sets no ``trainer.precision`` (nor a
    precision plugin), sets the fastest that reaches the float32 result on this machine
    (:func:`~nst_lightning.run.runtime.automatic_precision`, where the default is chosen). On a CUDA run,
    also the float32 arithmetic of :func:`choose_gpu_math`."""
    trainer = config.trainer
    choose_gpu_math(trainer)
    if trainer.precision is not None or trainer.plugins:
        return
    chosen = automatic_precision(trainer.accelerator)
    if chosen is None:
        return
    trainer.precision = chosen
    why = "this CPU computes bfloat16 in AMX tiles (about 2x faster)"
    if runs_on_cuda(trainer.accelerator):
        why = "this GPU computes bfloat16 natively (nst_lightning.run.runtime.GPU_PRECISION)"
    note(
        f"trainer.precision is not set: using {chosen}, since {why}; the last {config.model.float32_final_steps} "
        "iterations run in float32 (model.float32_final_steps); --trainer.precision 32-true keeps float32 throughout"
    )


def use_tf32() -> bool:
    """TF32 for float32 matrix products on CUDA (``torch.backends.cuda.matmul.allow_tf32``), unless the user
    chose a float32 matmul precision already; returns whether it was set.

    Why: on GPUs since Ampere, TF32 tensor cores multiply float32 matrices several times faster; cuDNN's
    convolutions already use them by default (``torch.backends.cudnn.allow_tf32`` is True, left as it is), so
    this adds the Gram products. The cost: the factors of each product keep 10 of float32's 23 mantissa bits
    (the sums stay float32), so results differ from strict float32's: by about 1e-3 relative per product, as
    the convolutions' already did (benchmarks/gpu.sh reports the final loss against 32-true).
    ``NVIDIA_TF32_OVERRIDE=0`` in the environment turns TF32 off everywhere. Setting it also silences
    Lightning's note that asks for it. CUDA only: the flag leaves CPU arithmetic alone.
    """
    if torch.get_float32_matmul_precision() != "highest":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    return True


def choose_gpu_math(trainer: Any) -> None:
    """On a CUDA run (a ``trainer`` namespace), before the trainer exists: TF32 (:func:`use_tf32`) and cuDNN's
    autotuning, ``trainer.benchmark`` true, unless the configuration sets it or asks for determinism.

    Autotuning times cuDNN's algorithms for each convolution shape once, at the first iteration, and keeps the
    fastest: a run optimises one image of a fixed size (a coarse-to-fine run a few), so it pays off at once.
    Lightning sets ``torch.backends.cudnn.benchmark`` from ``trainer.benchmark``, and the run's saved config
    records it."""
    if not runs_on_cuda(trainer.accelerator):
        return
    use_tf32()
    if trainer.get("benchmark") is None and not trainer.get("deterministic"):
        trainer.benchmark = True


def float32_context(device_type: str, float32: bool) -> AbstractContextManager:
    """Autocast off in the float32 finish; otherwise the trainer's own context is left as it is.

    Departure from a plain mixed-precision run: its last steps run in float32. Rounding the activations
    to 8 bits of mantissa limits how far the loss can fall (L-BFGS ends up chasing rounding noise);
    float32 takes it the rest of the way, with the history built so far.
    """
    return torch.autocast(device_type, enabled=False) if float32 else nullcontext()


def drop_lightning_scaler(plugin: Precision) -> None:
    """Takes the GradScaler out of Lightning's 16-mixed plugin, which refuses L-BFGS while it holds one
    (the plugin has no switch for it; its ``scaler`` attribute is public). :class:`LossScaler` scales instead."""
    if isinstance(plugin, MixedPrecision) and plugin.scaler is not None:
        plugin.scaler = None


class LossScaler:
    """Dynamic loss scaling of one function evaluation at a time, on ``torch.amp.GradScaler``.

    Args:
        record: a scalar tensor (the module's ``loss_scale`` buffer, so that checkpoints keep it): the
            scale starts from its value and is written back to it after every update.
    """

    def __init__(self, record: Tensor) -> None:
        self.record = record
        self.scaler = torch.amp.GradScaler(
            record.device.type,
            init_scale=float(record),
            growth_factor=2.0,
            backoff_factor=SCALE_BACKOFF,
            growth_interval=GROWTH_INTERVAL,
        )

    def backward(self, loss: Tensor, backward: Callable[[Tensor], None], optimizer: torch.optim.Optimizer) -> bool:
        """``backward`` of the scaled ``loss``, then the gradients of ``optimizer``'s parameters unscaled;
        returns whether they are finite. The scale is updated either way: an overflow backs it off for the
        caller's next try."""
        backward(self.scaler.scale(loss))
        self.scaler.unscale_(optimizer)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        finite = all(bool(torch.isfinite(grad).all()) for grad in grads)
        self.scaler.update()
        self.record.fill_(self.scaler.get_scale())
        return finite
