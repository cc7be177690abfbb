"""The objective without Lightning: targets as buffers, the named losses, colour, masks and blends, and what it
says about a checkpoint's targets and a non-finite loss."""

import warnings

import torch

from nst_lightning.core.features import FeatureExtractor
from nst_lightning.core.inputs import Inputs
from nst_lightning.core.losses import gram_matrix
from nst_lightning.core.objective import Objective

CONTENT, STYLE = ["conv2_1"], ["conv1_1", "conv2_1"]


def objective(**kwargs) -> Objective:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = FeatureExtractor(CONTENT + STYLE, weights="random")
    return Objective(extractor, CONTENT, STYLE, [1.0, 1.0], **kwargs)


def inputs(masks=None, styles=1, blend=None) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    content = torch.rand(1, 3, 24, 32, generator=generator)
    style_images = [torch.rand(1, 3, 20, 20, generator=generator) for _ in range(styles)]
    return Inputs(content, style_images, blend or [1.0 / styles] * styles, masks)


def test_targets_are_buffers_and_the_losses_are_named():
    loss = objective(style_weight=10.0, tv_weight=2.0)
    with torch.no_grad():
        loss.set_targets(inputs())
    names = {name for name, _ in loss.named_buffers() if "extractor" not in name}
    grams = {f"style_targets.{layer}.0.gram" for layer in STYLE}
    assert names == {"content_image", "content_targets.conv2_1.target", *grams}
    image = torch.rand(1, 3, 24, 32, requires_grad=True)
    losses = loss(image)
    assert set(losses) == {"total", "content", "style", "style_conv1_1", "style_conv2_1", "tv"}
    expected = losses["content"] + 10.0 * losses["style"] + 2.0 * losses["tv"]
    torch.testing.assert_close(losses["total"].detach(), expected)
    losses["total"].backward()
    assert image.grad is not None and image.grad.abs().sum() > 0
    # At the content image, the content loss is zero.
    assert float(loss(inputs().content)["content"]) == 0.0


def test_blend_weights_blend_the_style_statistics():
    loss = objective()
    two = inputs(styles=2, blend=[0.25, 0.75])
    with torch.no_grad():
        loss.set_targets(two)
        grams = [gram_matrix(loss.extractor(style)["conv1_1"]) for style in two.styles]
    torch.testing.assert_close(loss.style_targets["conv1_1"][0].gram, 0.25 * grams[0] + 0.75 * grams[1])


def test_with_masks_each_style_gets_its_region_and_the_full_weight():
    masks = [torch.zeros(1, 1, 24, 32), torch.ones(1, 1, 24, 32)]
    masks[0][..., :16] = 1
    loss = objective()
    with torch.no_grad():
        loss.set_targets(inputs(masks=masks, styles=2, blend=[0.5, 0.5]))
    assert len(loss.style_targets["conv1_1"]) == 2 and loss.group_weights == [1.0, 1.0]


def test_luminance_only_starts_from_one_channel_and_gives_back_the_contents_chroma():
    loss = objective(preserve_color="luminance")
    data = inputs()
    with torch.no_grad():
        loss.set_targets(data)
    start = loss.initial_image(data, "content")
    assert start.shape == (1, 1, 24, 32)
    assert loss(start)["total"].isfinite()
    rgb = loss.to_rgb(start)
    assert rgb.shape == (1, 3, 24, 32) and 0 <= float(rgb.min()) and float(rgb.max()) <= 1


def test_initial_images():
    loss = objective()
    data = inputs()
    torch.testing.assert_close(loss.initial_image(data, "content"), data.content)
    torch.testing.assert_close(loss.initial_image(data, "noise", seed=3), loss.initial_image(data, "noise", seed=3))
    assert loss.initial_image(data, "style").shape == data.content.shape
    assert loss.initial_image(data, "file.png", image=torch.rand(1, 3, 5, 7)).shape == data.content.shape
