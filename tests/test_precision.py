"""Mixed precision around the L-BFGS closure: loss scaling under 16-mixed on torch's GradScaler, the float32
finish, and the precisions refused; alone, then through the real Trainer."""

import warnings

import pytest
import torch
from lightning.pytorch.plugins.precision import MixedPrecision

from nst_lightning.errors import ConfigError
from nst_lightning.run.precision import GROWTH_INTERVAL, LossScaler, drop_lightning_scaler, float32_start
from tests.conftest import LossRecorder, datamodule, make_module, make_trainer


def test_the_float32_finish_starts_at_the_last_steps_of_a_mixed_run_only():
    assert float32_start("bf16-mixed", 300, 50) == 250
    assert float32_start("16-mixed", 30, 50) == 0
    assert float32_start("32-true", 300, 50) is None
    assert float32_start("bf16-mixed", 300, 0) is None
    assert float32_start("bf16-mixed", -1, 50) is None


def test_the_loss_scaler_backs_off_on_overflow_grows_after_its_interval_and_keeps_its_record():
    record = torch.tensor(2.0**16)
    scaler = LossScaler(record)
    x = torch.ones(3, requires_grad=True)
    optimizer = torch.optim.LBFGS([x])

    def backward(weight: float) -> bool:
        x.grad = None
        return scaler.backward((x * weight).sum(), lambda loss: loss.backward(), optimizer)

    assert backward(3.0) and float(record) == 2.0**16
    torch.testing.assert_close(x.grad, torch.full_like(x, 3.0))  # the gradient comes back unscaled
    for _ in range(GROWTH_INTERVAL - 2):
        backward(3.0)
    assert float(record) == 2.0**16
    assert backward(3.0) and float(record) == 2.0**17, "doubled after the interval"
    assert not backward(float("inf")) and float(record) == 2.0**13, "backed off by 16"
    assert LossScaler(torch.tensor(2.0**40)).scaler.get_scale() == 2.0**40, "a resumed run's scale"


def test_gradscaler_cannot_step_l_bfgs_so_the_closure_scales_each_evaluation():
    # Why LossScaler drives GradScaler per evaluation: its step() takes no closure, and Lightning's
    # 16-mixed plugin refuses L-BFGS while it holds one. If either changes, the precision module can
    # go back to the usual way.
    x = torch.ones(2, requires_grad=True)
    optimizer = torch.optim.LBFGS([x])
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(RuntimeError, match="[Cc]losure"):
        scaler.step(optimizer, closure=lambda: x.sum())
    plugin = MixedPrecision("16-mixed", "cpu")
    with pytest.raises(Exception, match="LBFGS"):
        plugin.optimizer_step(optimizer, model=torch.nn.Linear(1, 1), closure=lambda: x.sum())
    drop_lightning_scaler(plugin)
    assert plugin.scaler is None


def _run_precision(tmp_path, images, line_search="backtrack", **trainer_kwargs):
    recorder = LossRecorder()
    module = make_module(float32_final_steps=0, lbfgs_line_search=line_search)  # mixed precision to the end
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, steps=10, callbacks=[recorder], **trainer_kwargs).fit(
            module, datamodule=datamodule(images, size=32)
        )
    return module, recorder.losses


def test_bf16_mixed_runs_with_lbfgs(tmp_path, images):
    module, losses = _run_precision(tmp_path, images, precision="bf16-mixed")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]
    assert module.image.dtype == torch.float32


def test_bf16_on_a_cpu_without_native_support_warns(tmp_path, images, monkeypatch):
    monkeypatch.setattr("nst_lightning.run.checks.bf16_is_native_on_cpu", lambda: False)
    with pytest.warns(UserWarning, match="no native bfloat16"):
        make_trainer(tmp_path, steps=0, precision="bf16-mixed").fit(make_module(), datamodule=datamodule(images))


def test_bf16_on_a_gpu_without_native_support_warns_in_one_line(monkeypatch):
    from nst_lightning.run.checks import check_precision

    monkeypatch.setattr("nst_lightning.run.checks.bf16_is_native_on_gpu", lambda: False)  # a GPU before Ampere
    with pytest.warns(UserWarning, match="this GPU computes bfloat16 without native support") as caught:
        check_precision("bf16-mixed", "cuda")
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    monkeypatch.setattr("nst_lightning.run.checks.bf16_is_native_on_gpu", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_precision("bf16-mixed", "cuda")
        check_precision("16-mixed", "cuda")


def test_16_mixed_with_lbfgs_scales_the_loss_in_the_closure(tmp_path, images):
    # Lightning's own 16-mixed plugin holds a GradScaler that refuses L-BFGS; the module takes it out
    # and scales the loss itself. On CPU the Trainer flag maps to bf16, so the plugin is built here to
    # run real float16 autocast.
    plugin = MixedPrecision("16-mixed", "cpu")
    assert plugin.scaler is not None
    # strong_wolfe: DeviceLBFGS's second step (sized by the curvature along its tiny first one, undone only
    # after it is evaluated) overflows float16 here at step 2, which a NumericalError ends at once (issue 22).
    module, losses = _run_precision(tmp_path, images, line_search="strong_wolfe", plugins=[plugin])
    assert plugin.scaler is None
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_the_last_steps_of_a_mixed_precision_run_are_float32(tmp_path, images, caplog):
    module = make_module(float32_final_steps=2, lbfgs_line_search=None)  # one evaluation per iteration
    dtypes = []
    module.objective.extractor.body.conv1_1.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    with warnings.catch_warnings(), caplog.at_level("DEBUG", logger="nst_lightning"):  # a detail (--verbose)
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, steps=5, precision="bf16-mixed").fit(module, datamodule=datamodule(images, size=32))
    assert "step 3: the last 2 iterations run in float32" in caplog.text
    # The targets are computed once in float32 (setup: content and style), then one evaluation per
    # L-BFGS iteration.
    assert dtypes == [torch.float32] * 2 + [torch.bfloat16] * 3 + [torch.float32] * 2
    assert torch.isfinite(module.image).all()


def test_float32_final_steps_change_nothing_in_a_float32_run(tmp_path, images):
    module = make_module(float32_final_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, steps=3).fit(module, datamodule=datamodule(images, size=32))
        assert not module.in_float32_phase()


def test_16_mixed_does_not_scale_the_loss_in_the_float32_phase(tmp_path, images):
    module = make_module(style_layers=["conv1_1"], content_layers=["conv1_1"], float32_final_steps=2)
    module.loss_scale.fill_(2.0**40)  # would overflow float16, and be backed off, if it were used
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, steps=2, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(
            module, datamodule=datamodule(images, size=16)
        )
    assert float(module.loss_scale) == 2.0**40
    assert torch.isfinite(module.image).all()


def test_16_mixed_recovers_from_gradient_overflow(tmp_path, images):
    module = make_module(style_layers=["conv1_1"], content_layers=["conv1_1"], float32_final_steps=0)
    module.loss_scale.fill_(2.0**40)  # overflows float16 at once: the closure must back off and retry
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, steps=2, plugins=[MixedPrecision("16-mixed", "cpu")]).fit(
            module, datamodule=datamodule(images, size=16)
        )
    assert float(module.loss_scale) < 2.0**40
    assert torch.isfinite(module.image).all()


def test_true_half_precision_is_refused(tmp_path, images):
    with pytest.raises(ConfigError, match="half precision"):
        make_trainer(tmp_path, steps=1, precision="bf16-true").fit(make_module(), datamodule=datamodule(images))


@pytest.mark.parametrize("final_steps, expected", [(50, "32-true"), (0, "bf16-mixed")])
def test_the_memory_check_counts_the_float32_finish(tmp_path, images, monkeypatch, final_steps, expected):
    from nst_lightning.run import plan

    seen, estimate = set(), plan.estimate_peak

    def recorded(*args, **kwargs):
        seen.add(kwargs["precision"])
        return estimate(*args, **kwargs)

    monkeypatch.setattr(plan, "estimate_peak", recorded)  # as the memory plan calls it
    module = make_module(float32_final_steps=final_steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        make_trainer(tmp_path, steps=0, precision="bf16-mixed").fit(module, datamodule=datamodule(images))
    assert seen == {expected}


def test_compile_with_bf16_mixed_is_refused_on_a_gpu_only():
    from nst_lightning.run.checks import check_precision, check_trainer_settings

    with pytest.raises(ConfigError, match="model.compile true with trainer.precision bf16-mixed") as caught:
        check_precision("bf16-mixed", "cuda", compile=True)
    assert "\n" not in str(caught.value) and "--trainer.precision 32-true" in str(caught.value)
    check_precision("bf16-mixed", "cpu", compile=True, warn=False)  # works there: the next test
    check_precision("32-true", "cuda", compile=True)
    check_precision("bf16-mixed", "cuda", compile=False, warn=False)

    class Trainer(dict):  # a trainer: namespace, read by key and by attribute
        __getattr__ = dict.__getitem__

    # The command line refuses what the module would, before anything loads (here: half precision on a CPU).
    trainer = Trainer(accelerator="cpu", devices=1, num_nodes=1, strategy="auto", precision="bf16-true")
    with pytest.raises(ConfigError, match="half precision"):
        check_trainer_settings(trainer, compile=True)
    check_trainer_settings(Trainer(trainer, precision="bf16-mixed"), compile=True)


@pytest.mark.slow
def test_compile_with_bf16_mixed_lowers_the_loss_on_a_cpu(tmp_path, images, monkeypatch):
    # The combination a GPU run is refused (measured broken there): on a CPU the compiled loss falls as the
    # eager one does. Dynamo and AOTAutograd (the autocast regions, the Gram product's own backward) as a
    # real compile runs them; inductor's code generation, a minute on 2 cores, is left out.
    from nst_lightning.core.objective import Objective

    compile_module, forward, traced = Objective.compile, Objective.forward, []
    monkeypatch.setattr(Objective, "compile", lambda self: compile_module(self, backend="aot_eager"))

    def watched(self, image):
        traced.append(torch.compiler.is_compiling())  # True while dynamo traces the forward
        return forward(self, image)

    monkeypatch.setattr(Objective, "forward", watched)
    layers = {"content_layers": ["relu2_1"], "style_layers": ["relu1_1", "relu2_1"]}
    recorder = LossRecorder()
    module = make_module(compile=True, float32_final_steps=0, init="content", **layers)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = make_trainer(tmp_path, steps=4, precision="bf16-mixed", callbacks=[recorder])
        trainer.fit(module, datamodule=datamodule(images, size=32))
    assert True in traced
    assert len(recorder.losses) == 4 and recorder.losses[-1] < 0.9 * recorder.losses[0]


@pytest.mark.parametrize("on_cuda", [True, False])
def test_a_cuda_run_gets_tf32_and_cudnn_autotuning_unless_the_config_says_otherwise(monkeypatch, on_cuda):
    from nst_lightning.run import precision

    class Trainer(dict):
        __getattr__ = dict.__getitem__

        def __setattr__(self, key, value):
            self[key] = value

    monkeypatch.setattr(precision, "runs_on_cuda", lambda accelerator: on_cuda)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        default = Trainer(accelerator="auto", benchmark=None, deterministic=None)
        off = Trainer(accelerator="gpu", benchmark=False, deterministic=None)
        deterministic = Trainer(accelerator="auto", benchmark=None, deterministic=True)
        for trainer in (default, off, deterministic):
            precision.choose_gpu_math(trainer)
        chosen = torch.get_float32_matmul_precision()
    finally:
        torch.set_float32_matmul_precision(before)
    assert default.benchmark is (True if on_cuda else None)
    assert off.benchmark is False and deterministic.benchmark is None  # the config's choice, determinism win
    assert chosen == ("high" if on_cuda else "highest")  # TF32 for float32 matrix products
    torch.set_float32_matmul_precision("medium")  # the user's own choice is left alone
    try:
        assert not precision.use_tf32() and torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
