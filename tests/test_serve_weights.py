"""The web app offers only the weights it can load, each with the backbones it loads with, and refuses a
backbone that does not go with the chosen weights (a 422 naming the key, no command-line flag in it)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the web app's tests need its extra: pip install -e '.[web]'")
pytest.importorskip("multipart", reason="the web app's tests need python-multipart: pip install -e '.[web]'")

with warnings.catch_warnings():  # Starlette 1.x: httpx in its test client is deprecated (for httpx2)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from nst_lightning.core.backbones import check_cached_hash, load_backbone  # noqa: E402
from nst_lightning.serve.app import create_app  # noqa: E402
from tests.conftest import make_image  # noqa: E402

TINY = {"data": {"image_size": 32}, "trainer": {"max_steps": 1}, "model": {"init": "noise"}}


@pytest.fixture
def server(tmp_path: Path, monkeypatch) -> dict:
    """A data folder whose weights folder holds a VGG-16 file and a file that is no backbone; an empty hub cache."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    weights = tmp_path / "weights"
    weights.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(load_backbone("vgg16", "random").state_dict(), weights / "sixteen.pth")
    torch.save(torch.nn.Linear(3, 2).state_dict(), weights / "linear.pth")
    (weights / "notes.txt").write_text("not weights")
    content = make_image(tmp_path / "c.png", 40, 30, seed=1).read_bytes()
    style = make_image(tmp_path / "s.png", 32, 32, seed=2).read_bytes()
    return {"data": tmp_path / "data", "weights": weights, "hub": tmp_path / "hub", "images": (content, style)}


def post(client: TestClient, server: dict, settings: dict):
    content, style = server["images"]
    files = [("content", ("c.png", content, "image/png")), ("style", ("s.png", style, "image/png"))]
    return client.post("/api/jobs", files=files, data={"settings": json.dumps(settings)})


def test_offline_only_loadable_weights_are_offered_with_their_backbone(server):
    app = create_app(server["data"], weights_dir=server["weights"])
    with TestClient(app) as client:
        options = client.get("/api/options").json()
    assert options["weights"] == ["sixteen.pth", "random"], "no imagenet without its download; random last"
    assert options["weights_backbones"]["sixteen.pth"] == ["vgg16"]
    assert options["weights_backbones"]["random"][0] == "vgg19"
    (warning,) = app.state.weights_warnings  # the file left out, by its name
    assert "linear.pth holds no convolution weights" in warning and str(server["weights"]) not in warning


def test_imagenet_is_offered_for_the_backbones_whose_download_is_cached_and_whole(server, monkeypatch):
    cached = server["hub"] / "checkpoints"
    cached.mkdir(parents=True)
    (cached / "vgg19-dcbb9e9d.pth").write_bytes(b"")
    (cached / "vgg16-397923af.pth").write_bytes(b"a damaged download")
    monkeypatch.setattr(
        "nst_lightning.core.backbones.check_cached_hash",
        lambda path: None if path.name.startswith("vgg19") else check_cached_hash(path),
    )  # the empty file stands in for the download; the other is checked as it would be
    app = create_app(server["data"], weights_dir=server["weights"])
    with TestClient(app) as client:
        options = client.get("/api/options").json()
    assert options["weights"][0] == "imagenet" and options["weights_backbones"]["imagenet"] == ["vgg19"]
    assert any("vgg16-397923af.pth are not torchvision's" in line for line in app.state.weights_warnings)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "key", "message"),
    [
        (
            {"weights": "sixteen.pth", "backbone": "vgg19"},
            "model.backbone",
            "'vgg19' does not go with the weights sixteen.pth: choose vgg16",
        ),
        ({"weights": "random", "backbone": "alexnet"}, "model.backbone", "choose vgg19 or vgg16 or resnet18"),
        ({}, "model.weights", "is not offered here: choose sixteen.pth, random"),
        ({"weights": "linear.pth"}, "model.weights", "not offered here"),
    ],
)
def test_weights_and_backbone_that_cannot_go_together_are_a_422(server, model, key, message):
    with TestClient(create_app(server["data"], weights_dir=server["weights"])) as client:
        response = post(client, server, {**TINY, "model": {**TINY["model"], **model}})
        assert response.status_code == 422, response.text
        assert response.json()["key"] == key and message in response.json()["detail"]
        assert "--" not in response.json()["detail"], "a web page names settings, not command-line flags"
        assert client.get("/api/jobs").json() == []


def test_a_file_alone_picks_its_backbone(server):
    with TestClient(create_app(server["data"], weights_dir=server["weights"])) as client:
        response = post(client, server, {**TINY, "model": {**TINY["model"], "weights": "sixteen.pth"}})
        assert response.status_code == 201, response.text
        shown = client.get(f"/api/jobs/{response.json()['id']}").json()["settings"]
    assert shown["model.weights"] == "sixteen.pth" and shown["model.backbone"] == "vgg16"
