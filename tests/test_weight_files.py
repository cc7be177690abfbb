"""A weights file explains itself: its backbone is read from its keys and shapes, in every layout a file comes in;
another network, or a backbone the file contradicts, is one line; ``--weights FILE`` alone is enough."""

from __future__ import annotations

import argparse
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

from nst_lightning.cli.early import expand_shorthands
from nst_lightning.cli.parsing import StyleTransferArgumentParser
from nst_lightning.core.backbones import (
    AUTO,
    BACKBONES,
    file_backbone,
    layer_names,
    layouts,
    load_backbone,
    resolve_backbone,
)
from nst_lightning.core.features import FeatureExtractor
from nst_lightning.core.weight_files import recognise
from nst_lightning.errors import ConfigError, WeightsError
from tests.conftest import REPO

TRAINED = REPO.parent / "shared" / "weights" / "vgg16_imagenet_keras.pth"


def random_features(backbone: str) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(backbone, "random").state_dict()


def caffe_names(state: dict[str, torch.Tensor], backbone: str, pattern: str) -> dict[str, torch.Tensor]:
    """``state`` (``features`` keys) under Caffe-style names: ``pattern`` as ``conv{b}_{i}`` or ``block{b}_conv{i}``."""
    with torch.device("meta"):
        names = layer_names(BACKBONES[backbone].build())
    renamed = {}
    for key, value in state.items():
        index, kind = key.split(".")
        block, number = names[int(index)].removeprefix("conv").split("_")
        renamed[f"{pattern.format(b=block, i=number)}.{kind}"] = value
    return renamed


def layouts_of(backbone: str) -> dict[str, dict[str, torch.Tensor]]:
    """The same ``backbone`` weights in every layout a file comes in."""
    bare, head = random_features(backbone), torch.zeros(3)
    return {
        "torchvision": {f"features.{k}": v for k, v in bare.items()} | {"classifier.6.bias": torch.zeros(1000)},
        "features alone": bare,
        "DataParallel": {f"module.features.{k}": v for k, v in bare.items()} | {"module.classifier.0.bias": head},
        "Caffe names": caffe_names(bare, backbone, "conv{b}_{i}") | {"fc6.weight": torch.zeros(4, 4)},
        "Keras names": caffe_names(bare, backbone, "block{b}_conv{i}"),
        "prefixed Caffe names": {f"features.{k}": v for k, v in caffe_names(bare, backbone, "conv{b}_{i}").items()},
    }


@pytest.mark.parametrize("backbone", ["vgg16", "vgg19"])
def test_a_vgg_is_recognised_in_every_layout_as_the_same_weights(backbone):
    bare = random_features(backbone)
    for layout, state in layouts_of(backbone).items():
        found, features = recognise(state, layout, layouts())
        assert found == backbone, layout
        assert features.keys() == bare.keys() and all(torch.equal(features[k], bare[k]) for k in bare), layout


def test_a_file_in_caffe_names_loads_with_backbone_auto(tmp_path):
    bare = random_features("vgg16")
    path = tmp_path / "vgg16_caffe.pth"
    torch.save(caffe_names(bare, "vgg16", "conv{b}_{i}"), path)
    assert file_backbone(path) == resolve_backbone(AUTO, str(path)) == "vgg16"
    extractor = FeatureExtractor(["relu5_3"], weights=str(path))  # backbone: auto
    assert extractor.backbone == "vgg16"
    torch.testing.assert_close(extractor.body.conv5_3.weight, bare["28.weight"])  # conv5_3 is layer 28 of VGG-16


def test_resnet18_is_recognised_too():
    state = random_features("resnet18") | {"fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}
    assert recognise(state, "r18.pth", layouts())[0] == "resnet18"


@pytest.mark.parametrize(
    ("model", "described"),
    [
        (lambda: torchvision.models.resnet50(), "holds a ResNet-50: this tool takes a state dict of a VGG-19, VGG-16"),
        (lambda: torchvision.models.vgg11(), "holds a VGG-11:"),
        (lambda: torchvision.models.vgg16_bn(), r"holds a VGG-16 with batch normalisation \(vgg16_bn\)"),
        (lambda: torchvision.models.alexnet(), "holds an AlexNet:"),
        (lambda: torch.nn.Linear(3, 2), r"holds no convolution weights \(keys such as weight, bias\)"),
    ],
)
def test_another_network_is_refused_in_one_line_saying_what_it_looks_like(model, described):
    with torch.device("meta"):  # shapes are all that recognising a file reads
        state = model().state_dict()
    with pytest.raises(WeightsError, match=described) as refused:
        recognise(state, "other.pth", layouts())
    assert "\n" not in str(refused.value) and "missing" not in str(refused.value).lower()


def test_near_misses_name_the_first_difference():
    bare = random_features("vgg16")
    wrong = caffe_names(bare, "vgg16", "conv{b}_{i}") | {"conv5_3.weight": torch.zeros(8, 512, 3, 3)}
    with pytest.raises(WeightsError, match="a VGG-16 whose .*conv5_3.weight is 8x512x3x3 where VGG-16 has 512x512x3x3"):
        recognise(wrong, "near.pth", layouts())
    tensorflow = {k: v.permute(2, 3, 1, 0) if v.ndim == 4 else v for k, v in bare.items()}
    with pytest.raises(WeightsError, match=r"13 convolutions whose kernels are in TensorFlow's order"):
        recognise(tensorflow, "tf.pth", layouts())


def test_a_backbone_the_file_contradicts_is_one_line_naming_both(tmp_path):
    path = tmp_path / "sixteen.pth"
    torch.save(random_features("vgg16"), path)
    assert resolve_backbone("vgg16", str(path)) == "vgg16"
    both = r"^model.backbone is vgg19 but the weights file .*sixteen.pth holds a VGG-16: set model.backbone to vgg16"
    with pytest.raises(WeightsError, match=both):
        resolve_backbone("vgg19", str(path))
    assert resolve_backbone(AUTO, "imagenet") == resolve_backbone(AUTO, "random") == "vgg19"
    assert resolve_backbone("resnet18", "imagenet") == "resnet18"
    with pytest.raises(ConfigError, match="unknown backbone 'alexnet': choose auto"):
        resolve_backbone("alexnet", "random")


def test_fit_and_batch_take_weights_and_backbone_as_shorthands():
    assert expand_shorthands(["fit", "--weights", "w.pth", "--backbone=vgg16", "--model.weights_x", "1"]) == [
        "fit",
        "--model.weights",
        "w.pth",
        "--model.backbone=vgg16",
        "--model.weights_x",
        "1",
    ]


def test_fit_options_are_never_abbreviated():
    parser = StyleTransferArgumentParser(exit_on_error=False)
    parser.add_argument("--weights_only", type=bool | None, default=None)  # Lightning's, in fit's parser
    with pytest.raises(argparse.ArgumentError, match="nrecognized arguments: --weights"):
        parser.parse_args(["--weights", "w.pth"])  # argparse would take it for --weights_only


@pytest.mark.skipif(not TRAINED.is_file(), reason=f"the trained VGG-16 is not at {TRAINED}")
def test_the_shared_trained_file_is_a_vgg16():
    assert file_backbone(TRAINED) == "vgg16"


# ---------------------------------------------------------------- the real commands, with a VGG-16 file alone


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "vgg16-random.pth"
    torch.save({f"features.{k}": v for k, v in random_features("vgg16").items()}, path)
    return path


def run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / "cli.py"), *args]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)


def saved_model_config(tmp_path: Path) -> dict:
    (config,) = tmp_path.rglob("config.yaml")
    return yaml.safe_load(config.read_text())["model"]


@pytest.mark.slow
def test_fit_with_the_shipped_default_config_and_weights_alone(tmp_path, images, vgg16_file):
    result = run(
        tmp_path,
        "fit",
        "--config",
        "default",
        "--weights",
        str(vgg16_file),
        "--data.content",
        str(images["content"]),
        "--data.style",
        str(images["style"]),
        "--data.image_size",
        "32",
        "--trainer.max_steps",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--output.path",
        "out.png",
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.png").is_file()
    assert saved_model_config(tmp_path)["backbone"] == "vgg16"  # what was built, so a rerun builds it again


@pytest.mark.slow
def test_one_shot_with_a_vgg16_file_and_no_backbone(tmp_path, images, vgg16_file):
    content, style = str(images["content"]), str(images["style"])
    common = [content, style, "--weights", str(vgg16_file), "--size", "32", "--steps", "1"]
    result = run(tmp_path, *common, "--device", "cpu", "-o", "out.png")
    assert result.returncode == 0, result.stderr
    assert saved_model_config(tmp_path)["backbone"] == "vgg16"
    refused = run(tmp_path, *common, "--backbone", "vgg19", "-o", "other.png")
    assert refused.returncode == 1 and not (tmp_path / "other.png").exists()
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.backbone is vgg19 but the weights file" in lines[0], refused.stderr
