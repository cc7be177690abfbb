"""The closure's function evaluation: an image's losses and gradient, each point evaluated once, the loss
scaled where 16-mixed needs it, and a non-finite value stopped with the image before it kept: at once for
torch's L-BFGS, recorded on the device and raised when read for :class:`~nst_lightning.core.lbfgs.DeviceLBFGS`."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial

import torch
from torch import Tensor, nn

from nst_lightning.core.objective import Objective
from nst_lightning.errors import NumericalError
from nst_lightning.run.precision import SCALE_TRIES, LossScaler, float32_context

# A mean activation above this, in a network that is not normalised, is on Caffe's scale (torchvision's
# weights give about 1, Caffe-converted ones 20-300), where the default loss weights overflow.
LARGE_ACTIVATIONS = 10.0
_WEIGHTS = {"content": "content_weight", "style": "style_weight", "tv": "tv_weight"}


class Evaluator:
    """Evaluates ``objective`` at an image parameter for an optimiser's closure: returns the losses and
    leaves the gradient in ``image.grad``.

    The image last evaluated is not evaluated again: its losses and gradient are handed back. (With one
    L-BFGS iteration per step, the line search ends on the point the next step starts from, which it has
    just evaluated; torch's L-BFGS would evaluate it again.) A departure from the usual closure, which
    torch's optimisers assume is cheap to call twice.

    Args:
        objective: image -> ``{"total": ..., ...}``; it explains a non-finite loss.
        backward: the backward pass of a loss (the LightningModule's ``manual_backward``).
    """

    def __init__(self, objective: Objective, backward: Callable[[Tensor], None]) -> None:
        self.objective = objective
        self.backward = backward
        self.scaler: LossScaler | None = None
        self.hint = ""
        self.count = 0
        """Function evaluations (forward and backward passes) made so far."""
        self.last_finite_image: Tensor | None = None
        """The last image whose loss and gradient were finite: what a numerical fault falls back to."""
        self._memo: tuple[bool, dict[str, Tensor], Tensor | None] | None = None
        self.fault_step: Tensor | None = None
        """Set by :meth:`once`: the step of the first non-finite evaluation, -1 while there was none (a device
        tensor; reading it waits for the device). :meth:`check` raises its error."""
        self._fault: dict[str, Tensor] = {}  # the fault's losses, and whether the loss itself was finite
        self._kept: dict[str, Tensor] | None = None  # see kept()

    def start(self, precision: str, scaler: LossScaler | None = None) -> None:
        """A run starts: its ``trainer.precision`` (what a message about a fault may suggest) and, under
        16-mixed, the loss ``scaler``."""
        self.scaler = scaler
        self.hint = f", or use --trainer.precision 32-true (this run uses {precision})" if "16" in precision else ""

    def forget(self) -> None:
        """The function changed (new targets): no evaluation may be handed back."""
        self._memo = None
        self._kept = None

    def __call__(
        self,
        image: nn.Parameter,
        optimizer: torch.optim.Optimizer,
        step: int = 0,
        float32: bool = False,
    ) -> dict[str, Tensor]:
        """The losses of ``image`` at optimiser step ``step``: autocast off where ``float32``, else the loss
        scaled where :meth:`start` gave a scaler (an overflowing gradient recomputed at a smaller scale). A
        non-finite loss or gradient raises :class:`NumericalError`, saying why and what to change."""
        if self._memo is not None and self._memo[0] == float32 and self._is_last_finite(image):
            image.grad = self._memo[2]
            return self._memo[1]
        self.count += 1
        scaler = None if float32 else self.scaler
        for _ in range(SCALE_TRIES):
            optimizer.zero_grad()
            if self._tiled():  # the gradient comes with the losses, tile by tile
                losses = self._losses_and_gradient(image, float32)
            else:
                with float32_context(image.device.type, float32):
                    losses = self.objective(image)
            total = losses["total"]
            if not torch.isfinite(total):
                raise NumericalError(non_finite_message(self.objective, losses, step, self.hint))
            if scaler is None:
                if not self._tiled():
                    self.backward(total)
                if not bool(torch.isfinite(image.grad).all()):
                    raise NumericalError(self._gradient_message(step, total))
                return self._remember(image, losses, float32)
            if scaler.backward(total, self.backward, optimizer):
                return self._remember(image, losses, float32)
        raise NumericalError(
            f"the gradient overflowed float16 at every loss scale tried (step {step}): "
            "use --trainer.precision bf16-mixed or 32-true"
        )

    def once(
        self,
        image: nn.Parameter,
        optimizer: torch.optim.Optimizer,
        step: int | Tensor = 0,
        float32: bool = False,
    ) -> dict[str, Tensor]:
        """As :meth:`__call__`, for an optimiser that evaluates each point once (DeviceLBFGS): no memo, and no
        host read. A non-finite loss or gradient is not raised here but recorded on the device (the first
        one's step in :attr:`fault_step`, its losses), to be raised by :meth:`check`; the last finite image
        is kept under a mask. Under 16-mixed's loss scaling this is :meth:`__call__`, whose scaler reads
        the gradient on the host."""
        if self.scaler is not None and not float32:
            return self(image, optimizer, step, float32)
        self.count += 1
        optimizer.zero_grad()
        losses = self._losses_and_gradient(image, float32)
        finite_loss = torch.isfinite(losses["total"].detach())
        finite = finite_loss & torch.isfinite(image.grad).all()
        current, last = image.detach(), self.last_finite_image
        if last is None or last.shape != current.shape:
            self.last_finite_image = current.clone()  # the first evaluation at this size: kept as it is
        else:
            last.copy_(torch.where(finite, current, last))
        if self.fault_step is None:
            self.fault_step = torch.full((), -1, dtype=torch.long, device=current.device)
        new = ~finite & (self.fault_step < 0)
        self.fault_step.copy_(torch.where(new, step, self.fault_step))
        for key, value in (("loss_finite", finite_loss), *losses.items()):
            if key not in self._fault:  # the first evaluation, or a new term (a video's temporal loss)
                self._fault[key] = value.detach().clone()
            self._fault[key].copy_(torch.where(new, value.detach(), self._fault[key]))
        return losses

    def _tiled(self) -> bool:
        return getattr(self.objective, "tiling", None) is not None  # an objective of another kind has no tiles

    def _losses_and_gradient(self, image: nn.Parameter, float32: bool) -> dict[str, Tensor]:
        """The losses of ``image`` and its gradient (in ``image.grad``): over tiles where the objective has them."""
        context = partial(float32_context, image.device.type, float32)
        if self._tiled():
            return self.objective.evaluate(image, self.backward, context)
        with context():
            losses = self.objective(image)
        self.backward(losses["total"])
        return losses

    def kept(self, losses: dict[str, Tensor], accepted_loss: Tensor) -> dict[str, Tensor]:
        """The losses of an optimiser's result, which may lag its last evaluation (DeviceLBFGS's last accepted
        point, whose loss is ``accepted_loss``): ``losses``, the last evaluation's, where the optimiser accepted
        it (its loss is then exactly ``accepted_loss``), else those this returned before. No host read."""
        losses = {key: value.detach() for key, value in losses.items()}
        if self._kept is not None and self._kept.keys() == losses.keys():
            accepted = losses["total"] == accepted_loss
            losses = {key: torch.where(accepted, value, self._kept[key]) for key, value in losses.items()}
        self._kept = losses
        return losses

    def check(self, image: nn.Parameter | None = None) -> None:
        """Raises the :class:`NumericalError` of the first non-finite evaluation :meth:`once` recorded, with the
        message :meth:`__call__` would have given at that step (one host read), after putting the last finite
        image back into ``image`` where given."""
        if self.fault_step is None or (step := int(self.fault_step)) < 0:
            return
        if image is not None:
            self.restore(image)
        losses = {k: v for k, v in self._fault.items() if k != "loss_finite"}
        if not bool(self._fault["loss_finite"]):
            raise NumericalError(non_finite_message(self.objective, losses, step, self.hint))
        raise NumericalError(self._gradient_message(step, losses["total"]))

    def _gradient_message(self, step: int, total: Tensor) -> str:
        return (
            f"the gradient became non-finite at step {step} although the loss was "
            f"{float(total.detach()):.4g}: lower model.lr or the loss weights{self.hint}"
        )

    def restore(self, image: nn.Parameter) -> None:
        """Puts the last image whose loss was finite back into ``image`` (after a numerical fault)."""
        if self.last_finite_image is not None and self.last_finite_image.shape == image.shape:
            with torch.no_grad():
                image.copy_(self.last_finite_image)

    def _remember(self, image: nn.Parameter, losses: dict[str, Tensor], float32: bool) -> dict[str, Tensor]:
        """Keeps a finite evaluation: its image, losses and gradient."""
        current = image.detach()
        if self.last_finite_image is None or self.last_finite_image.shape != current.shape:
            self.last_finite_image = current.clone()
        else:
            self.last_finite_image.copy_(current)
        # The gradient tensor itself: zero_grad() replaces image.grad rather than zeroing it.
        self._memo = (float32, losses, image.grad)
        return losses

    def _is_last_finite(self, image: nn.Parameter) -> bool:
        last = self.last_finite_image
        return last is not None and last.shape == image.shape and torch.equal(last, image.detach())


def non_finite_message(objective: nn.Module, losses: Mapping[str, Tensor], step: int, hint: str = "") -> str:
    """Why the total loss of ``losses`` is not finite, and what to change (``hint``: about the precision): for an
    :class:`~nst_lightning.core.objective.Objective`, which term and which weight; for another model, the value."""
    total = float(losses["total"].detach())
    if not isinstance(objective, Objective):
        return f"the loss became {total} at step {step}{hint}"
    mean, layer = objective.activation_scale
    if objective.extractor.layer_means is None and mean > LARGE_ACTIVATIONS:  # a network not normalised
        return (
            f"the loss became {total} at step {step}: this network's activations are on a large scale (mean "
            f"{mean:.3g} at {layer}, as with Caffe-converted weights) and model.normalize is false, so the "
            "loss weights are far too strong for it: set model.normalize true"
        )
    for term in _WEIGHTS:
        if not math.isfinite(float(losses[term])):
            return (
                f"the {term} loss became {float(losses[term])} at step {step}: the image or its features "
                f"overflowed; lower model.lr or set model.lbfgs_line_search to strong_wolfe{hint}"
            )
    # Every term is finite: a weight times its term went beyond float32's range (about 3.4e38).
    key = max(_WEIGHTS, key=lambda term: abs(objective.weights[term] * float(losses[term])))
    weight = _WEIGHTS[key]
    return (
        f"the loss became {total} at step {step}: model.{weight}={objective.weights[key]:g} times the {key} "
        f"loss ({float(losses[key]):.3g}) is beyond float32's range (about 3.4e38); lower model.{weight}"
    )
