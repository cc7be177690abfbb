"""Mistakes on the command line are reported before torch and Lightning load (issue 24): through the real entry
point, one line, the exit status, nothing written, and no torch or Lightning in ``python -X importtime``'s list;
the early reading of the settings agrees with the full parse."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from nst_lightning.cli import early
from nst_lightning.cli.fit import StyleTransferCLI
from nst_lightning.errors import NSTError
from tests.conftest import REPO, make_image, write_config

HEAVY = re.compile(r"^import time:.*\|\s*(torch|lightning|PIL)$")


def first_error(folder: Path, *args: str) -> tuple[int, list[str], list[str], list[str]]:
    """``python -X importtime -m nst_lightning ARGS`` in ``folder``: (exit status, stderr's lines other than
    import times, the heavy packages imported, the files in ``folder`` afterwards)."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nst_lightning", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    lines = result.stderr.splitlines()
    said = [line for line in lines if not line.startswith("import time:")]
    heavy = [HEAVY.match(line).group(1) for line in lines if HEAVY.match(line)]
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))
    return result.returncode, said, heavy, files


@pytest.fixture
def work(tmp_path, images) -> Path:
    """A working folder with a content and a style image, a config of the tiny run, a batch folder holding
    one pair's output, and an image where an output is about to go."""
    folder = tmp_path / "work"
    (folder / "batch").mkdir(parents=True)
    for name in ("content", "style"):
        (folder / images[name].name).write_bytes(images[name].read_bytes())
    make_image(folder / "exists.png", 8, 8)
    (folder / "batch" / "content__style.png").write_bytes((folder / "exists.png").read_bytes())
    config = write_config(tmp_path, images, output={"path": str(folder / "exists.png")})
    (folder / "tiny.yaml").write_text(config.read_text())
    relative = yaml.safe_load(config.read_text())
    relative["data"]["style"] = "no_such_style.jpg"  # relative to the config file
    relative["output"]["path"] = str(folder / "new.png")
    (folder / "sub").mkdir()
    (folder / "sub" / "relative.yaml").write_text(yaml.safe_dump(relative))
    return folder


MISTAKES = [
    (["content.png", "style.jpg", "--sise", "32"], 2, "unrecognized arguments: --sise 32"),
    (["content.png", "no_such_style.jpg"], 1, "image not found: {work}/no_such_style.jpg"),
    (["no_such_content.png", "style.jpg"], 1, "image not found: {work}/no_such_content.png"),
    (["content.png", "batch"], 1, "{work}/batch is a folder, not an image file"),
    (["content.png", "style.jpg", "-o", "exists.png"], 1, "output.path exists.png exists: pass --overwrite"),
    (["content.png", "style.jpg", "-o", "content.png", "--overwrite"], 1, "would be the same file as data.content"),
    (["content.png", "style.jpg", "--size", "0"], 1, "--size must be at least 1, got 0"),
    (["content.png", "style.jpg", "--steps", "0"], 1, "--steps must be at least 1, got 0"),
    (["content.png", "style.jpg", "--size", "big"], 2, "argument --size: invalid int value: 'big'"),
    (["fit", "--config", "missing/tiny.yaml"], 2, "--config missing/tiny.yaml: no such file"),
    (["fit", "--config", "no_such_config"], 2, "no such file, nor a shipped config of that name"),
    (["fit", "--config", "tiny.yaml"], 1, "output.path {work}/exists.png exists: pass --overwrite"),
    (["fit", "--config", "sub/relative.yaml"], 1, "image not found: {work}/sub/no_such_style.jpg"),
    (
        ["batch", "--batch.contents", "content.png", "--batch.styles", "style.jpg", "--batch.output_dir", "batch"],
        1,
        "the batch's output batch/content__style.png exists: pass --overwrite to replace them",
    ),
]


@pytest.mark.parametrize(("args", "code", "message"), MISTAKES, ids=[" ".join(m[0]) for m in MISTAKES])
def test_a_mistake_is_one_line_before_torch_loads(work, args, code, message):
    before = sorted(str(path.relative_to(work)) for path in work.rglob("*"))
    status, said, heavy, after = first_error(work, *args)
    assert status == code, said
    assert len(said) == 1 and said[0].startswith("nst-lightning: error: "), said
    assert message.format(work=work) in said[0]
    assert heavy == [], f"{heavy} imported before the error"
    assert after == before, "nothing written"


def settings(*args: str) -> dict:
    return {key: value for key, (value, _) in early.read_settings(list(args)).items()}


def test_the_later_setting_wins_as_in_jsonargparse(tmp_path):
    config = tmp_path / "a.yaml"
    config.write_text(yaml.safe_dump({"output": {"path": "a.png", "overwrite": True}, "data": {"style": ["s.jpg"]}}))
    assert settings("--config", str(config))["output.path"] == "a.png"
    got = settings("--config", str(config), "--output.path=b.png", "--output.overwrite", "false")
    assert got["output.path"] == "b.png" and got["output.overwrite"] is False
    assert settings("--output.path=b.png", f"--config={config}")["output.path"] == "a.png"
    assert settings("--config", "{data: {content: c.png}}", "--data.style", json.dumps(["1.jpg", "2 .jpg"])) == {
        "data.content": "c.png",
        "data.style": ["1.jpg", "2 .jpg"],
    }
    assert settings("--data.content", "0001")["data.content"] == "0001", "a path stays as typed"


@pytest.mark.parametrize(
    "extra", [["--print_config"], ["--help"], ["--model", "model.yaml"], ["--data.content"], ["--ckpt_path", "x.ckpt"]]
)
def test_a_command_line_the_early_reading_does_not_follow_is_left_to_the_full_parse(work, extra):
    # The output exists, but these do not run (or are read by jsonargparse alone): nothing is said early.
    early.check_fit(["--config", str(work / "tiny.yaml"), *extra])


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "tiny.yaml"],
        ["--config", "tiny.yaml", "--data.content", "content.png", "--output.path", "content.png", "--overwrite"],
        ["--config", "sub/relative.yaml"],
        ["--config", "tiny.yaml", "--data.content", "no_such_content.png", "--output.path", "new.png"],
    ],
)
def test_the_early_message_is_the_full_checks_message(work, monkeypatch, args):
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    args = ["--output.overwrite=true" if arg == "--overwrite" else arg for arg in args]  # as cli_main does
    with pytest.raises(NSTError) as early_error:
        early.check_fit(args)
    with pytest.raises(NSTError) as full_error:
        StyleTransferCLI(args=args, run=False)
    assert str(early_error.value) == str(full_error.value)


def test_a_config_of_another_shape_is_left_to_the_full_parse(tmp_path):
    config = tmp_path / "whole.yaml"
    config.write_text(yaml.safe_dump({"fit": {"output": {"path": "x.png"}}}))
    with pytest.raises(early.Unknown):
        early.read_settings(["--config", str(config)])
