"""The options that match the established style-transfer tools (blends, scales, colour, init,
coarse-to-fine, mean-covariance loss, backbones, masks)."""

import pytest
import torch
from lightning import Callback
from PIL import Image

from nst_lightning.core.color import rgb_to_yiq
from nst_lightning.core.losses import gram_matrix
from nst_lightning.errors import ConfigError, ImageError
from nst_lightning.run.data import StyleTransferDataModule
from tests.conftest import LossRecorder, make_image, make_module, make_trainer

SHALLOW = {"content_layers": ["conv2_1"], "style_layers": ["conv1_1", "conv2_1"]}


@pytest.fixture
def two_styles(tmp_path, images):
    return [str(images["style"]), str(make_image(tmp_path / "style2.png", 24, 36, seed=7))]


def fit(tmp_path, module, dm, steps=0, **kwargs):
    make_trainer(tmp_path, steps=steps, **kwargs).fit(module, datamodule=dm)
    return module


def test_blend_weights_blend_the_style_statistics(tmp_path, images, two_styles):
    dm = StyleTransferDataModule(str(images["content"]), two_styles, image_size=32, style_blend_weights=[1, 3])
    assert dm.blend == [0.25, 0.75]
    module = fit(tmp_path, make_module(**SHALLOW), dm)
    inputs = dm.inputs()
    with torch.no_grad():
        grams = [gram_matrix(module.objective.extractor(style)["conv1_1"]) for style in inputs.styles]
    torch.testing.assert_close(module.objective.style_targets["conv1_1"][0].gram, 0.25 * grams[0] + 0.75 * grams[1])
    # A single style with all the weight gives that style's target.
    only_second = StyleTransferDataModule(str(images["content"]), two_styles, image_size=32, style_blend_weights=[0, 1])
    module2 = fit(tmp_path, make_module(**SHALLOW), only_second)
    torch.testing.assert_close(module2.objective.style_targets["conv1_1"][0].gram, grams[1])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"style_blend_weights": [1.0]}, "one weight per style"),
        ({"style_blend_weights": [1.0, -1.0]}, ">= 0 with a positive sum"),
        ({"style_blend_weights": [0.0, 0.0]}, ">= 0 with a positive sum"),
        ({"style_masks": ["a.png"]}, "one mask per style"),
        ({"style_scale": 0.0}, "style_scale must be a positive"),
    ],
)
def test_bad_style_options(images, two_styles, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        StyleTransferDataModule(str(images["content"]), two_styles, **kwargs)


def test_style_scale_resizes_the_style_images(images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=40, style_scale=0.5)
    assert dm.inputs().styles[0].shape[-2:] == (20, 20)
    assert dm.inputs().content.shape[-2:] == (30, 40)


def test_preserve_color_luminance_keeps_the_content_chroma(tmp_path, images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    module = fit(tmp_path, make_module(preserve_color="luminance", init="content", **SHALLOW), dm, steps=4)
    # The optimised image is the luminance alone; the output takes the content's chroma.
    assert module.image.shape[1] == 1
    output, content = module.output_image(), dm.inputs().content
    unclipped = ((output > 0.001) & (output < 0.999)).all(dim=1, keepdim=True)
    chroma_out, chroma_in = rgb_to_yiq(output)[:, 1:], rgb_to_yiq(content)[:, 1:]
    assert unclipped.float().mean() > 0.9
    assert torch.allclose(chroma_out * unclipped, chroma_in * unclipped, atol=1e-4)
    # ...while the luminance did change.
    assert not torch.allclose(rgb_to_yiq(output)[:, :1], rgb_to_yiq(content)[:, :1], atol=1e-3)


def test_preserve_color_histogram_recolours_the_style_targets(tmp_path, images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    plain = fit(tmp_path, make_module(**SHALLOW), dm)
    matched = fit(tmp_path, make_module(preserve_color="histogram", **SHALLOW), dm)
    grams = [module.objective.style_targets["conv1_1"][0].gram for module in (plain, matched)]
    assert not torch.allclose(*grams)


def test_init_from_an_image_file(tmp_path, images):
    init_file = make_image(tmp_path / "init.png", 20, 10, seed=9)
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    module = fit(tmp_path, make_module(init=str(init_file), **SHALLOW), dm)
    assert module.image.shape == dm.inputs().content.shape
    assert not torch.allclose(module.image, dm.inputs().content)


def test_same_config_and_seed_give_the_same_result(tmp_path, images):
    results = []
    for _ in range(2):
        dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
        results.append(fit(tmp_path, make_module(init="noise", seed=5), dm, steps=3).image.detach().clone())
    assert torch.equal(results[0], results[1])
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    other = fit(tmp_path, make_module(init="noise", seed=6), dm, steps=3).image.detach()
    assert not torch.equal(results[0], other)


class ShapePerStep(Callback):
    def __init__(self):
        self.shapes, self.history = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.shapes.append(tuple(pl_module.image.shape[-2:]))
        state = trainer.optimizers[0].state[pl_module.image]
        self.history.append(int(state.get("n_iter", 0)))  # DeviceLBFGS's is a tensor, updated in place


def test_coarse_to_fine_ends_at_the_final_size(tmp_path, images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    module = make_module(scales=[16, 24, 32], scale_steps=[2, 2, 3], **SHALLOW)
    record, losses = ShapePerStep(), LossRecorder()
    fit(tmp_path, module, dm, steps=7, callbacks=[record, losses])
    assert record.shapes == [(12, 16)] * 2 + [(18, 24)] * 2 + [(24, 32)] * 3
    # The optimiser starts afresh at each scale; targets are those of the final size.
    assert record.history == [1, 2, 1, 2, 1, 2, 3]
    assert module.objective.content_targets["conv2_1"].target.shape[-2:] == (12, 16)
    assert all(torch.isfinite(torch.tensor(losses.losses)))


def test_coarse_to_fine_schedule_must_match_the_run(tmp_path, images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    with pytest.raises(ConfigError, match="set --trainer.max_steps 4"):
        fit(tmp_path, make_module(scales=[16, 32], scale_steps=[2, 2], **SHALLOW), dm, steps=3)
    with pytest.raises(ConfigError, match="make the last scale 32"):
        fit(tmp_path, make_module(scales=[16, 24], scale_steps=[2, 2], **SHALLOW), dm, steps=4)


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        trainer.should_stop = trainer.global_step >= self.step


def test_extra_steps_run_at_the_last_scale(tmp_path, images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    record = ShapePerStep()
    fit(tmp_path, make_module(scales=[16, 32], scale_steps=[1, 1], **SHALLOW), dm, steps=3, callbacks=[record])
    assert record.shapes == [(12, 16), (24, 32), (24, 32)]


def test_coarse_to_fine_resumes_at_the_saved_scale(tmp_path, images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    trainer = make_trainer(tmp_path, steps=5, callbacks=[StopAt(3)])
    module = make_module(scales=[16, 32], scale_steps=[2, 3], **SHALLOW)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = module.image.detach().clone()
    assert saved.shape[-2:] == (24, 32)
    resumed = make_module(scales=[16, 32], scale_steps=[2, 3], **SHALLOW)
    record = ShapePerStep()
    make_trainer(tmp_path, steps=5, callbacks=[record]).fit(resumed, datamodule=dm, ckpt_path=tmp_path / "mid.ckpt")
    assert record.shapes == [(24, 32)] * 2
    assert record.history == [2, 3], "the L-BFGS history of the saved scale came back"


def test_mean_cov_style_loss_trains(tmp_path, images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    losses = LossRecorder()
    module = fit(tmp_path, make_module(style_loss="mean_cov", style_weight=10.0), dm, steps=6, callbacks=[losses])
    target = module.objective.style_targets["relu1_1"][0]
    assert {"mean", "cov", "cov_sqrt"} <= {name for name, _ in target.named_buffers()}
    assert losses.losses[-1] < losses.losses[0]


def test_resnet18_backbone_runs(tmp_path, images):
    dm = StyleTransferDataModule(str(images["content"]), str(images["style"]), image_size=32)
    module = make_module(backbone="resnet18", content_layers=["layer3"], style_layers=["relu", "layer1", "layer2"])
    losses = LossRecorder()
    fit(tmp_path, module, dm, steps=4, callbacks=[losses])
    assert [name for name, _ in module.objective.extractor.body.named_children()][-1] == "layer3"
    assert not module.objective.extractor.training
    assert losses.losses[-1] < losses.losses[0]


def _half_mask(path, width, height):
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (0, 0, width // 2, height))
    mask.save(path)
    return str(path)


def test_a_mask_keeps_the_style_out_of_its_excluded_region(tmp_path, images):
    dm = StyleTransferDataModule(
        str(images["content"]),
        str(images["style"]),
        image_size=40,
        style_masks=[_half_mask(tmp_path / "mask.png", 40, 30)],
    )
    module = fit(tmp_path, make_module(content_layers=["conv1_1"], style_layers=["conv1_1"], content_weight=0), dm)
    image = module.image.detach().clone().requires_grad_(True)
    module(image)["total"].backward()
    grad = image.grad.abs().sum(dim=(0, 1))  # (H, W)
    # conv1_1 sees one pixel around each position: beyond that, no style reaches the right half.
    assert grad[:, 21:].max() == 0
    assert grad[:, :19].sum() > 0


def test_mask_of_the_wrong_size_is_refused(tmp_path, images):
    dm = StyleTransferDataModule(
        str(images["content"]), str(images["style"]), style_masks=[_half_mask(tmp_path / "m.png", 10, 10)]
    )
    with pytest.raises(ImageError, match="mask .* is 10x10 px but the content image is 40x30"):
        dm.setup("fit")
