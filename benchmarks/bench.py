#!/usr/bin/env python
"""All the benchmarks of one machine in one report: the timing harness (``speed.py``: the project against the
reference and the floor, and a whole run), memory (``memory_check.py``) and, on a GPU, mixed precision
(``gpu_precision.py``). Each of those runs alone too; time to quality is ``time_to_quality.py``.

Run from the repository root (see the README's "Benchmarks" section)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench.py                 # 256 and 512 px, ~10-15 min on 2 cores
    python benchmarks/bench.py --quick                                   # 256 px only, no compile, ~2 min
    python benchmarks/bench.py --sizes 512 --repeats 7 --json out.json
    python benchmarks/bench.py --device cuda --precisions 32-true bf16-mixed 16-mixed
"""

from __future__ import annotations

import json
import os
import time

import common
import gpu_precision
import memory_check
import speed


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__)
    speed.add_arguments(parser)
    gpu_precision.add_arguments(parser)
    parser.add_argument("--memory", choices=["on", "off"], default="on", help="estimator vs measured RSS (children)")
    args = parser.parse_args(argv)
    speed.quicken(args)
    if args.quick:
        args.gpu_sizes, args.gpu_steps = [512], 20
    fresh = args.compile != "off" and args.compile_cache == "fresh"
    torch, args.threads = common.setup_torch(args.threads, args.device, fresh_inductor_cache=fresh)
    speed.default_precisions(args)
    started = time.perf_counter()
    results = {"environment": speed.environment(args, torch), **speed.run(args)}
    on_cpu = not args.device.startswith("cuda")
    measure = args.memory == "on" and on_cpu
    results["memory"] = memory_check.memory_check(args.sizes, args.threads, args.quick) if measure else []
    results["precision"] = gpu_precision.precision_section(args.device, args.gpu_sizes, args.precisions, args.gpu_steps)
    results["peak_rss_mib"] = common.peak_rss_mib()
    results["environment"]["load_average_end"] = os.getloadavg()
    results["environment"]["wall_s"] = time.perf_counter() - started
    lines = speed.report(results)
    if results["memory"]:
        lines += ["", *memory_check.report(results["memory"])]
    lines += ["", f"Peak RSS of the benchmark process: {results['peak_rss_mib']:.0f} MiB"]
    lines += gpu_precision.report(results["precision"])
    print("\n" + "\n".join(lines))
    print(f"\n(benchmark wall time {results['environment']['wall_s'] / 60:.1f} min)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    common.drop_fresh_inductor_cache()


if __name__ == "__main__":
    main()
