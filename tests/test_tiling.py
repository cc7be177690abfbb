"""Tiled evaluation against the whole image's: the same losses and gradient (exact halo), every loss term,
masks and colour modes; the tile plan covers each activation once."""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from nst_lightning.core.features import FeatureExtractor
from nst_lightning.core.inputs import Inputs
from nst_lightning.core.objective import Objective
from nst_lightning.core.tiles import Tiling, exact_halo, layer_reach, plan_tiles, relative_cost, split_points
from nst_lightning.core.tiling import evaluate_tiled
from nst_lightning.errors import ConfigError
from nst_lightning.main import cli_main
from nst_lightning.run import memory, plan
from tests.conftest import write_config

CONTENT, STYLE = ["conv2_2"], ["conv1_1", "conv2_1", "conv3_1"]


def objective(content=CONTENT, style=STYLE, backbone="vgg16", **kwargs) -> Objective:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = FeatureExtractor(content + style, backbone, weights="random", normalize=True)
    return Objective(extractor, content, style, [1.0] * len(style), **kwargs)


def inputs(height=72, width=100, masks=False, styles=1) -> Inputs:
    generator = torch.Generator().manual_seed(0)
    content = torch.rand(1, 3, height, width, generator=generator)
    style_images = [torch.rand(1, 3, 40, 48, generator=generator) for _ in range(styles)]
    regions = None
    if masks:
        left = torch.zeros(1, 1, height, width)
        left[..., : width // 3] = 1
        regions = [left, 1 - left]
    return Inputs(content, style_images, [1.0 / styles] * styles, regions)


def whole_and_tiled(loss: Objective, data: Inputs, tile: int, halo=None, split=None):
    with torch.no_grad():
        loss.set_targets(data)
    start = loss.initial_image(data, "noise", seed=1)
    whole = start.clone().requires_grad_()
    expected = loss(whole)
    expected["total"].backward()
    tiled = start.clone().requires_grad_()
    got = evaluate_tiled(loss, tiled, Tiling(tile, split), lambda t: t.backward(), halo=halo)
    return expected, whole.grad, got, tiled.grad


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings, data, split",
    [
        ({}, {}, None),
        ({}, {}, "pool1"),
        ({}, {}, "pool2"),
        ({"preserve_color": "luminance"}, {}, "pool1"),
        ({}, {"masks": True, "styles": 2}, None),
        ({}, {"masks": True, "styles": 2}, "pool1"),
        ({"preserve_color": "histogram"}, {"masks": True, "styles": 2, "height": 61, "width": 93}, "pool2"),
    ],
)
def test_tiles_with_an_exact_halo_give_the_whole_images_losses_and_gradient(settings, data, split):
    """Every layer over the tiles (split None), or those through a pooling with the rest over the whole map."""
    expected, grad, got, tiled_grad = whole_and_tiled(objective(**settings), inputs(**data), tile=24, split=split)
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=2e-4, atol=1e-6, msg=name)
    torch.testing.assert_close(tiled_grad, grad, rtol=2e-3, atol=1e-6 * float(grad.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("data", [{}, {"masks": True, "styles": 2, "height": 77, "width": 100}])
@pytest.mark.parametrize("split", [None, "pool1"])
def test_the_mean_covariance_loss_through_tiles(data, split):
    """At a layer whose covariance is well conditioned: conv1_1's 64 random filters span 27 dimensions, and a
    region with fewer positions than channels (conv3_1 here) has a singular covariance; there the loss sums
    square roots of near-zero eigenvalues, and in float32 two whole-image evaluations of one image differ
    by 1% (its gradient by far more)."""
    loss = objective(style=["conv2_1"], style_loss="mean_cov", tv_weight=5.0)
    expected, grad, got, tiled_grad = whole_and_tiled(loss, inputs(**data), tile=24, split=split)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value.detach(), rtol=1e-3, atol=1e-6, msg=name)
    torch.testing.assert_close(tiled_grad, grad, rtol=1e-2, atol=1e-3 * float(grad.abs().max()))


def test_a_halo_below_the_receptive_field_is_an_approximation():
    loss = objective()
    halo = exact_halo(layer_reach(loss.extractor.body), list(loss.extractor.layers))
    expected, grad, got, tiled_grad = whole_and_tiled(loss, inputs(), tile=24, halo=0)
    assert halo > 0
    assert not torch.allclose(tiled_grad, grad, rtol=2e-3)
    assert not torch.allclose(got["total"], expected["total"].detach(), rtol=2e-4)


def test_a_halo_off_the_tiled_layers_grid_is_refused():
    # Cores that did not meet on the deepest tiled layer's grid would cover some cells twice and others never.
    with pytest.raises(ValueError, match="multiple of"):
        whole_and_tiled(objective(), inputs(), tile=24, halo=5)


@pytest.mark.slow
def test_the_exact_halo_follows_the_receptive_field_of_a_vgg():
    body = objective(content=["conv4_2"], style=["conv5_1"]).extractor.body
    reach = layer_reach(body)
    assert reach["conv5_1"].jump == 16 and reach["conv5_1"].left == 58 and reach["conv5_1"].right == 73
    assert exact_halo(reach, ["conv4_2", "conv5_1"]) == 64  # max(58, 73 - 16 + 1) = 58, on the 16 px grid


def test_a_residual_backbone_is_refused_by_name():
    with pytest.raises(ValueError, match="tiling needs a VGG"):
        layer_reach(objective(content=["layer2"], style=["layer1"], backbone="resnet18").extractor.body)


@pytest.mark.parametrize("height, width, tile", [(100, 72, 24), (61, 93, 32), (16, 16, 64), (65, 40, 16)])
def test_the_tile_cores_cover_every_pixel_once(height, width, tile):
    tiles = plan_tiles(height, width, tile, halo=8, align=8)
    cover = torch.zeros(height, width, dtype=torch.int64)
    for part in tiles:
        cover[part.core_rows, part.core_cols] += 1
        assert part.rows.start <= part.core_rows.start and part.core_rows.stop <= part.rows.stop
        assert part.rows.start % 8 == 0 and part.cols.start % 8 == 0
    assert bool((cover == 1).all())


@pytest.mark.parametrize("style_loss, masks", [("gram", False), ("gram", True), ("mean_cov", False)])
def test_tiled_targets_equal_the_whole_images(style_loss, masks):
    style = ["conv2_1", "conv3_1"] if style_loss == "mean_cov" else STYLE
    whole, tiled = objective(style=style, style_loss=style_loss), objective(style=style, style_loss=style_loss)
    tiled.tiling = Tiling(24)
    data = inputs(masks=masks, styles=2 if masks else 1)
    style = torch.rand(1, 3, 90, 70, generator=torch.Generator().manual_seed(5))  # larger than a tile
    data = Inputs(data.content, [style] * len(data.styles), data.blend, data.masks)
    with torch.no_grad():
        whole.set_targets(data)
        tiled.set_targets(data)
    expected, got = whole.state_dict(), tiled.state_dict()
    assert set(got) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert tiled.activation_scale[1] == whole.activation_scale[1]
    assert abs(tiled.activation_scale[0] / whole.activation_scale[0] - 1) < 1e-5


def test_the_objective_evaluates_over_tiles_when_it_has_a_tile_size():
    loss = objective(tv_weight=1.0)
    data = inputs()
    with torch.no_grad():
        loss.set_targets(data)
    image = loss.initial_image(data, "noise", seed=2)
    whole = image.clone().requires_grad_()
    expected = loss.evaluate(whole, lambda t: t.backward())
    for split in [None, *split_points(loss.extractor.body, loss.extractor.layers)]:
        loss.tiling = Tiling(32, split)
        tiled = image.clone().requires_grad_()
        got = loss.evaluate(tiled, lambda t: t.backward())
        torch.testing.assert_close(got["total"], expected["total"].detach(), rtol=2e-4, atol=0)
        torch.testing.assert_close(tiled.grad, whole.grad, rtol=2e-3, atol=1e-6 * float(whole.grad.abs().max()))
        # Without gradients (the run record's final losses): the same losses, no second pass, no gradient.
        calls = []
        with torch.no_grad():
            quiet = loss.evaluate(image.clone().requires_grad_(), calls.append)
        assert calls == [] and set(quiet) == set(got)
        for name, value in got.items():
            torch.testing.assert_close(quiet[name], value, rtol=2e-5, atol=1e-7, msg=name)


def test_the_network_splits_after_each_pooling_before_its_deepest_layer():
    body = objective(content=["conv4_2"], style=["relu1_1", "relu5_1"]).extractor.body
    assert split_points(body, ["conv4_2", "relu1_1", "relu5_1"]) == ["pool1", "pool2", "pool3", "pool4"]
    assert split_points(body, ["conv2_1", "relu1_1"]) == ["pool1"]
    assert split_points(body, ["relu1_1"]) == []


def test_tiles_under_bf16_autocast_agree_with_the_whole_image_under_it():
    """Mixed precision: each tile's passes run under the module's autocast (``context``), so the tiled losses and
    gradient are the whole image's bf16 ones (here to 1e-7 and a cosine of 0.999997), not float32's, from which
    bf16 differs by about 4e-3 (cosine 0.999): the tolerances tell the two apart."""
    loss = objective(tv_weight=1.0)
    data = inputs()
    with torch.no_grad():
        loss.set_targets(data)
    image = loss.initial_image(data, "noise", seed=3)

    def bf16():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    whole = image.clone().requires_grad_()
    expected = loss.evaluate(whole, lambda t: t.backward(), context=bf16)
    for split in (None, "pool1"):
        loss.tiling = Tiling(32, split)
        tiled = image.clone().requires_grad_()
        got = loss.evaluate(tiled, lambda t: t.backward(), context=bf16)
        torch.testing.assert_close(got["total"].float(), expected["total"].detach().float(), rtol=1e-4, atol=0)
        cosine = torch.nn.functional.cosine_similarity(tiled.grad.flatten(), whole.grad.flatten(), dim=0)
        assert float(cosine) > 0.9999


class Sizes:
    """The sizes a data module would give (an ImageSource without images)."""

    style_scale, mask_count = 1.0, 0

    def __init__(self, width: int, height: int) -> None:
        self.image_size, self.shape = max(width, height), (width, height)

    def content_size(self, size=None):
        side = size or self.image_size
        return round(self.shape[0] * side / self.image_size), round(self.shape[1] * side / self.image_size)

    def style_sizes(self, size=None, style_scale=None):
        return [self.content_size(size)]


SETTINGS = {
    "content_layers": ["relu4_2"],
    "style_layers": ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"],
    "backbone": "vgg16",
    "pooling": "max",
    "optimizer": "lbfgs",
    "weights": "random",
    "style_loss": "gram",
    "lbfgs_history_size": 5,
    "preserve_color": "none",
}


def test_the_memory_plan_tiles_only_what_does_not_fit_whole():
    extractor = memory._shapes_only(("relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"), "vgg16", "max")
    images, sizes = Sizes(3000, 2250), [512, 1024, 3000]
    whole = memory.estimate_peak(2250, 3000, backbone="vgg16", weights="random", history_size=5)
    budget = whole.total - whole.runtime - 1  # just too little for the whole image
    estimate, tiles, history = plan.plan_run(images, sizes, extractor, SETTINGS, "32-true", "cpu", available=budget)
    assert tiles[:2] == [None, None] and tiles[-1].tile in plan.TILE_SIDES and tiles[-1].tile < 3000
    assert estimate.total - estimate.runtime <= budget < whole.total - whole.runtime and history == 5
    # Just too little for the whole image: the early layers over tiles, the rest whole, at little extra cost.
    cost = relative_cost(extractor, 2250, 3000, tiles[-1])
    assert tiles[-1].split is not None and cost < 1.2
    # Much less memory: a costlier tiling (smaller tiles, or more layers over them); tiles asked for: those, at
    # every scale larger than them.
    _, small, _ = plan.plan_run(images, sizes, extractor, SETTINGS, "32-true", "cpu", available=budget // 3)
    assert relative_cost(extractor, 2250, 3000, small[-1]) > cost
    _, forced, _ = plan.plan_run(images, sizes, extractor, {**SETTINGS, "tile_size": 768}, "32-true", "cpu")
    assert forced[0] is None and forced[1].tile == forced[2].tile == 768
    with pytest.raises(ConfigError, match=r"over 128 px tiles needs about .* try data.image_size"):
        plan.plan_run(images, sizes, extractor, SETTINGS, "32-true", "cpu", available=whole.runtime // 4)


def test_a_smaller_scale_that_does_not_fit_whole_gets_the_cheapest_tiling_that_fits_at_its_own_size():
    extractor = memory._shapes_only(("relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"), "vgg16", "max")
    final = memory.estimate_peak(
        2250, 3000, backbone="vgg16", weights="random", history_size=12, tile=512, split="pool3", previous=(2048, 1536)
    )
    settings = {**SETTINGS, "lbfgs_history_size": 12}
    sizes = [512, 1024, 2048, 3000]
    budget = final.total - final.runtime
    _, tiles, _ = plan.plan_run(Sizes(3000, 2250), sizes, extractor, settings, "32-true", "cpu", available=budget)
    assert tiles[:2] == [None, None] and None not in tiles[2:]
    assert relative_cost(extractor, 1536, 2048, tiles[2]) < relative_cost(extractor, 1536, 2048, tiles[3])


def test_the_cost_of_a_tiling_counts_the_halo_and_the_first_pass_over_the_tiled_layers():
    extractor = memory._shapes_only(("relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"), "vgg16", "max")
    assert relative_cost(extractor, 2250, 3000, None) == 1.0
    # One tile, all layers: a first pass (a third of a whole evaluation) on top of the whole one.
    assert relative_cost(extractor, 2250, 3000, Tiling(4096)) == pytest.approx(4 / 3)
    # The halo: smaller tiles cost more; fewer layers over the tiles cost less.
    costs = [relative_cost(extractor, 2250, 3000, Tiling(side)) for side in (1536, 768, 256)]
    assert 4 / 3 < costs[0] < costs[1] < costs[2]
    splits = [relative_cost(extractor, 2250, 3000, Tiling(768, split)) for split in ("pool1", "pool2", "pool3", None)]
    assert 1 < splits[0] < splits[1] < splits[2] < splits[3] == costs[1]


@pytest.mark.slow
def test_a_tiled_run_through_the_command_line_matches_the_whole_one_and_resumes_exactly(
    tmp_path, images, monkeypatch, capsys
):
    """Forced small tiles (model.tile_size) at 96x72 px, shallow layers so that the halo leaves real tiles: the
    run's image is the untiled run's (to rounding), and 2 + 2 steps resumed end on the bits of 4 in one go."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    model = {"content_layers": ["conv2_2"], "style_layers": ["relu1_1", "relu2_1"]}

    def run(folder: str, *args: str) -> Path:
        (tmp_path / folder).mkdir(exist_ok=True)
        config = write_config(tmp_path / folder, images, model=model, data={"image_size": 96})
        # float32: on a CPU with AMX an unset precision is bf16-mixed, where the two runs' images differed by up to
        # 0.058 after 4 steps (docs/print.md, Exactness); this test is about the tiles, not bfloat16's rounding.
        cli_main(["fit", "--config", str(config), "--trainer.precision", "32-true", *args])
        return sorted((tmp_path / folder / "runs" / "lightning_logs").glob("version_*/checkpoints/*.ckpt"))[-1]

    whole = torch.load(run("whole"), weights_only=True)
    capsys.readouterr()
    tiled = torch.load(run("tiled", "--model.tile_size", "64"), weights_only=True)
    # The plan says what it chose: the tiles, and the layers over them (the rest run whole).
    assert (
        "the network runs over tiles (model.tile_size): 96 px over 64 px tiles through pool1" in capsys.readouterr().err
    )
    assert tiled["hyper_parameters"]["tile_size"] == 64
    # One evaluation agrees to 1e-6 (above); four L-BFGS steps, whose second is sized by the tiny first, grow
    # that rounding to a few thousandths at most.
    torch.testing.assert_close(tiled["state_dict"]["image"], whole["state_dict"]["image"], rtol=0, atol=1e-2)
    half = run("split", "--model.tile_size", "64", "--trainer.max_steps", "2")
    resumed = torch.load(
        run("split", "--model.tile_size", "64", "--ckpt_path", str(half), "--overwrite"), weights_only=True
    )
    assert resumed["global_step"] == tiled["global_step"] == 4
    assert torch.equal(resumed["state_dict"]["image"], tiled["state_dict"]["image"])


def test_where_even_tiles_do_not_fit_the_plan_keeps_fewer_lbfgs_steps_before_it_takes_costly_tiles():
    extractor = memory._shapes_only(("relu4_2", "relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"), "vgg16", "max")
    settings = {**SETTINGS, "lbfgs_history_size": 50}

    def plan_within(tiling: Tiling, history: int):
        small = memory.estimate_peak(
            2250, 3000, backbone="vgg16", weights="random", history_size=history, tile=tiling.tile, split=tiling.split
        )
        budget = small.total - small.runtime
        estimate, tiles, kept = plan.plan_run(
            Sizes(3000, 2250), [3000], extractor, settings, "32-true", "cpu", available=budget
        )
        assert estimate.total - estimate.runtime <= budget
        return tiles[0], kept

    # Where a tiling that costs at most 1.5 times a whole evaluation fits with 12 steps: that, not all 50 steps over
    # costlier tiles.
    cheap = Tiling(768, "pool3")
    tiling, kept = plan_within(cheap, 12)
    assert kept >= 12 and relative_cost(extractor, 2250, 3000, tiling) <= relative_cost(extractor, 2250, 3000, cheap)
    # Where none does, fewer steps (down to 5) and costlier tiles.
    tiling, kept = plan_within(Tiling(128), 12)
    assert plan.MIN_HISTORY <= kept < 12 and relative_cost(extractor, 2250, 3000, tiling) > plan.GOOD_COST


def test_the_run_record_evaluates_the_final_image_over_the_runs_tiles(monkeypatch):
    # A 3000 px print ran its 236 steps over tiles, wrote its image and checkpoint, then died computing the final
    # losses of the whole image at once (1.7 GB for one convolution under ulimit -v 12000000).
    import nst_lightning.core.objective as objective_module
    from nst_lightning import StyleTransfer

    calls = []

    def tiled(objective, image, tiling, backward, halo=None, context=None):
        calls.append((tiling, torch.is_grad_enabled()))
        return {"total": torch.zeros(())}

    monkeypatch.setattr(objective_module, "evaluate_tiled", tiled)
    module = StyleTransfer(weights="random", tile_size=64)
    module.image = torch.nn.Parameter(torch.zeros(1, 3, 8, 8))
    module.objective.tiling = Tiling(64)
    assert module.final_losses()["total"] == 0 and calls == [(Tiling(64), False)]


def test_a_tight_run_hands_freed_memory_back(tmp_path, images, monkeypatch):
    """Under ulimit -v 12000000 the print config's 3000 px scale ran out of address space after 2048 px, and a 3000 px
    run alone at its second iteration: the heap kept for speed (runtime.keep_freed_memory) never shrinks. A run the
    plan tiles hands freed memory back until its end (a batch's next pair may fit); a run that fits whole keeps it."""
    import nst_lightning.run.module as module_file

    calls: list[str] = []
    monkeypatch.setattr(module_file, "return_freed_memory", lambda: calls.append("returned") or True)
    monkeypatch.setattr(module_file, "keep_freed_memory", lambda: calls.append("kept") or True)
    model = {"content_layers": ["conv2_2"], "style_layers": ["relu1_1", "relu2_1"], "scales": [48, 96]}
    model |= {"scale_steps": [2, 2]}
    for folder, tiles in (("whole", []), ("tiled", ["--model.tile_size", "64"])):
        (tmp_path / folder).mkdir()
        config = write_config(tmp_path / folder, images, model=model, data={"image_size": 96})
        calls.clear()
        cli_main(["fit", "--config", str(config), "--trainer.precision", "32-true", "--trainer.max_steps", "4", *tiles])
        assert calls == ([] if folder == "whole" else ["returned", "kept"]), folder  # kept again at its end


def test_a_history_set_below_the_good_floor_still_gets_the_cheapest_tiling_that_fits_with_it():
    cheap, dear = Tiling(1024, "pool2"), Tiling(512, "pool3")
    holds = {cheap: 8, dear: 12}  # the most L-BFGS steps each fits with
    cost = {cheap: 1.1, dear: 1.3}
    chosen = plan._choose(lambda t, steps: steps <= holds[t], [cheap, dear], cost.get, history=8, shrink=True)
    assert chosen == (cheap, 8)


@pytest.mark.slow
def test_batch_and_the_web_app_take_tiles_through_the_same_path(tmp_path, images, monkeypatch, capsys):
    """A batch pair and a web job with model.tile_size run over tiles, as fit does, and end on the untiled image."""
    import numpy as np
    from fastapi.testclient import TestClient
    from PIL import Image

    from nst_lightning.serve.app import create_app
    from tests.test_serve import wait_state

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    model = {"content_layers": ["conv2_2"], "style_layers": ["relu1_1", "relu2_1"]}
    config = write_config(tmp_path, images, model=model, data={"image_size": 96})

    def batch(folder: str, *args: str) -> np.ndarray:
        out = tmp_path / folder
        cli_main(
            [
                "batch",
                "--config",
                str(config),
                "--batch.contents",
                str(images["content"]),
                "--batch.styles",
                str(images["style"]),
                "--batch.output_dir",
                str(out),
                "--trainer.precision",
                "32-true",
                *args,
            ]
        )
        (image,) = out.glob("*.png")
        return np.asarray(Image.open(image), dtype=np.int16)

    whole = batch("whole")
    capsys.readouterr()
    tiled = batch("tiled", "--model.tile_size", "64")
    assert "96 px over 64 px tiles through pool1" in capsys.readouterr().err
    assert np.abs(tiled - whole).max() <= 2, "the tiled pair's image is the whole one's, to rounding"

    data = tmp_path / "data"
    settings = {"data": {"image_size": 96}, "trainer": {"max_steps": 4, "precision": "32-true"}}
    settings["model"] = {**model, "weights": "random", "init": "noise", "tile_size": 64}
    files = [(name, (path.name, path.read_bytes(), "image/png")) for name, path in images.items()]
    with TestClient(create_app(data)) as client:
        created = client.post("/api/jobs", files=files, data={"settings": json.dumps(settings)})
        assert created.status_code == 201, created.text
        done = wait_state(client, created.json()["id"], "done", "failed", "cancelled")
        assert done["state"] == "done", done
        log = (data / "jobs" / done["id"] / "run.log").read_text()
    assert "the network runs over tiles (model.tile_size): 96 px over 64 px tiles through pool1" in log, log
