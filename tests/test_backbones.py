"""The backbones: layer names from the network, weights from the hub cache or a file, clear refusals."""

from urllib.error import URLError

import pytest
import torch

from nst_lightning.core.backbones import (
    BACKBONES,
    backbone_layers,
    check_cached_hash,
    check_layers,
    hub_cache_file,
    layer_names,
    load_backbone,
)
from nst_lightning.core.features import FeatureExtractor
from nst_lightning.errors import ConfigError, WeightsError


def test_layer_names_are_derived_from_the_network():
    for backbone, convs in (("vgg19", 16), ("vgg16", 13)):
        names = layer_names(BACKBONES[backbone].build())
        assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
        assert sum(n.startswith("conv") for n in names) == convs
        assert sum(n.startswith("pool") for n in names) == 5
    assert "conv5_4" in layer_names(BACKBONES["vgg19"].build())
    assert "conv5_4" not in layer_names(BACKBONES["vgg16"].build())


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
    # Random weights under torchvision's name: the hash check would refuse them (its own test is below).
    monkeypatch.setattr("nst_lightning.core.backbones.check_cached_hash", lambda path: None)
    cached = hub_cache_file("vgg19")
    assert cached.name == "vgg19-dcbb9e9d.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(weights_file.read_bytes())
    extractor = FeatureExtractor(["conv1_1"], weights="imagenet")
    expected = torch.load(weights_file, weights_only=True)["features.0.weight"]
    torch.testing.assert_close(extractor.body.conv1_1.weight, expected)


def test_a_cached_file_must_match_the_hash_in_its_name(tmp_path):
    import hashlib

    content = b"some weights"
    prefix = hashlib.sha256(content).hexdigest()[:8]
    good = tmp_path / f"vgg19-{prefix}.pth"
    good.write_bytes(content)
    check_cached_hash(good)  # as torchvision checks a download: the name's prefix of the SHA-256
    bad = tmp_path / "vgg19-dcbb9e9d.pth"
    bad.write_bytes(content)
    with pytest.raises(WeightsError, match=f"SHA-256 starts with {prefix}, not dcbb9e9d"):
        check_cached_hash(bad)
    check_cached_hash(tmp_path / "missing-dcbb9e9d.pth")  # nothing cached: torchvision downloads it


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
    with pytest.raises(WeightsError, match=r"^model.backbone is vgg19 but .*vgg16.pth holds a VGG-16: set"):
        load_backbone("vgg19", str(wrong_arch))
    wrong_shape = dict(vgg19_features_state)
    wrong_shape["0.weight"] = torch.zeros(8, 3, 3, 3)
    torch.save(wrong_shape, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match="holds a VGG-19 whose .*0.weight is 8x3x3x3 where VGG-19 has 64x3x3x3"):
        load_backbone("vgg19", str(tmp_path / "shape.pth"))


def test_weight_files_are_loaded_without_running_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(WeightsError, match="cannot load weights file"):
        load_backbone("vgg19", str(path))


def test_layer_checks_come_from_a_weightless_copy():
    assert backbone_layers("vgg19")[:2] == ("conv1_1", "relu1_1")
    check_layers("vgg16", ["relu4_2", "relu1_1"])
    with pytest.raises(ConfigError, match="unknown layer name.*conv5_4 for vgg16"):
        check_layers("vgg16", ["conv5_4"])
    with pytest.raises(ConfigError, match="unknown backbone 'alexnet'"):
        check_layers("alexnet", ["conv1_1"])
    with pytest.raises(ConfigError, match="no layers requested"):
        check_layers("vgg19", [])
