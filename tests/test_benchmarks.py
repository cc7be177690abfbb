"""The benchmark scripts' own logic, in miniature (their figures come from running them in full)."""

import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import proxy_weights  # noqa: E402
import time_to_quality  # noqa: E402


def test_proxy_weights_give_every_convolution_unit_mean_square(tmp_path):
    from torch import nn
    from torchvision.models import vgg19

    image = torch.rand(1, 3, 40, 48)
    path = proxy_weights.write_scaled_random_vgg19(image, tmp_path / "proxy.pth")
    model = vgg19(weights=None)
    model.load_state_dict(torch.load(path, weights_only=True))
    mean = torch.tensor(proxy_weights.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(proxy_weights.IMAGENET_STD).view(1, 3, 1, 1)
    x, squares = (image - mean) / std, []
    with torch.no_grad():
        for layer in model.features:
            x = layer(x)
            if isinstance(layer, nn.Conv2d):
                squares.append(float(x.pow(2).mean()))
    assert len(squares) == 16
    assert squares == pytest.approx([1.0] * 16, rel=1e-3)


def test_schedules_parse():
    assert time_to_quality.parse_schedule("128:100,256:50") == ([128, 256], [100, 50])


def test_time_to_quality_compares_schedules_in_miniature():
    results = time_to_quality.compare(64, ["32:2,64:2"], baseline_steps=3, log=lambda text: None)
    single, multi = results["runs"]["single"], results["runs"]["32:2,64:2"]
    assert len(single["steps"]) == 3 and [side for _, _, side in multi["steps"]] == [32, 32, 64, 64]
    assert single["final_loss"] > 0 and multi["final_loss"] > 0
    table = time_to_quality.table(results)
    assert "single scale, 3 its" in table and "32:2,64:2" in table


def test_runs_at_another_precision_are_judged_by_the_float32_loss():
    assert time_to_quality.parse_run("256:100,512:150@bf16-mixed") == ("256:100,512:150", "bf16-mixed")
    assert time_to_quality.parse_run("single") == ("single", "32-true")
    results = time_to_quality.compare(48, ["single@bf16-mixed"], baseline_steps=3, log=lambda text: None)
    single, mixed = results["runs"]["single"], results["runs"]["single@bf16-mixed"]
    assert mixed["precision"] == "bf16-mixed" and len(mixed["steps"]) == 3
    # Both start from the content image: the first recorded loss is the same float32 loss.
    assert mixed["steps"][0][1] == pytest.approx(single["steps"][0][1], rel=1e-5)
    assert "single scale, 3 its @ bf16-mixed" in time_to_quality.table(results)
