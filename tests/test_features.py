from urllib.error import URLError

import pytest
import torch
from torch import nn

from nst_lightning.errors import ConfigError, WeightsError
from nst_lightning.features import (
    BACKBONES,
    FeatureExtractor,
    calibration_images,
    hub_cache_file,
    layer_names,
    load_backbone,
)

STYLE = ["conv1_1", "conv2_1", "conv3_1", "conv4_1", "conv5_1"]


@pytest.fixture
def extractor(weights_file):
    return FeatureExtractor(["conv4_2", *STYLE], weights=str(weights_file))


def test_layer_names_are_derived_from_the_network():
    for backbone, convs in (("vgg19", 16), ("vgg16", 13)):
        names = layer_names(BACKBONES[backbone].build())
        assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
        assert sum(n.startswith("conv") for n in names) == convs
        assert sum(n.startswith("pool") for n in names) == 5
    assert "conv5_4" in layer_names(BACKBONES["vgg19"].build())
    assert "conv5_4" not in layer_names(BACKBONES["vgg16"].build())


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


def test_random_weights_warn():
    with pytest.warns(UserWarning, match="no stylisation"):
        load_backbone("vgg19", "random")


def test_weight_file_in_both_layouts(tmp_path, weights_file, vgg19_features_state):
    features_only = tmp_path / "features.pth"
    torch.save(vgg19_features_state, features_only)
    a = FeatureExtractor(["conv2_1"], weights=str(weights_file))
    b = FeatureExtractor(["conv2_1"], weights=str(features_only))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(pa, pb, msg=name)
    torch.testing.assert_close(a.body.conv1_1.weight, vgg19_features_state["0.weight"])


def test_imagenet_weights_come_from_the_torch_hub_cache(tmp_path, monkeypatch, weights_file):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    cached = hub_cache_file("vgg19")
    assert cached.name == "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights_file.read_bytes())
    extractor = FeatureExtractor(["conv1_1"], weights="imagenet")
    expected = torch.load(weights_file, weights_only=True)["features.0.weight"]
    torch.testing.assert_close(extractor.body.conv1_1.weight, expected)


def test_imagenet_weights_offline_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*args, **kwargs):
        raise URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(WeightsError, match=r"--model.weights /path/to/vgg19-dcbb9e9d.pth.*hub/checkpoints"):
        FeatureExtractor(["conv1_1"], weights="imagenet")


def test_bad_weight_files_get_clear_errors(tmp_path, vgg19_features_state):
    with pytest.raises(WeightsError, match="not found"):
        load_backbone("vgg19", str(tmp_path / "missing.pth"))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsError, match="cannot load weights file"):
        load_backbone("vgg19", str(garbage))
    not_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_dict)
    with pytest.raises(WeightsError, match="does not hold a state dict"):
        load_backbone("vgg19", str(not_dict))
    wrong_arch = tmp_path / "vgg16.pth"
    with pytest.warns(UserWarning):
        torch.save(load_backbone("vgg16", "random").state_dict(), wrong_arch)
    with pytest.raises(WeightsError, match="do not fit vgg19"):
        load_backbone("vgg19", str(wrong_arch))
    wrong_shape = dict(vgg19_features_state)
    wrong_shape["0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="size mismatch"):
        load_backbone("vgg19", str(tmp_path / "shape.pth"))


def test_weight_files_are_loaded_without_running_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsError, match="cannot load weights file"):
        load_backbone("vgg19", str(path))


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
