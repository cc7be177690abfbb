import itertools

import pytest
import torch
from lightning import Callback

from nst_lightning.core.lbfgs import last_accepted
from nst_lightning.errors import ConfigError
from tests.conftest import LossRecorder, datamodule, make_module, make_trainer


def total_loss(module) -> float:
    """The loss of the run's result: under DeviceLBFGS its last accepted point (the image holds the next trial)."""
    with torch.no_grad():
        return float(module(last_accepted(module.image, module.trainer.optimizers))["total"])


def test_lbfgs_steps_lower_the_loss_and_only_the_image_learns(tmp_path, images):
    module = make_module()
    dm = datamodule(images)
    trainer = make_trainer(tmp_path, steps=1)
    trainer.fit(module, datamodule=dm)
    start_image = module.image.detach().clone()
    before = total_loss(module)
    trainer = make_trainer(tmp_path, steps=8)
    trainer.fit(module, datamodule=dm)
    assert total_loss(module) < before
    assert not torch.equal(module.image.detach(), start_image)
    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["image"]
    assert all(p.grad is None for p in module.objective.extractor.parameters())


def test_adam_also_lowers_the_loss(tmp_path, images):
    module = make_module(optimizer="adam", lr=0.05)
    recorder = LossRecorder()
    make_trainer(tmp_path, steps=10, callbacks=[recorder]).fit(module, datamodule=datamodule(images))
    assert recorder.losses[-1] < recorder.losses[0]


def test_targets_are_buffers_computed_once(tmp_path, images):
    module = make_module(style_layers=["conv1_1", "conv2_1"])
    dm = datamodule(images)
    make_trainer(tmp_path, steps=2).fit(module, datamodule=dm)
    buffers = dict(module.named_buffers())
    assert buffers["objective.content_targets.relu4_2.target"].shape[1] == 512
    assert buffers["objective.style_targets.conv1_1.0.gram"].shape == (1, 64, 64)
    assert buffers["objective.style_targets.conv2_1.0.gram"].shape == (1, 128, 128)
    # The targets are those of the data, whatever the optimisation did since.
    with torch.no_grad():
        fresh = module.objective.extractor(dm.content_image)["relu4_2"]
    torch.testing.assert_close(buffers["objective.content_targets.relu4_2.target"], fresh)


def test_init_options(tmp_path, images):
    dm = datamodule(images)
    dm.setup("fit")
    a, b = make_module(init="noise", seed=3), make_module(init="noise", seed=3)
    for module in (a, b):
        make_trainer(tmp_path, steps=0).fit(module, datamodule=dm)
    torch.testing.assert_close(a.image, b.image)
    content = make_module(init="content")
    make_trainer(tmp_path, steps=0).fit(content, datamodule=dm)
    torch.testing.assert_close(content.image.detach(), dm.content_image)
    style = make_module(init="style")
    make_trainer(tmp_path, steps=0).fit(style, datamodule=dm)
    assert style.image.shape == dm.content_image.shape


def test_style_layer_weights_weigh_the_style_terms(tmp_path, images):
    dm = datamodule(images)
    module = make_module(style_layers=["conv1_1", "conv2_1"], style_layer_weights=[2.0, 0.0])
    make_trainer(tmp_path, steps=0).fit(module, datamodule=dm)
    with torch.no_grad():
        losses = module(module.image)
    torch.testing.assert_close(losses["style"], 2.0 * losses["style_conv1_1"])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"style_layer_weights": [1.0]}, "one weight per style layer"),
        ({"style_weight": -1.0}, "style_weight must be a finite number >= 0"),
        ({"content_weight": float("nan")}, "content_weight"),
        ({"content_layers": ["conv4_9"]}, "unknown layer name"),
        ({"backbone": "resnet1000"}, "unknown backbone"),
        ({"lr": 0.0}, "lr must be a positive"),
        ({"init": "cloud"}, "neither content, style, noise nor an existing image"),
        ({"scales": [64, 32], "scale_steps": [1, 1]}, "ascending"),
        ({"scales": [32], "scale_steps": None}, "go together"),
        ({"scales": [16, 32], "scale_steps": [3]}, "one number of iterations per scale"),
        ({"style_loss": "fancy"}, "unknown style_loss"),
    ],
)
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        make_module(**kwargs)


def test_image_too_small_for_the_deepest_layer(tmp_path, images):
    with pytest.raises(ConfigError, match="at least 16 px"):
        make_trainer(tmp_path, steps=1).fit(make_module(), datamodule=datamodule(images, size=12))
    # Shallow layers work at that size.
    make_trainer(tmp_path, steps=1).fit(
        make_module(content_layers=["conv2_1"], style_layers=["conv1_1"]), datamodule=datamodule(images, size=12)
    )


def test_checkpoint_holds_image_and_targets_but_not_the_extractor(tmp_path, images):
    module = make_module()
    trainer = make_trainer(tmp_path, steps=2)
    trainer.fit(module, datamodule=datamodule(images))
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    state = torch.load(tmp_path / "a.ckpt", weights_only=True)["state_dict"]
    assert "image" in state and "objective.style_targets.relu5_1.0.gram" in state
    assert not [k for k in state if k.startswith("objective.extractor.")]


class ImageAtStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.image = pl_module.image.detach().clone()
        self.step = trainer.global_step


def test_resume_continues_from_the_saved_image(tmp_path, images):
    module = make_module()
    trainer = make_trainer(tmp_path, steps=3)
    trainer.fit(module, datamodule=datamodule(images))
    ckpt = tmp_path / "run.ckpt"
    trainer.save_checkpoint(ckpt)
    saved = module.image.detach().clone()

    start = ImageAtStart()
    resumed = make_module()
    make_trainer(tmp_path, steps=5, callbacks=[start]).fit(resumed, datamodule=datamodule(images), ckpt_path=ckpt)
    assert start.step == 3
    torch.testing.assert_close(start.image, saved)
    assert resumed.trainer.global_step == 5
    # L-BFGS history came back too.
    assert resumed.optimizers().optimizer.state[resumed.image]["n_iter"] == 5


def test_resume_with_another_image_size_is_refused(tmp_path, images):
    module = make_module()
    trainer = make_trainer(tmp_path, steps=1)
    trainer.fit(module, datamodule=datamodule(images))
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    with pytest.raises(ConfigError, match="same data.image_size"):
        make_trainer(tmp_path, steps=2).fit(
            make_module(), datamodule=datamodule(images, size=24), ckpt_path=tmp_path / "run.ckpt"
        )


class ImageMoves(Callback):
    def __init__(self):
        self.moved, self.losses = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.before = pl_module.image.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.moved.append(not torch.equal(self.before, pl_module.image.detach()))
        self.losses.append(float(outputs["loss"]))


def test_strong_wolfe_line_search_keeps_moving(tmp_path, images):
    # With max_iter=1, torch's default max_eval left the line search no evaluation to spend: after its
    # first refused step the image never moved again.
    watch = ImageMoves()
    module = make_module(lbfgs_line_search="strong_wolfe")
    make_trainer(tmp_path, steps=8, callbacks=[watch]).fit(module, datamodule=datamodule(images))
    assert all(watch.moved)
    assert all(b <= a for a, b in itertools.pairwise(watch.losses)), watch.losses
    assert module.optimizers().optimizer.defaults["max_eval"] > 1


class Evaluations(Callback):
    def __init__(self):
        self.per_step = []

    def on_losses(self, trainer, pl_module, rows):  # each step's values, from the module's loss log
        self.per_step += [row.values["closure_evaluations"] for row in rows]


def test_a_line_search_step_does_not_evaluate_its_end_point_twice(tmp_path, images):
    # Each step starts where the previous line search ended: that point's evaluation is reused, so
    # an accepted first trial costs one evaluation per step, not two.
    counter = Evaluations()
    module = make_module(lbfgs_line_search="strong_wolfe", init="content")
    make_trainer(tmp_path, steps=12, callbacks=[counter]).fit(module, datamodule=datamodule(images))
    assert module.evaluations == sum(counter.per_step)
    assert sum(counter.per_step[1:]) < 1.5 * len(counter.per_step[1:]), counter.per_step


@pytest.mark.slow
def test_compile_is_opt_in():
    assert make_module().objective._compiled_call_impl is None
    compiled = make_module(compile=True)  # compilation itself happens at the first call, not here
    assert compiled.hparams.compile is True
    assert compiled.objective._compiled_call_impl is not None
    assert not [k for k in compiled.state_dict() if "_orig_mod" in k]
