"""Flicker at the seams of ``nst-lightning video --devices N``: the pan clip of ``video_flicker.py`` (the true
motion known), stylised by the real command in N segments; prints the flicker of every frame (the seam frames
marked) and each frame's iterations and style loss.

    .venv/bin/python benchmarks/video_seams.py --size 128 --frames 12 --devices 2 \
        --weights /work/shared/weights/vgg16_imagenet_keras.pth --backbone vgg16
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, STYLE, base_parser
from PIL import Image
from video_flicker import pan_clip, pan_flicker


def main() -> None:
    """Runs the command once and prints the flicker per frame, seams against the other frames."""
    parser = base_parser(__doc__)
    parser.add_argument("--size", type=int, default=128, help="clip width = stylisation size (128)")
    parser.add_argument("--frames", type=int, default=12)
    parser.add_argument("--shift", type=int, default=3, help="pan in px per frame (3)")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--steps-first", type=int, default=300)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--backbone", default="vgg16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        clip, out = work / "pan.mp4", work / "out"
        pan_clip(clip, args.size, args.frames, args.shift)
        command = [
            sys.executable,
            str(REPO / "cli.py"),
            "video",
            str(clip),
            str(STYLE),
            "-o",
            str(out),
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
            "--keep-frames",
            "--devices",
            str(args.devices),
        ]
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        subprocess.run(command, cwd=work, env=env, check=True)
        frames = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(out.glob("frame_*.png"))]
        records = [json.loads(p.read_text()) for p in sorted((work / "out.parts" / "stylised").glob("*.json"))]
    flicker = pan_flicker(frames, args.shift)
    cold = {r for r, record in enumerate(records) if r and record["steps"] == args.steps_first}
    for index, value in enumerate(flicker, start=1):
        record = records[index]
        mark = "  <- seam (cold)" if index in cold else ""
        print(
            f"frame {index + 1:3d}: flicker {value:6.2f}, {record['steps']} iterations, "
            f"style {record['losses']['style']:.3g}{mark}"
        )
    seams = [flicker[i - 1] for i in sorted(cold)]
    others = [v for i, v in enumerate(flicker, start=1) if i not in cold]
    if seams and others:
        print(
            f"seam frames {np.mean(seams):.1f} levels against {np.mean(others):.1f} for the others "
            f"({np.mean(seams) / np.mean(others):.1f}x)"
        )


if __name__ == "__main__":
    main()
