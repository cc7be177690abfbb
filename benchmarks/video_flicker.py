"""Video flicker and cost: independent per-frame stylisation against temporal mode, on a camera pan over a
sample photo (the true motion is known: a whole number of pixels per frame).

Flicker of frame t: the mean absolute difference (0-255 levels) between stylised frame t and stylised frame
t-1 moved by the true motion, over the pixels both frames see. Cost: seconds and iterations per frame, and
the final style loss of the later frames against the first frame's. Both modes run the real command
(``nst-lightning video``), one after the other, and keep their frames; ``--gif`` writes the side-by-side
comparison (independent | temporal).

    .venv/bin/python benchmarks/video_flicker.py --size 160 --frames 16 \
        --weights /work/shared/weights/vgg16_imagenet_keras.pth --backbone vgg16 --gif docs/video_comparison.gif
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from common import CONTENT, STYLE, base_parser
from PIL import Image


def pan_clip(path: Path, size: int, frames: int, shift: int, rate: int = 12) -> tuple[int, int]:
    """A lossless H.264 clip of a camera panning right over the sample photo by ``shift`` px per frame, the
    photo scaled so ``frames`` windows of ``size`` x 2/3 ``size`` fit. Returns (width, height)."""
    width, height = size, size * 2 // 3 // 2 * 2
    photo = Image.open(CONTENT).convert("RGB")
    scale = max((width + shift * (frames - 1)) / photo.width, height / photo.height)
    photo = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1), Image.Resampling.LANCZOS)
    pixels = np.asarray(photo)
    top = (pixels.shape[0] - height) // 2
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.options = {"qp": "0"}  # lossless: the frames are exactly the photo's windows
        for i in range(frames):
            window = np.ascontiguousarray(pixels[top : top + height, shift * i : shift * i + width])
            out.mux(stream.encode(av.VideoFrame.from_ndarray(window, format="rgb24")))
        out.mux(stream.encode(None))
    return width, height


def pan_flicker(frames: list[np.ndarray], shift: int) -> list[float]:
    """Per frame t >= 1: mean |s_t(x) - s_{t-1}(x + shift)| over the columns both frames see (0-255 levels)."""
    values = []
    for previous, current in zip(frames, frames[1:], strict=False):
        a = current[:, : current.shape[1] - shift].astype(np.float32)
        b = previous[:, shift:].astype(np.float32)
        values.append(float(np.abs(a - b).mean()))
    return values


def run_mode(clip: Path, out: Path, args, independent: bool) -> dict:
    from nst_lightning.main import cli_main

    command = [
        "video",
        str(clip),
        str(args.style),
        "-o",
        str(out),
        "--size",
        str(args.size),
        "--keep-frames",
        "--steps-first",
        str(args.steps_first),
        "--steps",
        str(args.steps),
        "--temporal-weight",
        str(args.temporal_weight),
        "--weights",
        args.weights,
        "--backbone",
        args.backbone,
        "--overwrite",
        *args.extra,
    ]
    if independent:
        command.append("--independent")
    started = time.perf_counter()
    cli_main(command)
    seconds = time.perf_counter() - started
    work = out.with_name(out.name + ".parts") / "stylised"
    records = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("frame_*.png"))]
    return {"records": records, "frames": frames, "seconds": seconds}


def describe(name: str, result: dict, shift: int) -> dict:
    records = result["records"]
    flick = pan_flicker(result["frames"], shift)
    later = records[1:]
    figures = {
        "flicker_mean": statistics.mean(flick),
        "flicker_max": max(flick),
        "first_seconds": records[0]["seconds"],
        "first_steps": records[0]["steps"],
        "first_style": records[0]["losses"]["style"],
        "later_seconds": statistics.mean(r["seconds"] for r in later),
        "later_steps": later[0]["steps"],
        "later_style": statistics.mean(r["losses"]["style"] for r in later),
        "later_content": statistics.mean(r["losses"]["content"] for r in later),
        "later_temporal": statistics.mean(r["losses"].get("temporal", 0.0) for r in later),
        "total_seconds": result["seconds"],
    }
    print(
        f"{name:12s} flicker {figures['flicker_mean']:.2f} levels (max {figures['flicker_max']:.2f}); "
        f"first frame {figures['first_steps']} it {figures['first_seconds']:.1f} s style {figures['first_style']:.4g}; "
        f"later {figures['later_steps']} it {figures['later_seconds']:.1f} s style {figures['later_style']:.4g} "
        f"content {figures['later_content']:.4g}; {figures['total_seconds']:.0f} s in all",
        flush=True,
    )
    return figures


def write_gif(left: list[np.ndarray], right: list[np.ndarray], path: Path, rate: int) -> None:
    """Independent | temporal, side by side, a 4 px gap, looping."""
    gap = np.full((left[0].shape[0], 4, 3), 255, np.uint8)
    pictures = [Image.fromarray(np.concatenate([a, gap, b], axis=1)) for a, b in zip(left, right, strict=True)]
    pictures = [p.convert("P", palette=Image.Palette.ADAPTIVE, colors=64) for p in pictures]
    frame_ms = round(1000 / rate)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=frame_ms, loop=0, optimize=True)


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--size", type=int, default=160, help="clip width = stylisation size (160)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--shift", type=int, default=3, help="pan in px per frame (3)")
    parser.add_argument("--steps-first", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--temporal-weight", type=float, default=2e2)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--style", type=Path, default=STYLE)
    parser.add_argument("--modes", default="independent,temporal")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--gif", type=Path, default=None, help="write the side-by-side comparison here")
    parser.add_argument("extra", nargs="*", help="more options for every run (after --)")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="video_flicker_"))
    work.mkdir(parents=True, exist_ok=True)
    clip = work / "pan.mp4"
    width, height = pan_clip(clip, args.size, args.frames, args.shift)
    print(
        f"pan clip: {args.frames} frames of {width}x{height} px, {args.shift} px per frame; {args.backbone} "
        f"{args.weights}; work in {work}",
        flush=True,
    )
    results, figures = {}, {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(clip, work / mode, args, independent=mode == "independent")
        figures[mode] = describe(mode, results[mode], args.shift)
    if "independent" in figures and "temporal" in figures:
        ind, tmp = figures["independent"], figures["temporal"]
        print(
            f"temporal/independent: flicker {tmp['flicker_mean'] / ind['flicker_mean']:.2f}x, later-frame style loss "
            f"{tmp['later_style'] / ind['later_style']:.2f}x; temporal later frames: {tmp['later_steps']} of "
            f"{tmp['first_steps']} iterations, style loss {tmp['later_style'] / tmp['first_style']:.2f}x the first "
            f"frame's, {tmp['later_seconds']:.1f} s against {tmp['first_seconds']:.1f} s",
            flush=True,
        )
        if args.gif:
            write_gif(results["independent"]["frames"], results["temporal"]["frames"], args.gif, 12)
            print(f"comparison: {args.gif} ({args.gif.stat().st_size / 1024:.0f} kB)")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **figures}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
