"""What a user sees through the real command (issue 24): resume, the batch's report, the one-shot flags, --version."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from lightning import Callback
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import REPO, make_image

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
TINY = ["--size", "32", "--weights", "random", "--device", "cpu"]


def command(cwd: Path, *args: str, check: int | None = 0) -> subprocess.CompletedProcess:
    """``python cli.py ARGS`` in ``cwd``, as a user runs it; ``check``: the exit status it must give."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    if check is not None:
        assert done.returncode == check, done.stderr
    return done


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    make_image(tmp_path / "photo.png", 40, 30, seed=1)
    make_image(tmp_path / "painting.jpg", 32, 32, seed=2)
    return "photo.png", "painting.jpg"


def bar_frames(stderr: str) -> list[str]:
    """Every state the progress bar was drawn in."""
    return [frame.strip() for frame in re.split(r"[\r\n]", stderr) if frame.strip().startswith("stylising")]


@pytest.mark.slow
@posix_only
def test_an_interrupted_run_resumes_in_its_own_run_folder_with_a_whole_bar(tmp_path, pair):
    stop = "--trainer.callbacks+={class_path: tests.test_guard.SendSignal, init_args: {at_step: 3, signum: 2}}"
    first = command(tmp_path, *pair, "-o", "out.png", "--steps", "12", *TINY, stop, check=130)
    # The interruption's message starts a line of its own, not the end of the bar's.
    lines = first.stderr.split("\n")
    (message,) = [line for line in lines if "nst-lightning: interrupted:" in line]
    assert message.startswith("nst-lightning: interrupted: SIGINT: stopped after step 4 of 12"), first.stderr
    ckpt = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "interrupted.ckpt"
    assert f"--ckpt_path {ckpt}" in message

    resumed = command(tmp_path, *pair, "-o", "out.png", "--steps", "12", *TINY, "--ckpt_path", str(ckpt))
    frames = bar_frames(resumed.stderr)
    assert frames and all("/12 iterations" in frame for frame in frames), frames  # never "18/? iterations"
    assert "12/12 iterations" in frames[-1]
    assert "dirpath" not in resumed.stderr and "not empty" not in resumed.stderr, resumed.stderr
    # One run folder: the curve of one image is one TensorBoard run.
    assert sorted(p.name for p in (tmp_path / "lightning_logs").iterdir()) == ["version_0"]
    assert "logs and checkpoints in lightning_logs/version_0" in resumed.stdout
    events = EventAccumulator(str(tmp_path / "lightning_logs" / "version_0"), size_guidance={"scalars": 0})
    events.Reload()
    assert [event.step for event in events.Scalars("loss")] == list(range(12))
    # The bar's last loss is the summary's final loss.
    final = re.search(r"final loss ([0-9.e+-]+)", resumed.stdout).group(1)
    assert frames[-1].endswith(f"loss={final}]"), (frames[-1], resumed.stdout)


@pytest.mark.slow
def test_a_batch_bar_shows_the_steps_of_the_pair_in_progress_and_skipped_pairs_do_not_count(tmp_path):
    for name in ("c1", "c2"):
        make_image(tmp_path / f"{name}.png", 32, 32, seed=len(name))
    make_image(tmp_path / "s.jpg", 32, 32, seed=7)
    args = ["batch", "--batch.contents", "c*.png", "--batch.styles", "s.jpg", "--trainer.max_steps", "6"]
    args += ["--data.image_size", "32", "--model.weights", "random", "--trainer.accelerator", "cpu"]
    args += ["--batch.progress_bar", "true"]
    command(tmp_path, *args, "--batch.contents", "c1.png")
    done = command(tmp_path, *args, "--batch.skip_existing", "true")
    assert "batch: 1 of 2 pairs done, 0 failed, 1 skipped (output exists)" in done.stdout
    frames = [f.strip() for f in re.split(r"[\r\n]", done.stderr) if f.strip().startswith("pairs:")]
    assert any(re.search(r"pair 2/2 c2__s: step [1-6]/6", frame) for frame in frames), frames


class SeesPartial(Callback):
    """As step ``at_step`` starts, waits (up to a minute) for ``path`` to hold an image written by --save-every, then
    writes its size to ``record``."""

    def __init__(self, path: str, record: str, at_step: int = 5):
        self.path, self.record, self.at_step = path, record, at_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            deadline = time.monotonic() + 60
            while not Path(self.path).exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            with Image.open(self.path) as image:
                Path(self.record).write_text(f"{image.size[0]}x{image.size[1]}")


@pytest.mark.slow
def test_the_neural_style_flags_reach_the_run(tmp_path, pair):
    make_image(tmp_path / "second.png", 24, 24, seed=3)
    watch = f"{{class_path: tests.test_cli_polish.SeesPartial, init_args: {{path: {tmp_path / 'out.partial.tif'}, "
    watch += f"record: {tmp_path / 'seen.txt'}}}}}"
    flags = ["--tv-weight", "0.1", "--init", "style", "--style-blend-weights", "1,3", "--style-scale", "0.5"]
    flags += ["--pooling", "avg", "--save-every", "2", "--print-every", "2", "--bit-depth", "16"]
    done = command(
        tmp_path, *pair, "second.png", "-o", "out.tif", "--steps", "6", *TINY, *flags, f"--trainer.callbacks+={watch}"
    )
    config = yaml.safe_load((tmp_path / "lightning_logs" / "version_0" / "config.yaml").read_text())
    model, data, output = config["model"], config["data"], config["output"]
    assert (model["tv_weight"], model["init"], model["pooling"]) == (0.1, "style", "avg")
    assert (data["style_blend_weights"], data["style_scale"]) == ([1.0, 3.0], 0.5)
    assert (output["save_every_n_steps"], output["bit_depth"]) == (2, 16)
    # --save-every: the image so far was in out.partial.tif during the run; the finished one replaced it.
    assert (tmp_path / "seen.txt").read_text() == "32x24"
    assert not (tmp_path / "out.partial.tif").exists()
    # --print-every: one line per 2 steps, the weighted terms adding up to the loss.
    printed = re.findall(
        r"step (\d) of 6: loss ([0-9.e+-]+) \(content ([0-9.e+-]+), style ([0-9.e+-]+), tv ([0-9.e+-]+)\)", done.stderr
    )
    assert [int(row[0]) for row in printed] == [2, 4], done.stderr
    for _, loss, *terms in printed:
        assert sum(map(float, terms)) == pytest.approx(float(loss), rel=1e-3)
    # --bit-depth 16: a 16-bit RGB TIFF (Pillow reads it; OpenCV, where installed, to the last bit).
    data = (tmp_path / "out.tif").read_bytes()
    assert data[:4] == b"II*\x00"
    with Image.open(tmp_path / "out.tif") as image:
        assert image.size == (32, 24) and image.mode == "RGB"
    cv2 = pytest.importorskip("cv2")
    pixels = cv2.imread(str(tmp_path / "out.tif"), cv2.IMREAD_UNCHANGED)
    assert pixels.dtype.name == "uint16" and pixels.shape == (24, 32, 3)
    assert len({int(v) & 0xFF for v in pixels.flatten()[:200]}) > 1, "16 bits of detail, not 8 bits shifted"


def test_a_16_bit_png_holds_every_sample(tmp_path):
    import torch

    from nst_lightning.io.image_io import save_image

    image = torch.rand(1, 3, 5, 9)
    save_image(image, tmp_path / "x.png", bit_depth=16)
    data = (tmp_path / "x.png").read_bytes()
    assert data[24:26] == bytes([16, 2]), "IHDR: bit depth 16, colour type RGB"
    cv2 = pytest.importorskip("cv2")
    back = cv2.imread(str(tmp_path / "x.png"), cv2.IMREAD_UNCHANGED)[..., ::-1]
    expected = (image[0].clamp(0, 1) * 65535).round().permute(1, 2, 0).numpy()
    assert (back == expected).all()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--style-blend-weights", "1"], "--style-blend-weights has 1 value(s) for 2 STYLE image(s)"),
        (["--style-blend-weights", "1,x"], "--style-blend-weights takes numbers separated by commas"),
        (["--style-blend-weights", "0,0"], "not all 0"),
        (["--bit-depth", "16", "-o", "out.jpg"], "--bit-depth 16 needs a PNG or TIFF output, not out.jpg"),
        (["--save-every", "0"], "--save-every must be at least 1"),
        (["--print-every", "-2"], "--print-every must be at least 1"),
        (["--tv-weight", "-1"], "--tv-weight must be a finite number >= 0"),
        (["--style-scale", "0"], "--style-scale must be a positive number"),
        (["--pooling", "min"], "argument --pooling: invalid choice: 'min'"),
        (["--bit-depth", "12"], "argument --bit-depth: invalid choice: 12"),
    ],
)
def test_a_bad_neural_style_flag_is_one_line(tmp_path, pair, flags, message):
    make_image(tmp_path / "second.png", 24, 24, seed=3)
    started = time.monotonic()
    done = command(tmp_path, *pair, "second.png", *TINY, *flags, check=None)
    assert done.returncode in (1, 2) and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("nst-lightning: error: ") and message in line, line
    assert time.monotonic() - started < 30  # before torch loads: well under a second where the CPUs are free


def test_version_names_torch_lightning_and_the_device(tmp_path):
    done = command(tmp_path, "--version")
    first, versions, device = done.stdout.splitlines()
    assert first.startswith("nst-lightning ") and str(REPO / "nst_lightning") in first
    assert re.match(r"torch \S+, Lightning \S+, torchvision \S+, Python 3\.", versions), versions
    assert re.match(r"device \(--device auto, the default\): (cpu, \d+ logical cores|gpu, )", device), device
    assert done.stderr == ""


@pytest.mark.slow
def test_fit_help_shows_our_settings_first_and_lightnings_on_request(tmp_path):
    short = command(tmp_path, "fit", "--help").stdout
    assert short.startswith("usage: nst-lightning fit")
    assert short.index("--model.style_weight") < short.index("--data.image_size") < short.index("--trainer.max_steps")
    for key in ("--output.bit_depth", "--output.save_every_n_steps", "--guard.stall_steps", "--ckpt_path"):
        assert key in short, key
    assert "--trainer.fast_dev_run" not in short and "--trainer.overfit_batches" not in short
    assert "nst-lightning fit --help-all lists every option" in short
    whole = command(tmp_path, "fit", "--help-all").stdout
    assert "--trainer.fast_dev_run" in whole and "--trainer.overfit_batches" in whole
    assert len(short.splitlines()) < len(whole.splitlines()) / 2


@pytest.mark.slow
def test_the_readme_names_what_quick_writes_and_the_cpu_wheels(tmp_path):
    printed = command(tmp_path, "fit", "--config", "default", "--config", "quick", "--print_config").stdout
    path = yaml.safe_load(printed)["output"]["path"]
    readme = (REPO / "README.md").read_text()
    quick = readme[readme.index("--config default --config quick`") :][:200]
    assert Path(path).name == "quick.png" and "`outputs/quick.png`" in quick
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in readme
