"""The closure's evaluation, without Lightning: each point once, the last finite image kept, faults named."""

import pytest
import torch
from torch import Tensor, nn

from nst_lightning.errors import NumericalError
from nst_lightning.run.closure import Evaluator
from nst_lightning.run.precision import LossScaler


class Quadratic(nn.Module):
    """``sum((x - 1)^2) * weight`` as an objective (not an Objective: only a total), counting its calls."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight, self.calls = weight, 0

    def forward(self, image: Tensor) -> dict[str, Tensor]:
        self.calls += 1
        return {"total": self.weight * (image - 1).square().sum()}


def evaluator(objective):
    return Evaluator(objective, lambda loss: loss.backward())


def test_a_point_is_evaluated_once_and_its_gradient_handed_back():
    objective = Quadratic()
    image = nn.Parameter(torch.zeros(1, 1, 2, 2))
    optimizer = torch.optim.LBFGS([image])
    run = evaluator(objective)
    first = run(image, optimizer)
    gradient = image.grad.clone()
    second = run(image, optimizer)
    assert objective.calls == 1 and run.count == 1 and second is first
    torch.testing.assert_close(image.grad, gradient)
    run.forget()  # new targets: a new function
    run(image, optimizer)
    assert objective.calls == 2
    with torch.no_grad():
        image.add_(0.5)
    run(image, optimizer)
    assert objective.calls == 3 and run.count == 3


def test_a_non_finite_loss_is_named_and_the_last_finite_image_comes_back():
    objective = Quadratic()
    image = nn.Parameter(torch.zeros(1, 1, 2, 2))
    optimizer = torch.optim.SGD([image], lr=0.1)
    run = evaluator(objective)
    run.start("bf16-mixed")
    run(image, optimizer, step=3)
    finite = image.detach().clone()
    with torch.no_grad():
        image.fill_(float("inf"))
    with pytest.raises(NumericalError, match="loss became inf at step 4, or use --trainer.precision 32-true"):
        run(image, optimizer, step=4)
    run.restore(image)
    torch.testing.assert_close(image.detach(), finite)


def test_a_non_finite_gradient_is_named():
    image = nn.Parameter(torch.zeros(1, 1, 2, 2))
    run = Evaluator(lambda x: {"total": (x - x.detach()).abs().sqrt().sum()}, lambda loss: loss.backward())
    with pytest.raises(NumericalError, match="gradient became non-finite at step 7 although the loss was 0"):
        run(image, torch.optim.SGD([image], lr=0.1), step=7)


def test_an_overflowing_scaled_gradient_is_recomputed_at_a_smaller_scale():
    record = torch.tensor(2.0**40)
    objective = Quadratic(weight=2.0**100)  # times 2^40 overflows float32's gradient; times 2^16 does not
    image = nn.Parameter(torch.zeros(1, 1, 2, 2))
    run = evaluator(objective)
    run.start("16-mixed", LossScaler(record))
    run(image, torch.optim.LBFGS([image]))
    assert objective.calls > 1 and float(record) < 2.0**40
    torch.testing.assert_close(image.grad, torch.full_like(image, -(2.0**101)))
    # In the float32 finish nothing is scaled: the scale stays as it is.
    before = float(record)
    with torch.no_grad():
        image.add_(1e-3)
    run(image, torch.optim.LBFGS([image]), float32=True)
    assert float(record) == before


def test_a_non_finite_loss_names_its_cause():
    from nst_lightning.run.closure import non_finite_message
    from tests.test_objective import objective

    loss = objective(style_weight=1e30)
    finite = {
        "total": torch.tensor(float("inf")),
        "content": torch.tensor(1.0),
        "style": torch.tensor(1e10),
        "tv": torch.tensor(0.0),
    }
    assert "model.style_weight=1e+30 times the style loss" in non_finite_message(loss, finite, 3)
    overflowed = dict(finite, content=torch.tensor(float("nan")))
    message = non_finite_message(loss, overflowed, 3, ", or use --trainer.precision 32-true")
    assert message.startswith("the content loss became nan at step 3") and message.endswith("32-true")
    loss.activation_scale = (150.0, "conv1_1")  # Caffe's scale, and the network is not normalised
    assert "set model.normalize true" in non_finite_message(loss, finite, 3)
