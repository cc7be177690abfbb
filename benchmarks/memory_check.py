#!/usr/bin/env python
"""Memory: the estimate of :mod:`nst_lightning.memory` against the measured peak RSS of a real run, one child
process per case (peak RSS is a process-wide high-water mark); the L-BFGS history filled to its length.

    python benchmarks/memory_check.py --sizes 256 512 [--quick]
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
    from nst_lightning.memory import estimate_peak

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


def memory_check(sizes: list[int], threads: int, quick: bool = False) -> list[dict]:
    """Measured peak RSS vs :func:`nst_lightning.memory.estimate_peak` at each of ``sizes`` (up to 512 px),
    a history of 20 filled; at 256 px also the default history, full (not in a ``quick`` check)."""
    from nst_lightning.checks import LBFGS_HISTORY_SIZE

    cases = [(size, 5, 6) if quick else (size, 20, 22) for size in sizes if size <= 512]
    if not quick and 256 in sizes:
        cases.append((256, LBFGS_HISTORY_SIZE, LBFGS_HISTORY_SIZE + 2))
    rows = []
    for size, history, steps in cases:
        print(f"  memory: {size} px, history {history}, {steps} steps (child process) ...", flush=True)
        command = [sys.executable, __file__, "--threads", str(threads), "--memory-child", str(size), str(history)]
        done = subprocess.run([*command, str(steps)], capture_output=True, text=True, check=False)
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
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['size']} | {row['history_size']} | failed: {row['error'][-200:]} | | |")
            continue
        lines.append(
            f"| {row['size']} ({row['shape'][0]}x{row['shape'][1]}) | {row['history_held']}/{row['history_size']} "
            f"| {row['peak_rss_mib']:.0f} MiB | {row['estimate_mib']:.0f} MiB | {row['error_total']:+.0%} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="data.image_size values (up to 512)")
    parser.add_argument("--quick", action="store_true", help="a history of 5 only")
    parser.add_argument("--memory-child", nargs=3, type=int, metavar=("SIZE", "HISTORY", "STEPS"), help=SUPPRESS)
    args = parser.parse_args(argv)
    _, threads = common.setup_torch(args.threads)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    rows = memory_check(args.sizes, threads, args.quick)
    print("\n".join(report(rows)))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
