"""``nst-lightning video`` on a tiny synthetic pan (made here with PyAV: 48x32 px, 8 frames, audio) with random
weights: what the output keeps, flicker against independent frames, resume after a kill, bad input; and the
temporal loss, the reliability mask and the flicker measure on their own."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
pytest.importorskip("cv2")

from nst_lightning.core.losses import temporal_loss  # noqa: E402
from nst_lightning.main import cli_main  # noqa: E402
from nst_lightning.video.flow import flicker, reliability, warp  # noqa: E402
from nst_lightning.video.media import probe  # noqa: E402
from tests.conftest import REPO, make_image, make_module, wait_for  # noqa: E402

WIDTH, HEIGHT, FRAMES, RATE, SHIFT = 48, 32, 6, 10, 2
# Tiny runs: a few iterations per frame, the later frames fewer (as the defaults, 300 and 100).
FAST = ["--weights", "random", "--steps-first", "6", "--steps", "3", "--size", str(WIDTH)]


def write_clip(path: Path, frames: int = FRAMES, audio: bool = True, times: list[int] | None = None) -> Path:
    """A camera panning right by SHIFT px a frame over a textured image (H.264), with a 440 Hz tone (AAC).
    ``times``: each frame's timestamp in ms (a variable frame rate), in a Matroska file."""
    scene = _scene(WIDTH + SHIFT * frames)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=RATE)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        if times is not None:
            stream.codec_context.time_base = Fraction(1, 1000)
        sound = out.add_stream("aac", rate=8000, layout="mono") if audio else None
        for i in range(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(scene[:, SHIFT * i : SHIFT * i + WIDTH]), "rgb24")
            if times is not None:
                frame.pts, frame.time_base = times[i], Fraction(1, 1000)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
        if sound is not None:
            _tone(out, sound, frames / RATE)
    return path


def _scene(width: int) -> np.ndarray:
    """Smooth shapes with some texture: something for the flow to follow."""
    y, x = np.mgrid[0:HEIGHT, 0:width].astype(np.float32)
    rng = np.random.default_rng(5)
    pixels = np.stack([128 + 100 * np.sin(x / 5), 128 + 100 * np.cos(y / 4 + x / 9), 255 * x / width], -1)
    return np.clip(pixels + rng.integers(0, 30, pixels.shape), 0, 255).astype(np.uint8)


def _tone(out, stream, seconds: float) -> None:
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(int(8000 * seconds)) / 8000)).astype(np.float32)
    frame = av.AudioFrame.from_ndarray(samples[None], format="fltp", layout="mono")
    frame.sample_rate, frame.pts = 8000, 0
    out.mux(stream.encode(frame))
    out.mux(stream.encode(None))


def audio_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as container:
        return [bytes(p) for p in container.demux(container.streams.audio[0]) if p.size]


def read_frames(folder: Path) -> list[np.ndarray]:
    from PIL import Image

    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("frame_*.png"))]


def pan_flicker(frames: list[np.ndarray]) -> float:
    """Mean |frame t - frame t-1 moved by the pan| over the columns both see (the motion is known)."""
    values = [
        np.abs(b[:, : WIDTH - SHIFT].astype(float) - a[:, SHIFT:].astype(float)).mean()
        for a, b in zip(frames, frames[1:], strict=False)
    ]
    return float(np.mean(values))


def said(err: str) -> list[str]:
    """The lines of stderr besides the random weights' warning, the progress (a line a frame off a terminal) and,
    on a CPU with AMX, the note on the precision chosen."""
    notes = ("weights is 'random'", "trainer.precision is not set")
    return [line for line in err.splitlines() if not any(n in line for n in notes) and not line.startswith("frame ")]


@pytest.fixture(autouse=True)
def plain_argv(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    monkeypatch.chdir(tmp_path)  # the per-frame TensorBoard runs go to ./lightning_logs


@pytest.fixture(scope="module")
def clip(tmp_path_factory) -> Path:
    return write_clip(tmp_path_factory.mktemp("clip") / "pan.mp4")


@pytest.fixture(scope="module")
def style(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("style") / "style.jpg", 32, 32, seed=2)


@pytest.fixture
def usual_umask():
    before = os.umask(0o022)
    yield
    os.umask(before)


@pytest.mark.slow
def test_output_keeps_frame_count_size_rate_and_audio(tmp_path, clip, style, capsys, usual_umask):
    out = tmp_path / "styled.mp4"
    cli_main(["video", str(clip), str(style), "-o", str(out), *FAST])
    assert stat.S_IMODE(out.stat().st_mode) == 0o644, "an image's permissions, not a temporary file's 0600"
    captured = capsys.readouterr()
    # stderr is no terminal here: one line a frame instead of a bar.
    progress = [line for line in captured.err.splitlines() if line.startswith("frame ")]
    assert [line.split(":")[0] for line in progress] == [f"frame {i}/{FRAMES}" for i in range(1, FRAMES + 1)]
    assert progress[0].endswith(" s") and "6 iterations" in progress[0] and "3 iterations" in progress[1]
    info = probe(out)
    assert (info.frames, info.width, info.height, info.rate) == (FRAMES, WIDTH, HEIGHT, Fraction(RATE))
    assert info.audio == "aac" and audio_packets(out) == audio_packets(clip), "the audio is copied unchanged"
    assert not (tmp_path / "styled.mp4.parts").exists(), "the work folder goes once OUT is written"
    assert not list(tmp_path.glob(".styled*")), "no temporary file left"
    line = captured.out.strip().splitlines()[-1]
    assert line.startswith(f"done: styled.mp4 ({FRAMES} frames")
    # One TensorBoard run for the video: every frame's steps after the frames before, the temporal term from the
    # second frame on, each finished frame's number and image at its last step.
    assert f"logs: tensorboard --logdir {Path('lightning_logs') / 'video' / 'styled.mp4' / 'version_0'}" in line
    runs = tmp_path / "lightning_logs" / "video" / "styled.mp4"
    assert [p.name for p in runs.iterdir()] == ["version_0"]
    scalars, images = tensorboard_run(runs / "version_0")
    first, later = 6, 3
    total = first + later * (FRAMES - 1)
    assert [step for step, _ in scalars["loss"]] == list(range(total))
    assert [step for step, _ in scalars["loss/temporal"]] == list(range(first, total))
    ends = [first - 1 + later * i for i in range(FRAMES)]
    assert scalars["frame"] == [(end, float(i + 1)) for i, end in enumerate(ends)]
    assert images["frame"] == ends


def tensorboard_run(folder: Path) -> tuple[dict[str, list[tuple[int, float]]], dict[str, list[int]]]:
    """A TensorBoard run's scalars ((step, value) by tag) and images (steps by tag), from all its event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return scalars, {tag: [e.step for e in acc.Images(tag)] for tag in acc.Tags()["images"]}


@pytest.fixture(scope="module")
def temporal_frames(tmp_path_factory, clip, style) -> list[np.ndarray]:
    """The frames of one uninterrupted temporal-mode run, as a PNG folder."""
    out = tmp_path_factory.mktemp("temporal") / "frames"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out.parent)
        patch.setattr(sys, "argv", ["cli.py"])
        cli_main(["video", str(clip), str(style), "-o", str(out), *FAST])
    return read_frames(out)


@pytest.mark.slow
def test_temporal_mode_flickers_less_than_independent_frames(tmp_path, clip, style, temporal_frames, usual_umask):
    cli_main(["video", str(clip), str(style), "-o", str(tmp_path / "independent"), *FAST, "--independent"])
    folder = tmp_path / "independent"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755, "a folder's permissions, not a temporary folder's 0700"
    assert {stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {0o644}
    independent, temporal = read_frames(tmp_path / "independent"), temporal_frames
    assert len(independent) == len(temporal) == FRAMES and independent[0].shape == (HEIGHT, WIDTH, 3)
    assert np.array_equal(independent[0], temporal[0]), "the first frame is the same cold run"
    assert pan_flicker(temporal) < 0.5 * pan_flicker(independent)


@pytest.mark.slow
def test_killed_run_resumes_at_the_next_frame_and_gives_the_same_frames(tmp_path, clip, style, capsys, temporal_frames):
    args = ["video", str(clip), str(style), *FAST]
    # The command in a process of its own, killed (SIGKILL: no handler runs) once frame 2 is written.
    out, parts = tmp_path / "killed", tmp_path / "killed.parts"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    child = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *args, "-o", str(out)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: os.nice(19),  # this process, polling, gets the CPU before the run can finish
    )
    try:
        wait_for(lambda: (parts / "stylised" / "000002.png").exists(), what="frame 2", timeout=120)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    finished = sorted(p.name for p in (parts / "stylised").glob("*.png"))
    k = len(finished)
    assert 2 <= k < FRAMES and finished == [f"{i:06d}.png" for i in range(1, k + 1)], finished
    assert not out.exists(), "no OUT until every frame is done"
    stamps = {name: (parts / "stylised" / name).stat().st_mtime_ns for name in finished}
    capsys.readouterr()
    cli_main([*args, "-o", str(out), "--keep-frames"])  # the same settings (kept frames are no setting)
    captured = capsys.readouterr()
    assert f"resuming at frame {k + 1} of {FRAMES}" in captured.err
    assert f"{k} done before, resumed at frame {k + 1}" in captured.out
    assert stamps == {name: (parts / "stylised" / name).stat().st_mtime_ns for name in finished}, "not redone"
    resumed, whole = read_frames(out), temporal_frames
    assert len(resumed) == FRAMES
    assert all(np.array_equal(a, b) for a, b in zip(resumed, whole, strict=True)), "the same frames as one run"
    # The resumed run logs on into the killed run's TensorBoard run, its frames' steps after those done before
    # (what the killed process had not flushed to its event file when SIGKILL came is lost).
    runs = tmp_path / "lightning_logs" / "video" / "killed"
    assert [p.name for p in runs.iterdir()] == ["version_0"]
    scalars, _ = tensorboard_run(runs / "version_0")
    first = 6 + 3 * (k - 1)  # frame k + 1's first step
    assert {step for step, _ in scalars["loss"]} >= set(range(first, 6 + 3 * (FRAMES - 1)))
    assert [(step, int(value)) for step, value in scalars["frame"] if value > k] == [
        (first + 2 + 3 * i, k + 1 + i) for i in range(FRAMES - k)
    ]
    assert 1 in [int(value) for _, value in scalars["frame"]], "the killed process's first frame"


def test_sigterm_inside_a_frame_is_one_line_exit_143_and_keeps_the_frames_done(
    tmp_path, clip, style, capsys, monkeypatch
):
    from nst_lightning.run.module import StyleTransfer

    original, steps = StyleTransfer.training_step, []

    def step(self, batch, batch_idx):
        steps.append(batch_idx)
        if len(steps) == 6 + 2:  # frame 2's second step (frame 1 has 6): inside Lightning's fit
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(StyleTransfer, "training_step", step)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stopped:
        cli_main(["video", str(clip), str(style), "-o", str(tmp_path / "out.mp4"), *FAST])
    lines = said(capsys.readouterr().err)
    assert stopped.value.code == 143 and len(lines) == 1, lines
    assert lines[0].startswith("nst-lightning: interrupted: SIGTERM at frame 2 of 6 (frame 1 kept in")
    stylised = tmp_path / "out.mp4.parts" / "stylised"
    assert sorted(p.name for p in stylised.glob("*.png")) == ["000001.png"] and not (tmp_path / "out.mp4").exists()
    assert signal.getsignal(signal.SIGTERM) == before, "the previous handler is back"


def test_out_of_memory_inside_a_frame_is_one_line_and_keeps_the_frames_done(tmp_path, clip, style, capsys, monkeypatch):
    from nst_lightning.run.module import StyleTransfer

    original, steps = StyleTransfer.training_step, []

    def step(self, batch, batch_idx):
        steps.append(batch_idx)
        if len(steps) == 6 + 2:  # frame 2's second step (frame 1 has 6)
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 215808000 bytes.")
        return original(self, batch, batch_idx)

    monkeypatch.setattr(StyleTransfer, "training_step", step)
    with pytest.raises(SystemExit) as stopped:
        cli_main(["video", str(clip), str(style), "-o", str(tmp_path / "out.mp4"), *FAST])
    lines = said(capsys.readouterr().err)
    errors = [line for line in lines if "Wrote the partial image" not in line]  # frame 2's, in the work folder
    assert stopped.value.code == 1 and len(errors) == 1, lines
    assert errors[0].startswith("nst-lightning: error: out of memory (asked for 206 MiB more)"), errors
    assert "a smaller --size;" in errors[0], errors
    assert errors[0].endswith(f"stopped at frame 2 of 6 (frame 1 kept in {tmp_path / 'out.mp4.parts'})"), errors
    stylised = tmp_path / "out.mp4.parts" / "stylised"
    done = sorted(p.name for p in stylised.glob("*.png") if ".partial" not in p.name)
    assert done == ["000001.png"] and not (tmp_path / "out.mp4").exists()


def _audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as out:
        _tone(out, out.add_stream("aac", rate=8000, layout="mono"), 0.5)
    return path


def _no_frames(path: Path) -> Path:
    """A Matroska file whose video track has no frame (its audio track keeps the file readable)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=RATE)
        stream.width, stream.height = WIDTH, HEIGHT
        _tone(out, out.add_stream("aac", rate=8000, layout="mono"), 0.5)
    return path


BAD_INPUTS = {
    "not a video": (lambda p: (p / "text.mp4").write_text("not a video\n") and p / "text.mp4", "is not a video"),
    "a still image": (lambda p: make_image(p / "still.png", 48, 32), "is a still image"),
    "no video stream": (lambda p: _audio_only(p / "tone.m4a"), "has no video stream"),
    "zero frames": (lambda p: _no_frames(p / "empty.mkv"), "no frames"),
    "variable frame rate": (
        lambda p: write_clip(p / "vfr.mkv", 6, audio=False, times=[0, 100, 200, 450, 500, 800]),
        "variable frame rate",
    ),
    "missing": (lambda p: p / "nowhere.mp4", "does not exist"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, style, capsys, case):
    make, message = BAD_INPUTS[case]
    source = make(tmp_path)
    out = tmp_path / "out.mp4"
    with pytest.raises(SystemExit) as stopped:
        cli_main(["video", str(source), str(style), "-o", str(out), *FAST])
    assert stopped.value.code == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("nst-lightning: error:") and message in err, err
    assert not out.exists() and not (tmp_path / "out.mp4.parts").exists()


def test_bad_output_is_refused_before_any_work(tmp_path, clip, style, capsys):
    (tmp_path / "file").write_text("")
    (tmp_path / "old.mp4").write_text("someone's video")
    cases = {
        str(tmp_path / "old.mp4"): "exists: pass --overwrite",
        str(clip): "is the input",
        str(tmp_path / "out.gif"): "end it in .mp4",
        str(tmp_path / "file" / "out.mp4"): "cannot write",
        str(tmp_path / "file"): "exists and is a file",
    }
    for out, message in cases.items():
        before = clip.read_bytes()
        with pytest.raises(SystemExit) as stopped:
            cli_main(["video", str(clip), str(style), "-o", out, *FAST])
        err = capsys.readouterr().err.strip()
        assert stopped.value.code == 1 and len(err.splitlines()) == 1 and message in err, (out, err)
        assert clip.read_bytes() == before
    assert not list(tmp_path.glob("*.parts")) and (tmp_path / "old.mp4").read_text() == "someone's video"


def test_a_frame_size_over_the_memory_estimate_names_a_size_that_fits(tmp_path, clip, style, capsys, monkeypatch):
    from nst_lightning.run import runtime

    monkeypatch.setattr(runtime, "available_bytes", lambda device="cpu": 2 * 2**20)
    with pytest.raises(SystemExit) as stopped:
        cli_main(["video", str(clip), str(style), "-o", str(tmp_path / "out.mp4"), *FAST])
    lines = said(capsys.readouterr().err)
    assert stopped.value.code == 1 and len(lines) == 1 and lines[0].startswith("nst-lightning: error: a 48x32 px run")
    assert "GiB" in lines[0] and "data.image_size" not in lines[0]
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "out.mp4.parts").exists()


def test_temporal_loss_is_the_masked_mean_squared_difference():
    image, warped = torch.zeros(1, 3, 2, 2), torch.ones(1, 3, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    assert float(temporal_loss(image, warped, mask)) == pytest.approx(3 / 12)  # (1/D) sum c (x - w)^2, D = C*H*W
    assert float(temporal_loss(image, warped, torch.zeros_like(mask))) == 0.0


def test_objective_adds_the_temporal_term_only_when_set():
    module = make_module(content_layers=["relu2_1"], style_layers=["relu1_1"])
    content, style = torch.rand(1, 3, 24, 24), torch.rand(1, 3, 24, 24)
    from nst_lightning.core.inputs import Inputs

    objective, image = module.objective, torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        objective.set_targets(Inputs(content, [style], [1.0], None))
        still = objective(image)
        objective.set_temporal(torch.zeros_like(image), torch.ones(1, 1, 24, 24), weight=10.0)
        video = objective(image)
        objective.set_temporal(None)
        off = objective(image)
    assert "temporal" not in still and set(off) == set(still)
    assert all(torch.equal(off[k], still[k]) for k in still), "off again: the still image's losses, bit for bit"
    assert float(video["temporal"]) == pytest.approx(float(image.pow(2).mean()))
    assert float(video["total"]) == pytest.approx(float(still["total"]) + 10 * float(video["temporal"]), rel=1e-5)
    assert "temporal_target" not in objective.state_dict()


def test_reliability_drops_disagreeing_flow_boundaries_and_pixels_from_outside():
    h, w = 20, 30
    backward = np.zeros((h, w, 2), np.float32)
    backward[..., 0] = 3.0  # frame t-1 seen 3 px to the right: a pan
    forward = -backward.copy()
    mask = reliability(forward, backward)
    assert mask[:, : w - 4].min() == 1.0 and mask[:, w - 3 :].max() == 0.0, "the last columns come from outside"
    forward[5:10, 5:10] = 0.0  # frame t-1's pixels there do not come back: frame t's at x - 3 are occluded
    mask = reliability(forward, backward)
    assert mask[5:10, 2:7].max() == 0.0 and mask[5:10, 8 : w - 4].min() == 1.0 and mask[:5, : w - 4].min() == 1.0
    backward[:, 15:, 0] = 0.0  # a motion boundary at column 15
    assert reliability(-backward, backward)[:, 14:16].max() == 0.0


def test_flicker_is_zero_for_a_frame_that_moved_with_the_flow():
    rng = np.random.default_rng(0)
    previous = rng.integers(0, 256, (16, 24, 3)).astype(np.uint8)
    backward = np.zeros((16, 24, 2), np.float32)
    backward[..., 0] = 2.0
    current = warp(previous, backward)
    mask = reliability(-backward, backward)
    assert flicker(current, previous, backward, mask) == 0.0
    assert flicker(previous, previous, backward, mask) > 10


@pytest.mark.slow
def test_two_devices_split_the_frames_into_segments_the_first_as_one_run(
    tmp_path, clip, style, capsys, temporal_frames
):
    """The real command on 2 CPU processes (Lightning's launcher re-runs it): frames 1-3 and 4-6, each segment's
    first frame cold; the video keeps the clip's frames, size and rate; the first segment is the one-process
    run's frames 1-3; the work folder records the segments."""
    out = tmp_path / "styled.mp4"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    args = ["video", str(clip), str(style), "-o", str(out), *FAST, "--keep-frames"]
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args, "--devices", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"({FRAMES} frames, 2 segments on 2 processes" in result.stdout
    info = probe(out)
    assert (info.frames, info.width, info.height, info.rate) == (FRAMES, WIDTH, HEIGHT, Fraction(RATE))
    parts, half = tmp_path / "styled.mp4.parts", FRAMES // 2
    from PIL import Image

    frames = [np.asarray(Image.open(parts / "stylised" / f"{i:06d}.png").convert("RGB")) for i in range(1, 7)]
    # Segment 1 is the one-process run's first frames, up to rounding: its process runs one thread, the reference
    # more, and the default L-BFGS (no line search) grows that rounding through its second step.
    differences = [np.abs(a.astype(int) - b).mean() for a, b in zip(frames[:half], temporal_frames[:half], strict=True)]
    assert max(differences) < 4, differences
    assert not np.array_equal(frames[half], temporal_frames[half]), "segment 2 starts cold"
    import json

    steps = [json.loads((parts / "stylised" / f"{i:06d}.json").read_text())["steps"] for i in range(1, FRAMES + 1)]
    assert steps == [6, 3, 3, 6, 3, 3], "each segment's first frame gets --steps-first"
    assert json.loads((parts / "settings.json").read_text())["cold_frames"] == [0, half]
    # One process would make other frames cold (other results): that folder is refused, before any work.
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        cli_main([*args, "--overwrite"])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and "holds the frames of another video run" in err, err
    # Killed in both segments (frames 3 and 6 lost): each segment resumes at its first unfinished frame.
    stylised = parts / "stylised"
    for name in ("000003", "000006"):
        (stylised / f"{name}.png").unlink()
        (stylised / f"{name}.json").unlink()
    kept = {n: (stylised / f"{n}.png").stat().st_mtime_ns for n in ("000001", "000002", "000004", "000005")}
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args, "--devices", "2", "--overwrite"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at frame 3 (segment 1-3 of 6)" in result.stderr and "resuming at frame 6 (segment 4-6 of 6)" in (
        result.stderr
    )
    assert "4 done before" in result.stdout
    assert kept == {n: (stylised / f"{n}.png").stat().st_mtime_ns for n in kept}, "not redone"
    again = [np.asarray(Image.open(stylised / f"{i:06d}.png").convert("RGB")) for i in range(1, 7)]
    assert all(np.array_equal(a, b) for a, b in zip(again, frames, strict=True)), "the same frames as one run"


@pytest.mark.parametrize(
    ("devices", "message"),
    [("0", "--devices must be at least 1, got 0"), ("7", "--devices 7 is more than the 6 frames")],
)
def test_bad_devices_is_one_line_and_writes_nothing(tmp_path, clip, style, capsys, devices, message):
    out = tmp_path / "out.mp4"
    with pytest.raises(SystemExit) as stopped:
        cli_main(["video", str(clip), str(style), "-o", str(out), *FAST, "--devices", devices])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 1 and len(err.splitlines()) == 1 and message in err, err
    assert not out.exists() and not (tmp_path / "out.mp4.parts").exists()


def test_devices_above_one_needs_the_real_command_line(tmp_path, clip, style, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli_main(["video", str(clip), str(style), "-o", str(tmp_path / "out.mp4"), *FAST, "--devices", "2"])
    lines = said(capsys.readouterr().err)
    assert stopped.value.code == 1 and len(lines) == 1 and "re-run the command line" in lines[0], lines
    assert not (tmp_path / "out.mp4.parts").exists()


@pytest.mark.slow
def test_a_full_disk_is_one_line_naming_the_file_and_keeps_the_frames_done(tmp_path, clip, style):
    import resource

    def small_files():  # files over 16 kB fail (EFBIG, as a full disk gives ENOSPC): the frames fit, a flow does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (16_000, 16_000))

    out = tmp_path / "out.mp4"
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    result = subprocess.run(
        [sys.executable, str(REPO / "cli.py"), "video", str(clip), str(style), "-o", str(out), *FAST],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=small_files,
    )
    lines = said(result.stderr)
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith(f"nst-lightning: error: cannot write {out}.parts/flow/000002.npz: File too large")
    assert f"frame 1 is kept in {out}.parts" in lines[0] and "resume at frame 2" in lines[0]
    assert not out.exists() and [p.name for p in (tmp_path / "out.mp4.parts" / "flow").iterdir()] == []
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], "no half-written file"


def test_help_comes_at_once_and_names_the_extra_without_pyav(tmp_path):
    """PyAV made unimportable: ``video --help`` exits 0 before torch loads, and says what to install."""
    code = (
        "import sys; sys.modules['av'] = None\n"
        "from nst_lightning.main import cli_main\n"
        "try:\n    cli_main(['video', '--help'])\n"
        "except SystemExit as stop:\n    print('exit', stop.code, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "usage: nst-lightning video IN STYLE" in result.stdout
    assert "video needs PyAV and OpenCV (av missing): pip install 'nst-lightning[video]'" in result.stdout
    assert result.stdout.strip().endswith("exit 0 False"), "torch stays unloaded"


def test_a_run_without_the_extra_is_one_line_saying_what_to_install(tmp_path, clip, style, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(SystemExit) as stopped:
        cli_main(["video", str(clip), str(style), "-o", str(tmp_path / "out.mp4"), *FAST])
    err = capsys.readouterr().err.strip()
    assert stopped.value.code == 1
    assert err == "nst-lightning: error: video needs PyAV and OpenCV (cv2 missing): pip install 'nst-lightning[video]'"
