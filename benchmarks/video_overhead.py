"""What a video frame costs besides its iterations: the per-frame set-up (everything between the last step of
one frame and the last step of the next that is not an optimisation step: flows, warm start, targets, the
Trainer, the writes) against the time of the frame's own steps.

Runs the real command (``nst-lightning video``, in this process) on the camera pan of
``benchmarks/video_flicker.py``; each training step is timed by wrapping ``StyleTransfer.training_step``, so
the figures hold whatever the frame loop looks like. Target (issue 24, item 7): a later frame's set-up at most
10 % of its iterations' time at 256 px.

    .venv/bin/python benchmarks/video_overhead.py --size 256 --frames 4 --steps-first 10 --steps 10 \
        --weights /work/shared/weights/vgg16_imagenet_keras.pth --backbone vgg16
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import STYLE, base_parser, setup_torch
from video_flicker import pan_clip


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--size", type=int, default=256, help="clip width = stylisation size (256)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--shift", type=int, default=3, help="pan in px per frame (3)")
    parser.add_argument("--steps-first", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--weights", default="random")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--style", type=Path, default=STYLE)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("extra", nargs="*", help="more options for the run (after --)")
    args = parser.parse_args()
    setup_torch(args.threads, args.device)
    from nst_lightning.main import cli_main
    from nst_lightning.run.module import StyleTransfer

    work = args.workdir or Path(tempfile.mkdtemp(prefix="video_overhead_"))
    work.mkdir(parents=True, exist_ok=True)
    clip = work / "pan.mp4"
    width, height = pan_clip(clip, args.size, args.frames, args.shift)
    steps: list[tuple[float, float]] = []  # (start, end) of every training step, in order
    original = StyleTransfer.training_step

    def timed(self, batch, batch_idx):
        started = time.perf_counter()
        try:
            return original(self, batch, batch_idx)
        finally:
            steps.append((started, time.perf_counter()))

    StyleTransfer.training_step = timed
    command = [
        "video",
        str(clip),
        str(args.style),
        "-o",
        str(work / "out.mp4"),
        "--size",
        str(args.size),
        "--steps-first",
        str(args.steps_first),
        "--steps",
        str(args.steps),
        "--weights",
        args.weights,
        "--backbone",
        args.backbone,
        "--device",
        args.device,
        "--overwrite",
        *args.extra,
    ]
    started = time.perf_counter()
    try:
        cli_main(command)
    finally:
        StyleTransfer.training_step = original
    total = time.perf_counter() - started
    counts = [args.steps_first] + [args.steps] * (args.frames - 1)
    if len(steps) != sum(counts):
        raise SystemExit(f"{len(steps)} steps timed, {sum(counts)} expected: not a one-process temporal run?")
    frames, first = [], 0
    for index, count in enumerate(counts):
        own = steps[first : first + count]
        iterations = sum(end - start for start, end in own)
        # From the end of the previous frame's last step (the run's start for frame 1) to this frame's last step.
        since = started if index == 0 else steps[first - 1][1]
        frames.append(
            {"frame": index + 1, "steps": count, "iterations_s": iterations, "setup_s": own[-1][1] - since - iterations}
        )
        first += count
    print(
        f"{args.frames} frames of {width}x{height} px, {args.backbone} {args.weights}, {args.device}; "
        f"{args.steps_first} iterations first, {args.steps} later; {total:.1f} s in all",
        flush=True,
    )
    for row in frames:
        share = row["setup_s"] / row["iterations_s"]
        print(
            f"frame {row['frame']}: set-up {row['setup_s']:.2f} s, {row['steps']} iterations "
            f"{row['iterations_s']:.2f} s ({row['iterations_s'] / row['steps'] * 1000:.0f} ms each): "
            f"set-up {share:.0%} of the iterations' time",
            flush=True,
        )
    later = frames[1:]
    if later:
        setup = statistics.mean(r["setup_s"] for r in later)
        per_step = statistics.mean(r["iterations_s"] / r["steps"] for r in later)
        print(
            f"later frames: set-up {setup:.2f} s each, {per_step * 1000:.0f} ms per iteration; at the default "
            f"100 iterations the set-up would be {setup / (100 * per_step):.1%} of them",
            flush=True,
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"args": {k: str(v) for k, v in vars(args).items()}, "frames": frames, "total_s": total}, indent=1
            )
        )


if __name__ == "__main__":
    sys.exit(main())
