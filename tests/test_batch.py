"""``python cli.py batch``: many pairs, one output and one TensorBoard run each, failures isolated,
sharding over processes (tiny images, random weights, 2 steps)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from nst_lightning.batch.pairs import BatchSettings, expand, make_pairs
from nst_lightning.errors import ConfigError, ImageError, Interrupted
from nst_lightning.io.files import find_images
from nst_lightning.main import cli_main
from tests.conftest import REPO, make_image, write_config


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch):
    # cli_main(args) stands for the command line: pytest's own arguments must not leak into it.
    monkeypatch.setattr(sys, "argv", ["cli.py"])


@pytest.fixture
def pairs_setup(tmp_path, images):
    """Two content and two style images, and a tiny config (2 steps) whose root is tmp_path/runs."""
    folder = tmp_path / "in"
    folder.mkdir()
    files = {
        "c1": make_image(folder / "c1.png", 40, 30, seed=1),
        "c2": make_image(folder / "c2.jpg", 32, 32, seed=3),
        "s1": make_image(folder / "s1.png", 32, 32, seed=2),
        "s2": make_image(folder / "s2.jpg", 32, 32, seed=4),
    }
    config = write_config(tmp_path, images, trainer={"max_steps": 2})
    return files, config


def batch_args(config: Path, tmp_path: Path, contents: list, styles: list, *extra: str) -> list[str]:
    return [
        "--config",
        str(config),
        "--batch.contents",
        "[" + ",".join(str(c) for c in contents) + "]",
        "--batch.styles",
        "[" + ",".join(str(s) for s in styles) + "]",
        "--batch.output_dir",
        str(tmp_path / "batch_out"),
        *extra,
    ]


def run_batch(*args: str) -> int:
    try:
        cli_main(["batch", *args])
    except SystemExit as exit_info:
        return exit_info.code
    return 0


def runs_dir(tmp_path: Path) -> Path:
    return tmp_path / "runs" / "lightning_logs" / "batch"


def loss_steps(run: Path) -> list[int]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [event.step for event in acc.Scalars("loss")]


# ---------------------------------------------------------------- expansion and pairing


def test_files_folders_and_globs_expand_to_sorted_image_files(tmp_path):
    for name in ("b.png", "a.JPG", "c.webp"):
        make_image(tmp_path / name, 8, 8)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub").mkdir()
    make_image(tmp_path / "sub" / "d.png", 8, 8)

    assert find_images(tmp_path) == [tmp_path / n for n in ("a.JPG", "b.png", "c.webp")]  # not sub/, not .txt
    assert find_images(str(tmp_path / "*.png")) == [tmp_path / "b.png"]
    assert find_images(str(tmp_path / "**" / "*.png")) == [tmp_path / "b.png", tmp_path / "sub" / "d.png"]
    assert find_images(str(tmp_path / "*")) == [tmp_path / n for n in ("a.JPG", "b.png", "c.webp")]
    assert find_images(tmp_path / "notes.txt") == [tmp_path / "notes.txt"]  # a file named directly is taken
    # A list: in order, each file once.
    listed = expand([str(tmp_path / "c.webp"), str(tmp_path), str(tmp_path / "sub/*")], "batch.contents")
    assert listed == [tmp_path / n for n in ("c.webp", "a.JPG", "b.png", "sub/d.png")]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("missing.png", "missing.png not found"),
        ("*.gif", "nothing matches"),
        ("*.txt", "none is an image file"),
        ("empty", "holds no image files"),
    ],
)
def test_nothing_found_is_an_error_naming_the_key(tmp_path, entry, message):
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageError, match=message) as info:
        expand([str(tmp_path / entry)], "batch.styles")
    assert str(info.value).startswith("batch.styles: ")


def test_pairs_are_every_content_with_every_style_in_order(tmp_path):
    contents, styles = [Path("a/x.png"), Path("b/y.jpg")], [Path("s1.png"), Path("s2.png")]
    pairs = make_pairs(contents, styles, tmp_path, "{style}/{n:02d}_{content}.jpg")
    assert [(p.n, p.content.stem, p.style.stem) for p in pairs] == [
        (1, "x", "s1"),
        (2, "x", "s2"),
        (3, "y", "s1"),
        (4, "y", "s2"),
    ]
    assert pairs[1].output == tmp_path / "s2" / "02_x.jpg" and pairs[1].run == "s2/02_x"
    with pytest.raises(ConfigError, match=r"would both write .*add \{n\}"):
        make_pairs([Path("a/x.png"), Path("b/x.png")], styles, tmp_path, "{content}__{style}.png")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"devices": 0}, "batch.devices must be at least 1"),
        ({"num_nodes": 0}, "batch.num_nodes must be at least 1"),
        ({"name": "{content}_{painting}.png"}, "not a valid pattern"),
        ({"name": "{content}.txt"}, "image extension"),
        ({"name": "/abs/{content}.png"}, "inside batch.output_dir"),
        ({"contents": []}, "batch.contents is an empty list"),
    ],
)
def test_bad_settings(kwargs, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        BatchSettings(**kwargs)


# ---------------------------------------------------------------- runs


@pytest.mark.slow
def test_each_pair_gets_its_output_and_its_tensorboard_run(tmp_path, pairs_setup, capsys):
    files, config = pairs_setup
    status = run_batch(*batch_args(config, tmp_path, [files["c1"], files["c2"]], [files["s1"], files["s2"]]))
    assert status == 0
    out = tmp_path / "batch_out"
    names = ["c1__s1", "c1__s2", "c2__s1", "c2__s2"]
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.png" for n in names]
    assert Image.open(out / "c1__s2.png").size == (32, 24)
    assert Image.open(out / "c2__s1.png").size == (32, 32)
    for name in names:
        run = runs_dir(tmp_path) / name / "version_0"
        assert loss_steps(run) == [0, 1], name  # its own run: 2 steps, not 8
        assert sorted(p.name for p in (run / "snapshots").iterdir()) == ["step_000002.png"]
        saved = (run / "config.yaml").read_text()
        content, style = name.split("__")
        assert f"content: {files[content]}" in saved and f"style: {files[style]}" in saved
    assert not list(runs_dir(tmp_path).glob("*/version_0/checkpoints")), "no checkpoints in a batch by default"
    captured = capsys.readouterr()
    assert "batch: 4 of 4 pairs done, 0 failed" in captured.out
    for name in names:
        assert re.search(rf"done +\d  .* -> .*{name}\.png", captured.out), name
    assert "Traceback" not in captured.err

    # A run's config.yaml reruns exactly that pair (over its image, which is there: --overwrite).
    assert run_batch("--config", str(runs_dir(tmp_path) / "c2__s1" / "version_0" / "config.yaml"), "--overwrite") == 0
    assert "batch: 1 of 1 pairs done" in capsys.readouterr().out
    assert loss_steps(runs_dir(tmp_path) / "c2__s1" / "version_1") == [0, 1]
    assert not (runs_dir(tmp_path) / "c1__s1" / "version_1").exists()


def test_a_failing_pair_is_reported_and_skipped(tmp_path, pairs_setup, capsys):
    files, config = pairs_setup
    broken = tmp_path / "in" / "broken.png"
    broken.write_text("not an image")
    contents = [broken, files["c1"]]
    status = run_batch(*batch_args(config, tmp_path, contents, [files["s1"]], "--batch.progress_bar", "true"))
    assert status == 1, "a failed pair makes the exit status non-zero"
    assert (tmp_path / "batch_out" / "c1__s1.png").is_file(), "the pair after the failure still ran"
    assert not (tmp_path / "batch_out" / "broken__s1.png").exists()
    captured = capsys.readouterr()
    failures = [line for line in captured.err.splitlines() if "failed:" in line]
    assert len(failures) == 1 and failures[0].startswith("nst-lightning: pair 1/2 (")
    assert "broken.png" in failures[0] and "not an image" in failures[0]
    assert "Traceback" not in captured.err
    assert "2/2" in captured.err, "the progress bar over pairs"
    assert "batch: 1 of 2 pairs done, 1 failed" in captured.out
    assert re.search(r"FAILED +1  .*broken\.png x .*s1\.png: .*not an image", captured.out)

    # skip_existing: the pair whose output exists is left out, and nothing fails.
    written = (tmp_path / "batch_out" / "c1__s1.png").stat().st_mtime_ns
    args = batch_args(config, tmp_path, [files["c1"]], [files["s1"]], "--batch.skip_existing", "true")
    assert run_batch(*args) == 0
    assert "batch: 0 of 1 pairs done, 0 failed, 1 skipped" in capsys.readouterr().out
    assert (tmp_path / "batch_out" / "c1__s1.png").stat().st_mtime_ns == written


def test_unexpected_errors_are_isolated_and_ctrl_c_stops_the_batch(tmp_path, pairs_setup, capsys, monkeypatch):
    files, config = pairs_setup
    calls = []

    def fake_fit_pair(runner, pair, placement):
        calls.append(pair.n)
        if pair.n == 1:
            raise RuntimeError("boom")
        if pair.n == 3:
            raise KeyboardInterrupt
        return True, ""

    monkeypatch.setattr("nst_lightning.batch.runs.fit_pair", fake_fit_pair)
    assert run_batch(*batch_args(config, tmp_path, [files["c1"], files["c2"]], [files["s1"], files["s2"]])) == 130
    assert calls == [1, 2, 3], "the batch went on after the error and stopped at Ctrl-C"
    captured = capsys.readouterr()
    assert "pair 1/4 (" in captured.err and "failed: RuntimeError: boom" in captured.err
    assert "Traceback" in captured.err, "an unexpected error keeps its traceback"
    # Every pair counts: the fourth, never started, too (issue 24 item 8).
    assert "batch: 1 of 4 pairs done, 1 failed, 1 interrupted, 1 not started" in captured.out
    assert "INTERRUPTED" in captured.out
    assert "nst-lightning: interrupted: Ctrl-C: the batch stopped" in captured.err


def _expect_one_line_error(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["batch", *args])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "usage:" not in err
    lines = [line for line in err.splitlines() if line.startswith("nst-lightning: error:")]
    # jsonargparse's own messages changed case over its versions ("Unrecognized arguments").
    assert len(lines) == 1 and message.lower() in lines[0].lower(), err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch.contents", "{dir}/nothing/*.png"], "batch.contents: nothing matches"),
        (["--batch.unknown", "1"], "unrecognized arguments: --batch.unknown"),
        (["--batch.name", "{{content}}.txt"], "image extension"),
        (["--batch.devices", "two"], "batch.devices"),
        (["--trainer.devices", "2"], "use batch.devices"),
        (["--model.content_layers", "[conv4_9]"], "unknown layer name"),
        (["--batch.output_dir", "/proc/forbidden"], "cannot write"),
    ],
)
def test_bad_values_get_one_clear_line(tmp_path, pairs_setup, capsys, extra, message):
    files, config = pairs_setup
    extra = [value.format(dir=tmp_path) for value in extra]
    args = batch_args(config, tmp_path, [files["c1"]], [files["s1"]], *extra)
    _expect_one_line_error(capsys, args, message)
    assert not (tmp_path / "batch_out").exists() or not list((tmp_path / "batch_out").iterdir())


def test_no_images_at_all(tmp_path, pairs_setup, capsys):
    files, config = pairs_setup
    # The test config names data.content and data.style: batch.contents/styles fall back to them.
    args = ["--config", str(config), "--batch.output_dir", str(tmp_path / "batch_out"), "--print_config"]
    with pytest.raises(SystemExit):
        cli_main(["batch", *args])
    assert "batch:" in capsys.readouterr().out
    bare = tmp_path / "bare.yaml"
    bare.write_text("model:\n  weights: random\n")
    _expect_one_line_error(capsys, ["--config", str(bare)], "no content images: set batch.contents")


def test_sharding_needs_the_real_command_line(tmp_path, pairs_setup, capsys):
    files, config = pairs_setup
    args = batch_args(config, tmp_path, [files["c1"]], [files["s1"]], "--batch.devices", "2")
    _expect_one_line_error(capsys, args, "re-run the command line")


@pytest.mark.slow
def test_two_processes_share_the_pairs(tmp_path, pairs_setup):
    """The real command, sharded over 2 CPU processes by Lightning's launcher."""
    files, config = pairs_setup
    args = batch_args(config, tmp_path, [files["c1"], files["c2"]], [files["s1"], files["s2"]])
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "batch", *args, "--batch.devices", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "batch: 4 of 4 pairs done, 0 failed" in result.stdout and "on 2 processes" in result.stdout
    names = ["c1__s1", "c1__s2", "c2__s1", "c2__s2"]
    ranks = {}
    for n, name in enumerate(names, start=1):
        lines = [line for line in result.stdout.splitlines() if line.strip().startswith(f"done     {n}  ")]
        assert len(lines) == 1, f"pair {n} reported once: {result.stdout}"
        ranks[name] = int(re.search(r"rank (\d)\)$", lines[0]).group(1))
        assert (tmp_path / "batch_out" / f"{name}.png").is_file()
        # Each pair ran exactly once, in one run of its own, with its TensorBoard events (rank 1's too).
        versions = list((runs_dir(tmp_path) / name).iterdir())
        assert [v.name for v in versions] == ["version_0"], name
        assert len(list(versions[0].glob("events.out.tfevents.*"))) == 1
        assert loss_steps(versions[0]) == [0, 1], name
    assert ranks == {"c1__s1": 0, "c1__s2": 1, "c2__s1": 0, "c2__s2": 1}, "pairs dealt out as pairs[rank::2]"


def test_a_signal_during_a_pair_stops_the_whole_batch(tmp_path, pairs_setup, capsys, monkeypatch):
    files, config = pairs_setup
    calls = []

    def fake_fit_pair(runner, pair, placement):
        calls.append(pair.n)
        if pair.n == 2:
            raise Interrupted(signal.SIGTERM, 3, 4)
        return True, ""

    monkeypatch.setattr("nst_lightning.batch.runs.fit_pair", fake_fit_pair)
    assert run_batch(*batch_args(config, tmp_path, [files["c1"], files["c2"]], [files["s1"], files["s2"]])) == 143
    assert calls == [1, 2], "no pair starts after the signal"
    assert "the batch stopped at SIGTERM" in capsys.readouterr().err


def test_a_batch_gets_the_automatic_precision_too(tmp_path, pairs_setup, monkeypatch):
    import yaml

    monkeypatch.setattr("nst_lightning.run.runtime.cpu_has_amx_bf16", lambda: True)
    files, config = pairs_setup
    assert run_batch(*batch_args(config, tmp_path, [files["c1"]], [files["s1"]])) == 0
    saved = yaml.safe_load((runs_dir(tmp_path) / "c1__s1" / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "bf16-mixed"
