"""The benchmark scripts' own logic, in miniature (their figures come from running them in full)."""

import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))

import proxy_weights  # noqa: E402
import time_to_quality  # noqa: E402


@pytest.mark.slow
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


def test_stages_parse():
    stage = time_to_quality.parse_stage("256:150:content_weight=3;lbfgs_line_search=null;scales=[128, 256]")
    assert (stage.size, stage.steps) == (256, 150)
    assert stage.model == {"content_weight": 3.0, "lbfgs_line_search": None, "scales": [128, 256]}
    assert time_to_quality.parse_stage("512:300").model == {}


def test_time_to_quality_judges_every_run_by_the_final_size_objective_in_miniature(tmp_path):
    from pathlib import Path

    ttq = time_to_quality
    base = {"weights": "random"}
    per_eval = ttq.evaluation_seconds(base, [32, 48], ttq.CONTENT, ttq.STYLE, rounds=1)
    assert set(per_eval) == {32, 48} and all(t > 0 for t in per_eval.values())
    runs = [
        ttq.run_stages("seed", [ttq.Stage(48, 4)], base, 48, ttq.CONTENT, ttq.STYLE, per_eval, tmp_path, print),
        ttq.run_stages(
            "coarse",
            [ttq.Stage(32, 2, {"content_weight": 3.0}), ttq.Stage(48, 2)],
            base,
            48,
            ttq.CONTENT,
            ttq.STYLE,
            per_eval,
            tmp_path,
            print,
        ),
    ]
    seed, coarse = runs
    assert [step[3] for step in coarse["steps"]] == [32, 32, 48, 48]
    # Coarse steps are not judged; every step at the final size is, the last with the final image.
    assert [step[4] is None for step in coarse["steps"]] == [True, True, False, False]
    assert all(step[4] is not None for step in seed["steps"])
    assert seed["steps"][-1][4] == seed["final_loss"]
    evaluations = [step[2] for step in seed["steps"]]
    assert evaluations == sorted(evaluations) and seed["steps"][-1][1] == pytest.approx(evaluations[-1] * per_eval[48])
    ttq.summarise(runs)
    # Reached when the result first had its final loss (a last step undone by DeviceLBFGS leaves it unchanged).
    reached = next(step[1] for step in seed["steps"] if step[4] == seed["final_loss"])
    assert seed["reached"]["0%"]["modelled"] == reached
    text = ttq.table(runs, 48, "random", per_eval)
    assert "| seed |" in text and "| coarse |" in text
    ttq.sheet(runs, Path(tmp_path) / "sheet.png")
    assert (Path(tmp_path) / "sheet.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args, expected",
    [
        ("floor.py", ["--size", "48", "--repeats", "1"], "faster layout"),
        ("reference.py", ["--size", "48", "--steps", "1"], "s per iteration, loss"),
        (
            "speed.py",
            [
                "--sizes",
                "48",
                "--repeats",
                "1",
                "--steps",
                "1",
                "--compile",
                "off",
                "--whole-run",
                "off",
                "--wait-quiet",
                "0",
                "--precision",
                "32-true",
            ],
            "relative difference 0.0e+00",
        ),
        ("memory_check.py", ["--memory-child", "48", "2", "2"], '"estimate_mib"'),
        ("memory_check.py", ["--wide-style-child", "64", "2"], '"content_only_estimate_mib"'),
        ("gpu_precision.py", [], "skipped: no CUDA device"),
        (
            "gpu.py",
            ["--weights", "random", "--sizes", "32", "--steps", "2", "--floor-repeats", "1"],
            "| 32 (24x32) | tutorial loop | 32-true |",
        ),
        ("logging_overhead.py", ["--size", "32", "--steps", "2", "--repeats", "1"], "logging overhead:"),
        ("print_sizes.py", ["--available", "4", "--sizes", "512"], "| 4 GiB | 512 px |"),
        (
            "allocator.py",
            [
                "--size",
                "64",
                "--tile",
                "32",
                "--split",
                "pool1",
                "--rounds",
                "1",
                "--repeats",
                "1",
                "--weights",
                "random",
            ],
            "returned / kept:",
        ),
    ],
)
def test_each_benchmark_runs_alone_in_miniature(script, args, expected):
    import os
    import subprocess

    if script == "gpu_precision.py" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the section would run in full")
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True, timeout=600, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert expected in result.stdout, result.stdout[-3000:]


def test_reference_implementation_computes_the_same_loss(tmp_path, images):
    # benchmarks/reference.py is the yardstick of the benchmark: it must minimise the same function.
    import warnings

    from reference import Reference

    from nst_lightning.core.backbones import load_backbone
    from tests.conftest import datamodule, make_module, make_trainer

    module = make_module(init="content", normalize=False)  # the tutorial's network is not normalised
    dm = datamodule(images, size=48)  # the reference runs the whole VGG-19: pool5 needs 32 px
    make_trainer(tmp_path, steps=0).fit(module, datamodule=dm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = Reference(load_backbone("vgg19", "random"), dm.content_image, dm.inputs().styles[0])
    torch.testing.assert_close(float(ref.loss()), float(module(module.image.detach())["total"]), rtol=1e-4, atol=0)
    ref.step()
    assert ref.evaluations == 1


def test_remodel_recomputes_modelled_time_from_evaluation_counts():
    runs = [{"steps": [(1.0, 9.0, 2, 32, None), (2.0, 9.0, 3, 32, None), (3.0, 9.0, 5, 48, 1.5)]}]
    time_to_quality.remodel(runs, {32: 0.5, 48: 2.0})
    assert [step[1] for step in runs[0]["steps"]] == [1.0, 1.5, 5.5]
    assert runs[0]["steps"][-1][4] == 1.5


def test_floor_runs_on_its_own_device_wherever_the_extractor_is():
    # bench.py --device cuda hands the floor the project's extractor, which Lightning has moved back to the
    # CPU after its fit: every tensor the floor computes with (13 convolutions up to relu5_1, 2 layouts) must be on
    # the floor's device ("meta" here).
    import warnings

    from floor import Floor

    from nst_lightning import names
    from nst_lightning.core.features import FeatureExtractor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = FeatureExtractor([*names.CONTENT_LAYERS, *names.STYLE_LAYERS], weights="random")
    floor = Floor(extractor, 40, 48, "meta", "bf16-mixed")
    tensors = [t for convs in floor.layouts.values() for conv in convs for t in conv[:4]]
    assert len(tensors) == 2 * 4 * 13 and {t.device.type for t in tensors} == {"meta"}
    assert {t.dtype for t in tensors} == {torch.bfloat16}
    assert next(extractor.parameters()).device.type == "cpu"  # the extractor itself is left where it was
    floor.run(1)
