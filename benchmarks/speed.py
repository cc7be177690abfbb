#!/usr/bin/env python
"""The timing harness: one L-BFGS iteration of the project against the plain reference and the floor, and a
whole run's time, in one process, the variants interleaved.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py                 # 256 and 512 px, ~10 min on 2 cores
    python benchmarks/speed.py --quick                                   # 256 px only, no compile
    python benchmarks/speed.py --sizes 512 --repeats 7 --precision 32-true bf16-mixed

- **project**: one L-BFGS iteration of :class:`nst_lightning.StyleTransfer` (random weights) through a
  real ``Trainer`` on the shipped Tübingen / Starry Night pair: the time from ``on_train_batch_start``
  to ``on_train_batch_end``, i.e. ``training_step`` with the optimiser step, the closure and the
  logging. Eager and, with ``--compile`` (default ``both``), with ``compile=True``; the compile's
  one-off cost (first step minus a median step) is reported. Closure evaluations per iteration come
  from the module's own ``closure_evaluations`` metric.
- **reference**: the same iteration of ``benchmarks/reference.py``, a tutorial-style implementation
  (full VGG-19, targets computed once, nothing else optimised), same weights, same loss function.
- **floor**: ``benchmarks/floor.py``, the truncated VGG-19's convolutions alone.

Each ``--precision`` (default 32-true, plus bf16-mixed on a CPU with AMX, where an unset precision
becomes it) gets a row: the project and the floor at that precision (the floor in the dtype its
convolutions run in), against the float32 reference; compiled only in the first row. Every round runs
each variant ``--steps`` times, the variants' order rotating between rounds; the figures are medians
over all rounds, so load from other processes hits all variants alike. Also: the L-BFGS history's own
cost, and a whole run (300 iterations at 512 px: a proxy built from the measured parts, or with
``--whole-run full`` the real run).
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
import time

import common
from common import CLEAN_OTHERS, Clock, Project, median, peak_rss_mib, sync_fn, wait_quiet
from floor import Floor

WHOLE_RUN_STEPS, WHOLE_RUN_SIZE = 300, 512
REFERENCE_HISTORY = 100  # torch's L-BFGS default, which the tutorial-style reference keeps


def add_arguments(parser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="data.image_size values")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per size (default 5)")
    parser.add_argument("--steps", type=int, default=2, help="iterations per variant per round (default 2)")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        help="before each round, wait up to this many seconds for other processes to leave the CPUs idle",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        default=None,
        help="precisions of the main table, a row each (default 32-true, plus bf16-mixed on a CPU with AMX)",
    )
    parser.add_argument("--compile", choices=["off", "on", "both"], default="both", help="project variants")
    parser.add_argument(
        "--whole-run",
        choices=["proxy", "full", "off"],
        default="proxy",
        help="300 iterations at 512 px: proxy from the measured parts (default) or the real run",
    )
    parser.add_argument(
        "--compile-cache",
        choices=["fresh", "keep"],
        default="fresh",
        help="fresh (default): an empty inductor cache, so the compile's one-off cost is a first run's",
    )
    parser.add_argument("--quick", action="store_true", help="256 px, 3 rounds of 1 step, no compile")


def quicken(args) -> None:
    """``--quick``: 256 px, 3 rounds of 1 step, no compile."""
    if args.quick:
        args.sizes, args.repeats, args.steps, args.compile = [256], 3, 1, "off"


def default_precisions(args) -> None:
    """What a run without trainer.precision gets here, beside float32."""
    if args.precision is None:
        from nst_lightning.run.runtime import automatic_precision

        chosen = automatic_precision(common.accelerator(args.device)) or "32-true"
        args.precision = list(dict.fromkeys(["32-true", chosen]))


class ReferenceRun:
    def __init__(self, project: Project, device: str) -> None:
        from reference import Reference

        from nst_lightning.core.backbones import load_backbone

        data = project.data
        cnn = load_backbone("vgg19", "random")  # the same seeded weights as the project's extractor
        self.ref = Reference(cnn, data.content_image.to(device), data.style_image.to(device))
        self.clock = Clock(device)

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            self.clock.start()
            self.ref.step()
            self.clock.stop(record)


def gram_gflop(module) -> float:
    """Forward plus backward FLOPs of the Gram products (one product each way)."""
    import torch

    with torch.no_grad():
        features = module.objective.extractor(module.image.detach())
    total = 0.0
    for layer in module.objective.style_layers:
        b, c, h, w = features[layer].shape
        total += 2 * (2 * b * c * c * h * w)
    return total / 1e9


def project_variants(args) -> list[tuple[str, bool, str]]:
    """(precision, compiled, name) of each project variant: every precision eager, and the first
    one compiled too where ``--compile`` asks for it."""
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    return [
        (precision, compiled, "project+compile" if compiled else "project")
        for index, precision in enumerate(args.precision)
        for compiled in (compiles if index == 0 else [False])
    ]


def bench_size(args, size: int) -> list[dict]:
    """One row per precision of ``args.precision``: the project (eager and, at the first precision,
    compiled) and the floor at that precision, and the float32 reference, all interleaved."""
    variants: dict[str, object] = {}
    projects: dict[str, dict[str, Project]] = {precision: {} for precision in args.precision}
    for precision, compiled, name in project_variants(args):
        # float32_final_steps=0: time the iterations of this precision, not the float32 finish.
        project = Project(size, args.device, precision, compiled, float32_final_steps=0)
        what = "setup and compile" if compiled else "setup"
        print(f"  [{size} px] {name} {precision}: first fit ({what}) ...", flush=True)
        project.fit(1, record=False)  # setup (targets) and, compiled, the compilation
        projects[precision][name] = variants[f"{name}@{precision}"] = project
    any_project = next(iter(projects[args.precision[0]].values()))
    height, width = any_project.shape
    reference = ReferenceRun(any_project, args.device)
    reference.run(1, record=False)
    variants["reference"] = reference
    floors = {}
    for precision in args.precision:
        floor = Floor(any_project.module.objective.extractor, height, width, args.device, precision)
        floor.run(1, record=False)
        floors[precision] = variants[f"floor@{precision}"] = floor
    names = list(variants)
    waited = 0.0
    for round_index in range(args.repeats):
        waited += wait_quiet(args.wait_quiet)
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            variant = variants[name]
            if isinstance(variant, Project):
                variant.fit(args.steps)
            else:
                variant.run(args.steps)
        print(f"  [{size} px] round {round_index + 1}/{args.repeats} done", flush=True)

    shared = {
        "size": size,
        "shape": [height, width],
        "waited_for_quiet_s": waited,
        "reference": {
            **reference.clock.summary(),
            "closure_evaluations_per_iter": reference.ref.evaluations / (1 + args.repeats * args.steps),
        },
        "gram_gflop": gram_gflop(any_project.module),
        # The reference computes the same function: its loss of the content image must agree.
        "loss_agreement": loss_agreement(any_project),
    }
    rows = []
    for precision in args.precision:
        row = {**shared, "precision": precision}
        for name, project in projects[precision].items():
            step = median(project.clock.times)
            row[name] = {
                **project.clock.summary(),
                "closure_evaluations_per_iter": statistics.mean(project.evaluations),
                "first_fit_s": project.first_fit_s,
                "first_step_s": project.first_step_s,
            }
            if name == "project+compile":
                row[name]["compile_one_off_s"] = project.first_step_s - step
        floor = floors[precision]
        layout = floor.best()
        row["floor"] = {
            **floor.clocks[layout].summary(),
            "layout": layout,
            "dtype": str(floor.dtype).replace("torch.", ""),
            "gflop": floor.gflop,
            "gflop_per_s": floor.gflop / median(floor.clocks[layout].times),
            "other_layout": {name: clock.summary() for name, clock in floor.clocks.items() if name != layout},
        }
        eager = projects[precision].get("project", any_project)
        row["setup_s"] = eager.first_fit_s - eager.first_step_s  # fit overhead and targets, once
        rows.append(row)
    rows[0]["peak_rss_mib_so_far"] = peak_rss_mib()
    return rows


def loss_agreement(project: Project) -> dict:
    """Loss of the content image by the project's objective on the network as it comes (the reference's:
    not normalised, unlike the timed module, whose normalisation is folded into its weights at no cost)
    and by a fresh reference (same weights): the two must compute the same function."""
    import torch
    from reference import Reference

    from nst_lightning import StyleTransfer
    from nst_lightning.core.backbones import load_backbone

    data = project.data
    device = project.module.image.device
    ref = Reference(load_backbone("vgg19", "random"), data.content_image.to(device), data.style_image.to(device))
    plain = StyleTransfer(weights="random", normalize=False).to(device)
    with torch.no_grad():
        plain.set_targets(data.inputs(), device)
        ours = float(plain(data.content_image.to(device))["total"])
    theirs = float(ref.loss())
    return {"project": ours, "reference": theirs, "relative_difference": abs(ours - theirs) / abs(theirs)}


def lbfgs_overhead(args, height: int, width: int, history: int) -> dict:
    """Time L-BFGS spends outside the closure, with a short and with a full history, on a vector of
    the image's size (a cheap, badly conditioned quadratic stands in for the closure)."""
    torch = sys.modules["torch"]
    sync = sync_fn(args.device)
    n = 3 * height * width
    generator = torch.Generator().manual_seed(0)
    scale = torch.logspace(-2, 2, n).index_select(0, torch.randperm(n, generator=generator)).to(args.device)
    x = torch.zeros(n, device=args.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([x], lr=1.0, max_iter=1, history_size=history)
    closure_times: list[float] = []

    def closure():
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = 0.5 * (scale * (x - 1) ** 2).sum()
        loss.backward()
        sync()
        closure_times.append(time.perf_counter() - start)
        return loss

    def timed_steps(k: int) -> float:
        step_times = []
        for _ in range(k):
            closure_times.clear()
            sync()
            start = time.perf_counter()
            optimizer.step(closure)
            sync()
            step_times.append(time.perf_counter() - start - sum(closure_times))
        return median(step_times)

    short = timed_steps(5)
    for _ in range(history):
        optimizer.step(closure)
    full = timed_steps(7)
    held = len(optimizer.state[x]["old_dirs"])
    return {"history_held": held, "short_history_s": short, "full_history_s": full}


def whole_run(args, results: dict) -> dict:
    """300 iterations at 512 px: the real run (``--whole-run full``) or the proxy, at each precision.

    A mixed-precision run keeps its default float32 finish: its proxy is the mixed-precision
    iteration times the steps before the finish plus the float32 iteration times the finish.
    """
    from nst_lightning import StyleTransfer
    from nst_lightning.names import LBFGS_HISTORY_SIZE

    if args.whole_run == "off":
        return {"mode": "off"}
    out: dict = {"mode": args.whole_run, "steps": WHOLE_RUN_STEPS, "size": WHOLE_RUN_SIZE, "runs": {}}
    if args.whole_run == "full":
        for precision, compiled, name in project_variants(args):
            project = Project(WHOLE_RUN_SIZE, args.device, precision, compiled)
            start = time.perf_counter()
            project.fit(WHOLE_RUN_STEPS)
            out["runs"][f"{name}@{precision}"] = {"wall_s": time.perf_counter() - start}
        return out
    rows = {r["precision"]: r for r in results["sizes"] if r["size"] == WHOLE_RUN_SIZE}
    if not rows:
        return {"mode": "proxy", "note": f"{WHOLE_RUN_SIZE} px was not measured in this run"}
    height, width = next(iter(rows.values()))["shape"]
    # The measured iterations carry a near-empty history; add the extra two-loop cost of a growing
    # then full history (linear in its length): sum over i of min(i, m) / m extra steps. The project
    # keeps its default history, the reference torch's 100.
    ours = LBFGS_HISTORY_SIZE
    overheads = {m: lbfgs_overhead(args, height, width, m) for m in sorted({ours, REFERENCE_HISTORY})}
    out.update(lbfgs=overheads[ours], lbfgs_reference=overheads[REFERENCE_HISTORY])
    finish = inspect.signature(StyleTransfer).parameters["float32_final_steps"].default
    float32_row = rows.get("32-true")

    def proxy(row: dict, name: str, history: int) -> dict:
        overhead = overheads[history]
        extra_per_full = max(overhead["full_history_s"] - overhead["short_history_s"], 0.0)
        history_steps = sum(min(i, history) / history for i in range(WHOLE_RUN_STEPS))
        iterations = WHOLE_RUN_STEPS * row[name]["s_per_iter"]
        note = ""
        if row["precision"] != "32-true" and name != "reference":
            if float32_row is None:
                note = f"no float32 finish (32-true not measured): {row['precision']} throughout"
            else:
                mixed = max(WHOLE_RUN_STEPS - finish, 0)
                float32_s = float32_row["project"]["s_per_iter"]
                iterations = mixed * row[name]["s_per_iter"] + (WHOLE_RUN_STEPS - mixed) * float32_s
                note = f"the last {WHOLE_RUN_STEPS - mixed} iterations in float32"
        one_off = row[name].get("compile_one_off_s", 0.0)
        total = row["setup_s"] + one_off + iterations + history_steps * extra_per_full
        return {"wall_s": total, "setup_s": row["setup_s"], "compile_s": one_off, "note": note}

    for precision, row in rows.items():
        for name in ("project", "project+compile"):
            if name in row:
                out["runs"][f"{name}@{precision}"] = proxy(row, name, ours)
    out["runs"]["reference"] = proxy(next(iter(rows.values())), "reference", REFERENCE_HISTORY)
    return out


def fmt_s(value: float) -> str:
    return f"{value:.3f}" if value == value else "–"


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if a == a and b == b else "–"


def report(results: dict) -> list[str]:
    lines = []
    env = results["environment"]
    lines.append(
        f"torch {env['torch']}, device {env['device']} ({env['cpu']}), {env['threads']} threads, "
        f"precisions {', '.join(env['precision'])}, {env['repeats']} rounds x {env['steps']} steps, interleaved; "
        f"a sample is clean when other processes used < {CLEAN_OTHERS} of a core meanwhile. The reference "
        "runs in float32 in every row; the floor in the row's convolution dtype."
    )
    for key, title in (("s_per_iter", "All samples"), ("clean_s_per_iter", "Clean samples only")):
        lines += ["", f"{title} (median seconds per iteration; ratios of medians):", ""]
        lines += [
            "| size (HxW) | precision | project | +compile | reference | floor (layout) | project/ref | project/floor "
            "| +compile/ref | +compile/floor | samples (clean) | others' cores |",
            "|" + "---|" * 12,
        ]
        for r in results["sizes"]:
            p, c, ref, fl = r.get("project"), r.get("project+compile"), r["reference"], r["floor"]
            ps = p[key] if p else float("nan")
            cs = c[key] if c else float("nan")
            rs, fs = ref[key], fl[key]
            measured = [v for v in (p, c, ref, fl) if v]
            counts = "/".join(f"{len(v['samples'])}({v['clean_samples']})" for v in measured)
            others = median([o for v in measured for o in v["others_cores"]])
            lines.append(
                f"| {r['size']} ({r['shape'][0]}x{r['shape'][1]}) | {r['precision']} | {fmt_s(ps)} | {fmt_s(cs)} "
                f"| {fmt_s(rs)} | {fmt_s(fs)} ({fl['layout']}) | {fmt_ratio(ps, rs)} | {fmt_ratio(ps, fs)} "
                f"| {fmt_ratio(cs, rs)} | {fmt_ratio(cs, fs)} | {counts} | {others:.2f} |"
            )
    lines.append("")
    for r in results["sizes"]:
        p, c, fl = r.get("project"), r.get("project+compile"), r["floor"]
        lines.append(
            f"{r['size']} px, {r['precision']}: closure evaluations per iteration "
            f"{(p or c)['closure_evaluations_per_iter']:.2f}; floor {fl['gflop']:.0f} GFLOP in {fl['dtype']} "
            f"at {fl['gflop_per_s']:.0f} GFLOP/s" + (f"; compile one-off {c['compile_one_off_s']:.0f} s" if c else "")
        )
    lines.append("")
    for r in results["sizes"]:
        if r["precision"] != results["sizes"][0]["precision"]:
            continue
        agreement = r["loss_agreement"]
        lines.append(
            f"{r['size']} px: Gram products {r['gram_gflop']:.1f} GFLOP; setup (targets) {r['setup_s']:.2f} s; "
            "loss of the content image: "
            f"project {agreement['project']:.6g}, reference {agreement['reference']:.6g} "
            f"(relative difference {agreement['relative_difference']:.1e})"
        )
    w = results.get("whole_run", {})
    if w.get("runs"):
        parts = []
        for name, run in w["runs"].items():
            parts.append(f"{name} {run['wall_s'] / 60:.1f} min" + (f" ({run['note']})" if run.get("note") else ""))
        lines.append("")
        lines.append(f"Whole run, {w['steps']} iterations at {w['size']} px ({w['mode']}): " + "; ".join(parts))
        if "lbfgs" in w:
            lb = w["lbfgs"]
            lines.append(
                f"L-BFGS outside the closure: {lb['short_history_s'] * 1000:.0f} ms/it with a short history, "
                f"{lb['full_history_s'] * 1000:.0f} ms/it with a full one ({lb['history_held']} pairs)"
            )
        if "lbfgs_reference" in w:
            lb = w["lbfgs_reference"]
            lines.append(
                f"(the reference keeps torch's {lb['history_held']} pairs: "
                f"{lb['full_history_s'] * 1000:.0f} ms/it full)"
            )
    return lines


def environment(args, torch) -> dict:
    import os
    import platform
    from pathlib import Path

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "cpu": cpu,
        "threads": args.threads,
        "precision": args.precision,
        "repeats": args.repeats,
        "steps": args.steps,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default") if args.compile != "off" else None,
        "load_average_start": os.getloadavg(),
    }


def run(args) -> dict:
    """Every size of ``args.sizes`` (a row per precision), then the whole run: the results as a dict."""
    results: dict = {"sizes": []}
    for size in args.sizes:
        print(f"size {size} ...", flush=True)
        results["sizes"] += bench_size(args, size)
    results["whole_run"] = whole_run(args, results)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = common.base_parser(__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    quicken(args)
    fresh = args.compile != "off" and args.compile_cache == "fresh"
    torch, args.threads = common.setup_torch(args.threads, args.device, fresh_inductor_cache=fresh)
    default_precisions(args)
    started = time.perf_counter()
    results = {"environment": environment(args, torch), **run(args)}
    results["peak_rss_mib"] = peak_rss_mib()
    results["environment"]["wall_s"] = time.perf_counter() - started
    print("\n" + "\n".join(report(results)))
    print(f"\nPeak RSS of the benchmark process: {results['peak_rss_mib']:.0f} MiB")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    common.drop_fresh_inductor_cache()


if __name__ == "__main__":
    main()
