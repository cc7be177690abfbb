#!/usr/bin/env python
"""Memory: the estimate of :mod:`nst_lightning.run.memory` against the measured peak RSS of a real run, one child
process per case (peak RSS is a process-wide high-water mark); the L-BFGS history filled to its length.
``--wide-style SIZE``: a thin content (SIZE x 16 px) with a small style upscaled to SIZE x 3/4 SIZE, where the
style's forward pass (when the targets are computed) is the peak; the estimate of the content alone is shown too.

    python benchmarks/memory_check.py --sizes 256 512 [--quick] [--wide-style 768]
"""

from __future__ import annotations

import json
import subprocess
import sys
from argparse import SUPPRESS

import common
from common import MIB, Project, peak_rss_mib


def memory_child(size: int, history: int, steps: int) -> None:
    """(In a child process.) Peak RSS of a run of ``steps`` iterations, and the estimate."""
    torch = sys.modules["torch"]
    baseline = peak_rss_mib()
    project = Project(size, "cpu", "32-true", compile=False, lbfgs_history_size=history)
    project.fit(steps, record=False)
    state = project.module.optimizers().optimizer.state[project.module.image]
    # torch's L-BFGS keeps a list; DeviceLBFGS a ring buffer with a mask of the slots filled.
    held = len(state["old_dirs"]) if "old_dirs" in state else int(state["valid"].sum())
    height, width = project.shape
    from nst_lightning.run.memory import estimate_peak

    estimate = estimate_peak(height, width, weights="random", history_size=history)
    print(
        json.dumps(
            {
                "size": size,
                "shape": [height, width],
                "history_size": history,
                "history_held": held,
                "steps": steps,
                "baseline_rss_mib": baseline,
                "peak_rss_mib": peak_rss_mib(),
                "estimate_mib": estimate.total / MIB,
                "estimate_parts_mib": {k: v / MIB for k, v in estimate.as_dict().items()},
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def held_pairs(state: dict) -> int:
    """Curvature pairs an L-BFGS state holds: DeviceLBFGS's valid ring slots, or torch's list."""
    return int(state["valid"].sum()) if "valid" in state else len(state["old_dirs"])


def wide_style_child(size: int, steps: int) -> None:
    """(In a child process.) Peak RSS of a run on a ``size`` x 16 content with a 64x48 style upscaled to
    ``size`` px, the estimate the run checks (:func:`~nst_lightning.run.plan.plan_run`) and the content's alone."""
    import tempfile
    from pathlib import Path

    import numpy as np
    from lightning import Trainer
    from PIL import Image

    from nst_lightning import StyleTransfer, StyleTransferDataModule
    from nst_lightning.run.memory import estimate_peak
    from nst_lightning.run.plan import plan_run

    folder = Path(tempfile.mkdtemp(prefix="nst-wide-style-"))
    rng = np.random.default_rng(0)
    for name, (h, w) in {"content.png": (16, size), "style.png": (48, 64)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    baseline = peak_rss_mib()
    module = StyleTransfer(weights="random", lbfgs_history_size=5, content_layers=["relu4_2"])
    data = StyleTransferDataModule(str(folder / "content.png"), str(folder / "style.png"), image_size=size)
    data.setup("fit")
    estimate, _, _ = plan_run(
        data, [size], module.objective.extractor, module.hparams, "32-true", "cpu", available=2**62
    )
    content_only = estimate_peak(16, size, weights="random", history_size=5, content_layers=["relu4_2"])
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    print(
        json.dumps(
            {
                "size": f"wide style {size}",
                "shape": [16, size],
                "style": list(data.style_sizes()[0]),
                "history_size": 5,
                "history_held": held_pairs(module.optimizers().optimizer.state[module.image]),
                "steps": steps,
                "baseline_rss_mib": baseline,
                "peak_rss_mib": peak_rss_mib(),
                "estimate_mib": estimate.total / MIB,
                "content_only_estimate_mib": content_only.total / MIB,
                "estimate_parts_mib": {k: v / MIB for k, v in estimate.as_dict().items()},
            }
        )
    )


def memory_check(sizes: list[int], threads: int, quick: bool = False, wide_style: int | None = None) -> list[dict]:
    """Measured peak RSS vs :func:`nst_lightning.run.memory.estimate_peak` at each of ``sizes`` (up to 512 px),
    a history of 20 filled; at 256 px also the default history, full (not in a ``quick`` check); and the
    ``wide_style`` case (see the module's docstring)."""
    from nst_lightning.names import LBFGS_HISTORY_SIZE

    cases = [(size, 5, 6) if quick else (size, 20, 22) for size in sizes if size <= 512]
    if not quick and 256 in sizes:
        cases.append((256, LBFGS_HISTORY_SIZE, LBFGS_HISTORY_SIZE + 2))
    commands = [
        (size, history, ["--memory-child", str(size), str(history), str(steps)]) for size, history, steps in cases
    ]
    if wide_style:
        commands.append((f"wide style {wide_style}", 5, ["--wide-style-child", str(wide_style), "7"]))
    rows = []
    for size, history, args in commands:
        print(f"  memory: {size} px, history {history} (child process) ...", flush=True)
        command = [sys.executable, __file__, "--threads", str(threads), *args]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            rows.append({"size": size, "history_size": history, "error": done.stderr.strip()[-2000:]})
            continue
        row = json.loads(lines[-1])
        row["error_total"] = row["estimate_mib"] / row["peak_rss_mib"] - 1
        rows.append(row)
    return rows


def report(rows: list[dict]) -> list[str]:
    lines = ["| size (HxW) | L-BFGS history | measured peak RSS | estimate | error |", "|---|---|---|---|---|"]
    notes = []
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['size']} | {row['history_size']} | failed: {row['error'][-200:]} | | |")
            continue
        lines.append(
            f"| {row['size']} ({row['shape'][0]}x{row['shape'][1]}) | {row['history_held']}/{row['history_size']} "
            f"| {row['peak_rss_mib']:.0f} MiB | {row['estimate_mib']:.0f} MiB | {row['error_total']:+.0%} |"
        )
        if "content_only_estimate_mib" in row:
            notes.append(
                f"{row['size']}: style {row['style'][0]}x{row['style'][1]} px; the content's estimate alone "
                f"{row['content_only_estimate_mib']:.0f} MiB"
            )
    return lines + notes


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="data.image_size values (up to 512)")
    parser.add_argument("--quick", action="store_true", help="a history of 5 only")
    parser.add_argument("--wide-style", type=int, default=None, metavar="SIZE", help="also a thin content, wide style")
    parser.add_argument("--memory-child", nargs=3, type=int, metavar=("SIZE", "HISTORY", "STEPS"), help=SUPPRESS)
    parser.add_argument("--wide-style-child", nargs=2, type=int, metavar=("SIZE", "STEPS"), help=SUPPRESS)
    args = parser.parse_args(argv)
    _, threads = common.setup_torch(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    if args.wide_style_child:
        wide_style_child(*args.wide_style_child)
        return
    rows = memory_check(args.sizes, threads, args.quick, args.wide_style)
    print("\n".join(report(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
