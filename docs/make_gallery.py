#!/usr/bin/env python
"""The README's gallery: runs each gallery command (the real CLI, exactly as labelled) and writes a
compressed copy of its image to ``docs/gallery/``, plus ``docs/gallery/commands.json`` (command,
network, wall time, final loss of each image).

    python docs/make_gallery.py                      # every image (about 10 x 9 minutes on 2 cores)
    python docs/make_gallery.py --only tubingen_starry_night masks

The network is the ImageNet VGG-16 in ``../shared/weights/`` (the default VGG-19 cannot be downloaded
where this was made); ``--weights`` and ``--backbone`` choose another. Full-size outputs go to
``outputs/gallery/`` (not committed); the gallery copies are JPEGs, 400 px on the longest side.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GALLERY = REPO / "docs" / "gallery"
TRAINED = "../shared/weights/vgg16_imagenet_keras.pth"
SAMPLES = "nst_lightning/samples"
SIDE, QUALITY = 400, 74  # the gallery copies: longest side and JPEG quality (about 35 KB each)


def pair(content: str, style: str) -> list[str]:
    return [
        "--data.content",
        f"{SAMPLES}/content_{content}.jpg",
        "--data.style",
        f"{SAMPLES}/style_{style}.jpg",
    ]


# name -> the arguments after ``fit --config configs/default.yaml`` (and before the network flags).
ENTRIES: dict[str, list[str]] = {
    f"{content}_{style}": pair(content, style)
    for content in ("tubingen", "rocket")
    for style in ("starry_night", "the_scream", "composition_vii")
}
ENTRIES |= {
    "preserve_color": ["--config", "configs/preserve_color.yaml", *pair("tubingen", "the_scream")],
    "multi_style": ["--config", "configs/multi_style.yaml"],
    "masks": ["--config", "configs/masks.yaml"],
    "multiscale": ["--config", "configs/multiscale.yaml"],
}


def command(name: str, weights: str, backbone: str) -> list[str]:
    return [
        "python",
        "cli.py",
        "fit",
        "--config",
        "configs/default.yaml",
        *ENTRIES[name],
        "--model.backbone",
        backbone,
        "--model.weights",
        weights,
        "--output.path",
        f"outputs/gallery/{name}.png",
    ]


def final_loss(log_dir: Path) -> float | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return events.Scalars("loss")[-1].value if "loss" in events.Tags()["scalars"] else None


def compress(name: str) -> None:
    """The gallery copy of ``outputs/gallery/<name>.png``."""
    from PIL import Image

    with Image.open(REPO / "outputs" / "gallery" / f"{name}.png") as image:
        image = image.convert("RGB")
        image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
        image.save(GALLERY / f"{name}.jpg", quality=QUALITY, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=sorted(ENTRIES), help="make only these images")
    parser.add_argument("--weights", default=TRAINED)
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--logs", default="outputs/gallery/logs", help="trainer.default_root_dir of the runs")
    args = parser.parse_args()

    GALLERY.mkdir(parents=True, exist_ok=True)
    record_path = GALLERY / "commands.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    for name in args.only or list(ENTRIES):
        shown = command(name, args.weights, args.backbone)
        logs = Path(args.logs) / name
        # --overwrite: a second making of the gallery replaces its own images (the tool refuses otherwise).
        run = [sys.executable, *shown[1:], "--trainer.default_root_dir", str(logs), "--overwrite"]
        print(f"{name}: {shlex.join(shown)}", flush=True)
        start = time.perf_counter()
        subprocess.run(run, cwd=REPO, env=env, check=True)
        seconds = time.perf_counter() - start
        versions = sorted((REPO / logs / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
        compress(name)
        record[name] = {
            "command": shlex.join(shown),
            "network": f"{args.backbone} from {Path(args.weights).name}",
            "seconds": round(seconds),
            "final_loss": final_loss(versions[-1]) if versions else None,
        }
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"  {seconds:.0f} s, wrote docs/gallery/{name}.jpg", flush=True)


if __name__ == "__main__":
    main()
