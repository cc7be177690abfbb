import pytest
import torch
from torch import nn

from nst_lightning.core.backbones import layer_names
from nst_lightning.core.features import FeatureExtractor, calibration_images
from nst_lightning.errors import ConfigError, WeightsError

STYLE = ["conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]


@pytest.fixture
def extractor(weights_file):
    return FeatureExtractor(["conv4_2", *STYLE], weights=str(weights_file))


def test_returns_requested_activations_with_expected_shapes(extractor):
    out = extractor(torch.rand(1, 3, 32, 48))
    assert set(out) == {"conv4_2", *STYLE}
    assert out["conv1_1"].shape == (1, 64, 32, 48)
    assert out["conv3_1"].shape == (1, 256, 8, 12)
    assert out["conv5_1"].shape == (1, 512, 2, 3)


def test_network_is_truncated_after_deepest_layer(extractor):
    names = [name for name, _ in extractor.body.named_children()]
    assert names[-1] == "conv5_1"
    shallow = FeatureExtractor(["relu2_1"], weights="random")
    assert [n for n, _ in shallow.body.named_children()][-1] == "relu2_1"
    assert shallow.min_image_side == 2


def test_extractor_is_frozen_and_stays_in_eval(extractor):
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training
    assert {"mean", "std"} <= {name for name, _ in extractor.named_buffers()}


def test_conv_output_is_not_overwritten_by_inplace_relu(extractor):
    out = extractor(torch.rand(1, 3, 32, 32))
    assert (out["conv4_2"] < 0).any(), "a requested conv output must keep its negative values"


def test_unknown_layer_name_is_a_helpful_value_error():
    with pytest.raises(ValueError, match="unknown layer name.*conv9_9.*choose from.*conv1_1"):
        FeatureExtractor(["conv9_9"], weights="random")


def test_unknown_backbone_and_pooling():
    with pytest.raises(ConfigError, match="unknown backbone"):
        FeatureExtractor(["conv1_1"], backbone="alexnet", weights="random")
    with pytest.raises(ConfigError, match="pooling"):
        FeatureExtractor(["conv1_1"], weights="random", pooling="median")


def test_average_pooling_replaces_max_pooling():
    avg = FeatureExtractor(["conv3_1"], weights="random", pooling="avg")
    kinds = {type(layer) for layer in avg.body}
    assert nn.AvgPool2d in kinds and nn.MaxPool2d not in kinds


def test_channels_last_gives_the_same_activations_and_a_contiguous_image_gradient():
    layers = ["conv4_2", *STYLE]
    fast = FeatureExtractor(layers, weights="random")
    plain = FeatureExtractor(layers, weights="random", channels_last=False)
    assert fast.body.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)
    image = torch.rand(1, 3, 32, 48, requires_grad=True)
    a, b = fast(image), plain(image)
    for name in layers:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)
    sum(v.square().mean() for v in a.values()).backward()
    # L-BFGS flattens the gradient with view(-1): it must stay in the image's own (NCHW) layout.
    assert image.is_contiguous() and image.grad.is_contiguous()


# ---------------------------------------------------------------- the normalised network


def _mean_rectified(extractor, images, layer):
    return sum(float(extractor(image)[layer].clamp(min=0).mean()) for image in images) / len(images)


@pytest.mark.slow
def test_normalising_gives_every_layer_a_mean_activation_of_one(weights_file):
    layers = ["conv1_1", "relu2_1", "conv4_2", "pool3"]
    raw = FeatureExtractor(layers, weights=str(weights_file))
    normal = FeatureExtractor(layers, weights=str(weights_file), normalize=True)
    images = calibration_images()
    for layer in ("conv1_1", "relu2_1", "conv4_2"):
        assert _mean_rectified(normal, images, layer) == pytest.approx(1.0, rel=1e-3)
    # Only the scale changes: each layer is the raw network's, divided by its mean (pooling passes
    # its input's on).
    image = images[0]
    got, want = normal(image), raw(image)
    means = normal.layer_means
    torch.testing.assert_close(got["conv4_2"], want["conv4_2"] / means["conv4_2"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["pool3"], want["pool3"] / means["conv3_4"], rtol=1e-4, atol=1e-5)
    assert list(means) == [n for n in layer_names(normal.body) if n.startswith("conv")], "every convolution"


def test_given_layer_means_are_used_as_they_are(weights_file):
    measured = FeatureExtractor(["conv2_1"], weights=str(weights_file), normalize=True).layer_means
    doubled = {name: 2 * value for name, value in measured.items()}
    given = FeatureExtractor(["conv2_1"], weights=str(weights_file), normalize=True, layer_means=doubled)
    assert given.layer_means == doubled
    image = torch.rand(1, 3, 32, 32)
    base = FeatureExtractor(["conv2_1"], weights=str(weights_file), normalize=True)
    torch.testing.assert_close(given(image)["conv2_1"] * 2, base(image)["conv2_1"], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="layer_means has no value for conv1_2, conv2_1"):
        FeatureExtractor(["conv2_1"], weights=str(weights_file), normalize=True, layer_means={"conv1_1": 1.0})
    with pytest.raises(WeightsError, match="no positive mean activation at conv1_2.*normalize false"):
        FeatureExtractor(["conv2_1"], weights=str(weights_file), normalize=True, layer_means=measured | {"conv1_2": 0})


def test_other_backbones_divide_the_returned_activations():
    with pytest.warns(UserWarning, match="random"):
        raw = FeatureExtractor(["layer1", "maxpool"], backbone="resnet18", weights="random")
    normal = FeatureExtractor(["layer1", "maxpool"], backbone="resnet18", weights="random", normalize=True)
    assert set(normal.layer_means) == {"layer1", "relu"}, "pooling takes the ReLU's factor"
    image = torch.rand(1, 3, 64, 64)
    got, want = normal(image), raw(image)
    torch.testing.assert_close(got["layer1"], want["layer1"] / normal.layer_means["layer1"])
    torch.testing.assert_close(got["maxpool"], want["maxpool"] / normal.layer_means["relu"])
