#!/usr/bin/env python
"""What giving freed memory back costs: one tiled evaluation of the objective (forward and backward, the
print config's kind) with glibc's heap kept (``runtime.keep_freed_memory``, every run's setting) against
freed memory returned (``runtime.return_freed_memory``, a tight run's: each block of a MiB or more mapped on
its own and unmapped when freed), each in processes of its own, in turn.

    python benchmarks/allocator.py --size 1536 --tile 768 --split pool2 --rounds 2 --repeats 3

Prints, per mode, the median seconds per evaluation, the minor page faults per evaluation and the process's
address-space peak (VmPeak), then the ratio returned / kept.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import common
from common import REPO, median

DEFAULT_WEIGHTS = REPO.parent / "shared" / "weights" / "vgg16_imagenet_keras.pth"
MODES = ("kept", "returned")


def measure(args) -> None:
    """One process: ``args.repeats`` evaluations after one warm-up, in ``args.mode``; prints one JSON line."""
    torch, _ = common.setup_torch(args.threads)  # keeps freed memory, as every run starts
    from nst_lightning.core.tiles import Tiling
    from nst_lightning.core.tiling import evaluate_tiled
    from nst_lightning.run.runtime import return_freed_memory

    if args.mode == "returned" and not return_freed_memory():
        raise SystemExit("allocator.py: glibc's setting could not be changed here (not glibc, or MALLOC_* set)")
    objective, content = common.sample_objective(args.weights, args.size)
    image = torch.nn.Parameter(content.clone())
    split = None if args.split == "none" else args.split
    seconds, faults = [], []
    for _ in range(args.repeats + 1):
        image.grad = None
        before, began = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        evaluate_tiled(objective, image, Tiling(args.tile, split), lambda total: total.backward())
        seconds.append(time.perf_counter() - began)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmPeak:"))
    print(json.dumps({"seconds": seconds[1:], "faults": faults[1:], "vmpeak": peak}))


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--size", type=int, default=1536, help="longest side of the image (default 1536)")
    parser.add_argument("--tile", type=int, default=768, help="tile core size in pixels (default 768)")
    parser.add_argument("--split", default="pool2", help="the last layer over the tiles, or none (default pool2)")
    parser.add_argument("--rounds", type=int, default=2, help="processes per mode, in turn (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="evaluations timed per process (default 3)")
    parser.add_argument("--weights", default=str(DEFAULT_WEIGHTS), help="VGG-16 weights file (default: the shared)")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # one measuring process
    args = parser.parse_args()
    if args.mode:
        measure(args)
        return
    found: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            command = [sys.executable, __file__, "--mode", mode, "--size", str(args.size), "--tile", str(args.tile)]
            command += ["--split", args.split, "--repeats", str(args.repeats), "--weights", args.weights]
            if args.threads:
                command += ["--threads", str(args.threads)]
            out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            found[mode].append(json.loads(out.strip().splitlines()[-1]))
    print(f"{args.size} px over {args.tile} px tiles through {args.split}, {args.rounds} processes per mode in turn")
    print(f"{'freed memory':<14} {'s/evaluation':>13} {'page faults/evaluation':>23} {'VmPeak GiB':>11}")
    summary = {}
    for mode, runs in found.items():
        seconds = median([s for run in runs for s in run["seconds"]])
        faults = median([f for run in runs for f in run["faults"]])
        peak = max(run["vmpeak"] for run in runs) / 2**30
        summary[mode] = {"seconds": seconds, "faults": faults, "vmpeak_gib": peak}
        print(f"{mode:<14} {seconds:>13.2f} {faults:>23,.0f} {peak:>11.2f}")
    print(f"returned / kept: {summary['returned']['seconds'] / summary['kept']['seconds']:.3f}x the time")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "runs": found}, indent=1))


if __name__ == "__main__":
    main()
