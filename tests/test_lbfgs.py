"""DeviceLBFGS: torch's L-BFGS step for step, an overshoot undone, no host read inside a step, exact resume."""

import contextlib
import sys

import pytest
import torch
from torch import nn

from nst_lightning.core.lbfgs import DeviceLBFGS
from nst_lightning.errors import NumericalError
from nst_lightning.main import cli_main
from nst_lightning.run.closure import Evaluator
from tests.conftest import datamodule, make_module, make_trainer, write_config
from tests.test_closure import Quadratic


def quadratic(n: int, condition: float, seed: int = 0, device: str = "cpu"):
    """``0.5 x'Ax - b'x`` in float64, A with eigenvalues from 1 to ``condition``."""
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=generator))
    a = (q @ torch.diag(torch.linspace(1, condition, n, dtype=torch.float64)) @ q.T).to(device)
    # |b|_1 < 1: torch's first step min(1, 1/|g|_1) is then a whole one.
    b = (torch.randn(n, dtype=torch.float64, generator=generator) / (2 * n)).to(device)
    return lambda x: 0.5 * x @ a @ x - b @ x


def closure_of(function, x, optimizer):
    def closure():
        optimizer.zero_grad()
        loss = function(x)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("condition, steps, backtrack", [(3.0, 12, True), (30.0, 40, False)])
def test_follows_torch_lbfgs_step_for_step_on_a_quadratic(condition, steps, backtrack):
    # History 4 over 12-40 steps: the ring buffer wraps, so its order matters.
    function = quadratic(30, condition)
    ours, theirs = (torch.zeros(30, dtype=torch.float64, requires_grad=True) for _ in range(2))
    device = DeviceLBFGS([ours], history_size=4, backtrack=backtrack)
    reference = torch.optim.LBFGS([theirs], max_iter=1, history_size=4)
    for step in range(steps):
        loss = device.step(closure_of(function, ours, device))
        expected = reference.step(closure_of(function, theirs, reference))
        torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-12, msg=f"step {step}")
    assert int(device.state[ours]["undone"]) == 0, "the safeguard did not fire"
    assert float(function(ours.detach())) < float(function(torch.zeros(30, dtype=torch.float64))) * 0.99


def test_a_step_that_raises_the_loss_is_undone_and_shortened():
    x = torch.tensor([3.0], requires_grad=True)
    optimizer = DeviceLBFGS([x], lr=1.0)
    function = lambda v: (v**2).sum()  # noqa: E731
    optimizer.step(closure_of(function, x, optimizer))  # the tiny first step
    state = optimizer.state[x]
    state["t"].fill_(1e6)  # as a badly sized second step would be
    with torch.no_grad():
        x.copy_(state["x"] + state["t"] * state["d"])
    optimizer.step(closure_of(function, x, optimizer))  # evaluates the overshoot (x = -6e6): undone
    assert int(state["undone"]) == 1 and abs(float(x)) < 1e4, "shortened by up to 1/SHRINK_MIN"
    for _ in range(4):
        optimizer.step(closure_of(function, x, optimizer))
    assert abs(float(x)) < 1e-3 and int(state["still"]) >= 1, "converged: the gradient is zero, the image stays"


@contextlib.contextmanager
def no_host_reads(monkeypatch):
    """Any conversion of a tensor to a Python value, or torch.equal, raises while inside."""

    def refuse(*args, **kwargs):
        raise AssertionError("host read inside a DeviceLBFGS step")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse)
        patch.setattr(torch, "equal", refuse)
        patch.setattr(torch, "is_nonzero", refuse)
        yield


def test_no_host_read_inside_an_iteration(tmp_path, images, monkeypatch):
    """The optimiser's step and the evaluation inside it, in a real run (random weights)."""
    steps = []
    original = DeviceLBFGS.step

    def step(self, closure):
        with no_host_reads(monkeypatch):
            loss = original(self, closure)
        steps.append(loss)
        return loss

    monkeypatch.setattr(DeviceLBFGS, "step", step)
    module = make_module()
    make_trainer(tmp_path, steps=4).fit(module, datamodule=datamodule(images))
    assert len(steps) == 4 and isinstance(module.optimizers().optimizer, DeviceLBFGS)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_device_sync_inside_an_iteration_on_cuda():
    function = quadratic(64, 10.0, device="cuda")
    x = nn.Parameter(torch.zeros(64, dtype=torch.float64, device="cuda"))
    optimizer = DeviceLBFGS([x], history_size=4)
    run = Evaluator(lambda v: {"total": function(v)}, lambda loss: loss.backward())
    optimizer.step(lambda: run.once(x, optimizer)["total"])  # the state is allocated outside
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 6):
            optimizer.step(lambda step=step: run.once(x, optimizer, step=step)["total"])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    run.check()


class Blows(Quadratic):
    """Test_closure's quadratic, whose loss is infinite once the image's sum reaches 1."""

    def forward(self, image):
        return {"total": super().forward(image)["total"] / (image.sum() < 1)}


def test_a_non_finite_evaluation_is_raised_when_read_with_the_last_finite_image():
    x = nn.Parameter(torch.zeros(4))
    run = Evaluator(Blows(), lambda loss: loss.backward())
    optimizer = DeviceLBFGS([x])
    run.once(x, optimizer, step=0)
    run.check(x)  # all finite: nothing to raise
    with torch.no_grad():
        x.fill_(2.0)
    run.once(x, optimizer, step=5)
    run.once(x, optimizer, step=6)  # only the first fault is kept
    assert int(run.fault_step) == 5
    with pytest.raises(NumericalError) as at_once:  # what the evaluation of torch's L-BFGS says at once
        Evaluator(Blows(), lambda loss: loss.backward())(x, optimizer, step=5)
    with pytest.raises(NumericalError, match="at step 5") as when_read:
        run.check(x)
    assert str(when_read.value) == str(at_once.value)
    torch.testing.assert_close(x.detach(), torch.zeros(4))


@pytest.mark.slow
def test_resume_from_a_checkpoint_is_bit_exact(tmp_path, images, monkeypatch):
    """Through the real command line: 6 steps in one run, and 3 + 3 resumed, end on the same bits."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])

    def run(folder: str, *args: str):
        config = write_config(tmp_path / folder, images, trainer={"max_steps": 6}, data={"image_size": 40})
        cli_main(["fit", "--config", str(config), *args])
        checkpoints = tmp_path / folder / "runs" / "lightning_logs"
        return sorted(checkpoints.glob("version_*/checkpoints/*.ckpt"))

    for folder in ("whole", "split"):
        (tmp_path / folder).mkdir()
    [whole] = run("whole")
    [half] = run("split", "--trainer.max_steps", "3")
    resumed = run("split", "--ckpt_path", str(half), "--overwrite")[-1]
    a, b = (torch.load(path, weights_only=True) for path in (whole, resumed))
    assert a["global_step"] == b["global_step"] == 6
    assert torch.equal(a["state_dict"]["image"], b["state_dict"]["image"])
    [state_a], [state_b] = (list(c["optimizer_states"][0]["state"].values()) for c in (a, b))
    assert int(state_a["n_iter"]) == 6 and state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key


def test_the_logged_losses_are_those_of_the_last_accepted_point():
    run = Evaluator(Quadratic(), lambda loss: loss.backward())
    point = lambda total, content: {"total": torch.tensor(total), "content": torch.tensor(content)}  # noqa: E731
    assert float(run.kept(point(2.0, 1.0), torch.tensor(2.0))["content"]) == 1.0
    undone = run.kept(point(9e6, 3.0), torch.tensor(2.0))  # evaluated, then undone: the result is still the last
    assert (float(undone["total"]), float(undone["content"])) == (2.0, 1.0)
    assert float(run.kept(point(1.5, 0.5), torch.tensor(1.5))["content"]) == 0.5


def test_a_checkpoint_of_torchs_lbfgs_resumes_with_its_setting_and_only_with_it(tmp_path, images, monkeypatch, capsys):
    """Checkpoints made before DeviceLBFGS was the default hold torch's L-BFGS state."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    config = write_config(tmp_path, images, trainer={"max_steps": 2}, model={"lbfgs_line_search": "strong_wolfe"})
    cli_main(["fit", "--config", str(config)])
    [ckpt] = (tmp_path / "runs" / "lightning_logs" / "version_0" / "checkpoints").glob("*.ckpt")
    with pytest.raises(SystemExit):  # under the new default: one line, naming the setting
        cli_main(
            [
                "fit",
                "--config",
                str(config),
                "--model.lbfgs_line_search",
                "backtrack",
                "--ckpt_path",
                str(ckpt),
                "--trainer.max_steps",
                "4",
                "--overwrite",
            ]
        )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("nst-lightning: error:")]
    assert len(lines) == 1 and "model.lbfgs_line_search was 'strong_wolfe', now 'backtrack'" in lines[0], lines
    cli_main(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--trainer.max_steps", "4", "--overwrite"])
    [resumed] = (tmp_path / "runs" / "lightning_logs").glob("version_*/checkpoints/*step=4.ckpt")
    assert torch.load(resumed, weights_only=True)["optimizer_states"][0]["state"][0]["n_iter"] == 4


def test_device_lbfgs_keeps_float32_under_a_mixed_precision_step():
    # Lightning runs a bf16-mixed training_step, and so the optimiser's step, under autocast: the history's inner
    # products stay float32 (no half-precision copy of the history: a 3000 px run under `ulimit -v` died of it).
    target = torch.linspace(-1.0, 1.0, 4096)
    weight = torch.linspace(0.5, 3.0, 4096)

    def run(context) -> torch.Tensor:
        image = torch.nn.Parameter(torch.zeros(4096))
        optimizer = DeviceLBFGS([image], lr=1.0, history_size=5)

        def closure():
            optimizer.zero_grad()
            loss = (weight * (image - target) ** 2).sum()  # elementwise: autocast leaves it float32
            loss.backward()
            return loss

        for _ in range(8):
            with context():
                optimizer.step(closure)
        return image.detach()

    plain = run(contextlib.nullcontext)
    assert torch.equal(run(lambda: torch.autocast("cpu", dtype=torch.bfloat16)), plain)


def test_last_accepted_is_the_image_until_a_point_is_accepted():
    # A print run failed inside its first 3000 px step: the optimiser's state existed (zeros), no point was accepted
    # yet, and the partial image written was black.
    from nst_lightning.core.lbfgs import last_accepted

    image = torch.nn.Parameter(torch.full((1, 3, 4, 4), 0.5))
    optimizer = DeviceLBFGS([image], lr=1.0, history_size=3)
    optimizer.state[image]  # an empty state: its allocation ran out of memory (the print run under a cap)
    assert torch.equal(last_accepted(image, [optimizer]), image)
    optimizer._state()  # made, as by a step that fails after its evaluation
    assert torch.equal(last_accepted(image, [optimizer]), image)

    def closure():
        optimizer.zero_grad()
        loss = ((image - 1.0) ** 2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)  # accepts the start and moves the image to its first trial point
    assert torch.equal(last_accepted(image, [optimizer]), torch.full((1, 3, 4, 4), 0.5))
    assert not torch.equal(image.detach(), torch.full((1, 3, 4, 4), 0.5))
