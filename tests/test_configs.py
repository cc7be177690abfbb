"""Configs that work from any folder (issue 15): shipped configs by name and their list, paths inside a config
relative to it, outputs relative to the working folder, and the packaging that ships them."""

from __future__ import annotations

import sys

import pytest
import tomllib
import yaml
from PIL import Image

from nst_lightning.cli import configs
from nst_lightning.main import cli_main
from tests.conftest import REPO, make_image

SMALL = [
    "--model.weights",
    "random",
    "--data.image_size",
    "32",
    "--trainer.max_steps",
    "1",
    "--trainer.accelerator",
    "cpu",
    "--trainer.enable_progress_bar",
    "false",
]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def test_shipped_configs_run_by_name_from_any_folder_and_record_absolute_paths(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", "default", "--config", "quick.yaml", *SMALL])
    assert max(Image.open(tmp_path / "outputs" / "quick.png").size) == 32, "output.path: the working folder"
    saved = tmp_path / "lightning_logs" / "version_0" / "config.yaml"
    data = yaml.safe_load(saved.read_text())["data"]
    assert data["content"] == str(REPO / "configs" / "../nst_lightning/samples/content_tubingen.jpg")
    # The run's config.yaml reruns from anywhere: its paths are absolute.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cli_main(["fit", "--config", str(saved), "--trainer.max_steps", "1"])
    assert (elsewhere / "outputs" / "quick.png").is_file()
    assert "done: outputs/quick.png" in capsys.readouterr().out


def test_paths_in_a_config_are_relative_to_it_and_outputs_to_the_working_folder(tmp_path, monkeypatch):
    (tmp_path / "project" / "images").mkdir(parents=True)
    make_image(tmp_path / "project" / "images" / "c.png", 40, 30, seed=1)
    make_image(tmp_path / "project" / "images" / "s.png", 32, 32, seed=2)
    config = tmp_path / "project" / "conf" / "mine.yaml"
    config.parent.mkdir()
    config.write_text("data:\n  content: ../images/c.png\n  style: [../images/s.png]\noutput:\n  path: out/x.png\n")
    monkeypatch.chdir(tmp_path)
    cli_main(["fit", "--config", str(config), *SMALL])
    assert (tmp_path / "out" / "x.png").is_file()
    # On the command line, paths are relative to the working folder.
    monkeypatch.chdir(tmp_path / "project")
    cli_main(["fit", "--config", str(config), "--data.content", "images/s.png", *SMALL])
    assert (tmp_path / "project" / "out" / "x.png").is_file()


def test_nst_lightning_configs_lists_every_shipped_config_with_one_line(capsys):
    cli_main(["configs"])
    out = capsys.readouterr().out
    names = sorted(path.stem for path in (REPO / "configs").glob("*.yaml"))
    for name in names:
        line = next((line for line in out.splitlines() if line.split()[:1] == [name]), None)
        assert line is not None, name
        assert len(line.split(None, 1)[1]) > 20, f"{name} needs a one-line description as its first comment"
    assert sorted(configs.shipped_configs()) == names


def test_an_unknown_config_name_is_one_line_naming_the_shipped_ones(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", "defualt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--config defualt: no such file" in err and "default, " in err


def test_a_file_in_the_working_folder_comes_before_a_shipped_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "quick").write_text("trainer:\n  max_steps: 11\n")
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", "default", "--config", "quick", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["max_steps"] == 11


def test_quick_does_not_force_the_cpu(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", "default", "--config", "quick", "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out)["trainer"]["accelerator"] == "auto"


def test_the_wheel_ships_the_configs_beside_the_package_where_their_paths_hold():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    tool = project["tool"]["setuptools"]
    assert tool["package-dir"]["nst_lightning_configs"] == "configs"
    assert "nst_lightning_configs" in tool["packages"] and tool["package-data"]["nst_lightning_configs"] == ["*.yaml"]
    # Installed, the folder sits beside nst_lightning as configs/ does in the checkout: the same relative paths.
    for path in (REPO / "configs").glob("*.yaml"):
        for line in path.read_text().splitlines():
            if "nst_lightning/samples/" in line and not line.lstrip().startswith("#"):
                relative = line.split(":", 1)[-1].strip().removeprefix("- ")
                assert relative.startswith("../nst_lightning/samples/"), (path.name, line)
                assert (path.parent / relative).is_file(), (path.name, relative)
    assert project["project"]["license"] == "MIT" and (REPO / "LICENSE").is_file()
    assert "version" in project["project"]["dynamic"]
