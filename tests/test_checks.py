"""Configuration checks, alone (the command line's one-line refusals are in test_cli and test_hostile), and the
one source of each default and name."""

import inspect
from typing import get_args

import pytest
import yaml

from nst_lightning import names
from nst_lightning.core.features import POOLINGS, FeatureExtractor
from nst_lightning.core.targets import STYLE_TARGETS
from nst_lightning.errors import ConfigError
from nst_lightning.run import checks, memory
from nst_lightning.run.module import StyleTransfer
from tests.conftest import REPO

MODEL = {
    "content_layers": list(names.CONTENT_LAYERS),
    "style_layers": list(names.STYLE_LAYERS),
    "style_layer_weights": None,
    "content_weight": 1.0,
    "style_weight": 1e6,
    "tv_weight": 0.0,
    "style_loss": "gram",
    "preserve_color": "none",
    "backbone": "vgg19",
    "init": "content",
    "optimizer": "lbfgs",
    "lr": None,
    "lbfgs_history_size": 50,
    "lbfgs_line_search": "backtrack",
    "scales": None,
    "scale_steps": None,
    "float32_final_steps": 50,
}


def test_the_defaults_pass():
    checks.check_model(**MODEL)
    checks.check_data(style="s.png", image_size=512, style_blend_weights=None, style_scale=1.0, style_masks=None)
    checks.check_output(path="o.png", snapshot_every_n_steps=0, log_image_every_n_steps=10)
    checks.check_guard(stall_steps=50)
    checks.check_batch(contents=None, styles=None, name="{content}__{style}.png", devices=1, num_nodes=1)
    checks.check_schedule(None, None, 512, 300)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"content_layers": [], "style_layers": []}, "no content_layers and no style_layers"),
        ({"backbone": "alexnet"}, "unknown backbone 'alexnet'"),
        ({"style_layers": ["relu9_9"]}, "unknown layer name(s) relu9_9 for vgg19"),
        ({"style_layer_weights": [1.0]}, "one weight per style layer"),
        ({"tv_weight": float("inf")}, "model.tv_weight must be a finite number >= 0"),
        ({"content_weight": 0.0, "style_weight": 0.0}, "both 0"),
        ({"preserve_color": "sepia"}, "choose none, luminance or histogram"),
        ({"init": "/no/such/start.png"}, "neither content, style, noise nor an existing image file"),
        ({"optimizer": "sgd"}, "choose lbfgs or adam"),
        ({"lbfgs_history_size": 0}, "at least 1"),
        ({"lbfgs_line_search": "wolfe"}, "choose backtrack or strong_wolfe"),
        ({"float32_final_steps": -1}, "0 or more"),
        ({"scales": [32, 16], "scale_steps": [1, 1]}, "ascending"),
        ({"scales": [16, 32], "scale_steps": [0, 1]}, "at least 1 each"),
    ],
)
def test_model_settings_that_cannot_work(override, message):
    with pytest.raises(ConfigError) as err:
        checks.check_model(**{**MODEL, **override})
    assert message in str(err.value)


def test_the_schedule_must_fit_the_run():
    with pytest.raises(ConfigError, match="make the last scale 64"):
        checks.check_schedule([16, 32], [1, 1], 64, 10)
    with pytest.raises(ConfigError, match="set --trainer.max_steps 5"):
        checks.check_schedule([16, 32], [2, 3], 32, 4)


@pytest.mark.parametrize(
    "override, message",
    [
        ({"style": []}, "data.style is empty"),
        ({"image_size": 0}, "data.image_size must be a positive"),
        ({"style_scale": float("nan")}, "data.style_scale must be a positive"),
        ({"style_blend_weights": [1.0, 1.0]}, "one weight per style"),
        ({"style_masks": ["a.png", "b.png"]}, "one mask per style"),
    ],
)
def test_data_settings_that_cannot_work(override, message):
    data = {"style": "s.png", "image_size": 64, "style_blend_weights": None, "style_scale": 1.0, "style_masks": None}
    with pytest.raises(ConfigError, match=message):
        checks.check_data(**{**data, **override})


def test_trainer_and_batch_settings_that_cannot_work():
    for steps in (None, 0, -1):
        with pytest.raises(ConfigError, match="trainer.max_steps must be at least 1"):
            checks.check_max_steps(steps)
    with pytest.raises(ConfigError, match="batch.name '{x}.png' is not a valid pattern"):
        checks.check_batch(contents=None, styles=None, name="{x}.png", devices=1, num_nodes=1)
    with pytest.raises(ConfigError, match="batch.num_nodes must be at least 1"):
        checks.check_batch(contents=None, styles=None, name="{n}.png", devices=1, num_nodes=0)


def test_each_default_and_name_has_one_source():
    signature = inspect.signature(StyleTransfer).parameters
    assert signature["content_layers"].default is names.CONTENT_LAYERS
    assert signature["style_layers"].default is names.STYLE_LAYERS
    assert signature["lbfgs_history_size"].default == names.LBFGS_HISTORY_SIZE
    estimate = inspect.signature(memory.estimate_peak).parameters
    assert estimate["content_layers"].default is names.CONTENT_LAYERS
    assert estimate["history_size"].default == names.LBFGS_HISTORY_SIZE
    assert set(STYLE_TARGETS) == set(get_args(names.StyleLoss))
    assert POOLINGS == ("max", "avg") and inspect.signature(FeatureExtractor).parameters["pooling"].default in POOLINGS
    # configs/default.yaml spells the seed's layers out for its readers: it must say what the module does.
    default = yaml.safe_load((REPO / "configs" / "default.yaml").read_text())["model"]
    assert default["content_layers"] == list(names.CONTENT_LAYERS)
    assert default["style_layers"] == list(names.STYLE_LAYERS)
