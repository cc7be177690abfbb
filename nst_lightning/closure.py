"""The closure's function evaluation: an image's losses and gradient, each point evaluated once, the loss
scaled where 16-mixed needs it, and a non-finite value stopped at once with the image before it kept."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from nst_lightning.errors import NumericalError
from nst_lightning.objective import Objective
from nst_lightning.precision import SCALE_TRIES, LossScaler, float32_context


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

    def start(self, precision: str, scaler: LossScaler | None = None) -> None:
        """A run starts: its ``trainer.precision`` (what a message about a fault may suggest) and, under
        16-mixed, the loss ``scaler``."""
        self.scaler = scaler
        self.hint = f", or use --trainer.precision 32-true (this run uses {precision})" if "16" in precision else ""

    def forget(self) -> None:
        """The function changed (new targets): no evaluation may be handed back."""
        self._memo = None

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
            with float32_context(image.device.type, float32):
                losses = self.objective(image)
            total = losses["total"]
            if not torch.isfinite(total):
                raise NumericalError(self.objective.non_finite_message(losses, step, self.hint))
            if scaler is None:
                self.backward(total)
                if not bool(torch.isfinite(image.grad).all()):
                    raise NumericalError(
                        f"the gradient became non-finite at step {step} although the loss was "
                        f"{float(total.detach()):.4g}: lower model.lr or the loss weights{self.hint}"
                    )
                return self._remember(image, losses, float32)
            if scaler.backward(total, self.backward, optimizer):
                return self._remember(image, losses, float32)
        raise NumericalError(
            f"the gradient overflowed float16 at every loss scale tried (step {step}): "
            "use --trainer.precision bf16-mixed or 32-true"
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
