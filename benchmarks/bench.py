#!/usr/bin/env python
"""Benchmark of nst-lightning: the project's L-BFGS iteration against a plain reference and the floor.

Run from the repository root (see the README's "Benchmarks" section)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench.py                 # 256 and 512 px, ~10-15 min on 2 cores
    python benchmarks/bench.py --quick                                   # 256 px only, no compile, ~2 min
    python benchmarks/bench.py --sizes 512 --repeats 7 --json out.json
    python benchmarks/bench.py --device cuda --precisions 32-true bf16-mixed 16-mixed

What one run measures, in one process (the memory check in child processes):

- **project**: one L-BFGS iteration of :class:`nst_lightning.StyleTransfer` (random weights) through a
  real ``Trainer`` on the shipped Tübingen / Starry Night pair: the time from ``on_train_batch_start``
  to ``on_train_batch_end``, i.e. ``training_step`` with the optimiser step, the closure and the
  logging. Eager and, with ``--compile`` (default ``both``), with ``compile=True``; the compile's
  one-off cost (first step minus a median step) is reported. Closure evaluations per iteration come
  from the module's own ``closure_evaluations`` metric.
- **reference**: the same iteration of ``benchmarks/reference.py``, a tutorial-style implementation
  (full VGG-19, targets computed once, nothing else optimised), same weights, same loss function.
- **floor**: the truncated VGG-19's convolutions alone, each forward plus its backward to the input,
  at the shapes they have in the network, in contiguous and in channels-last layout (the faster
  counts): what no implementation of this loss can go below without changing the arithmetic.

Each ``--precision`` (default 32-true, plus bf16-mixed on a CPU with AMX, where an unset precision
becomes it) gets a row: the project and the floor at that precision (the floor in the dtype its
convolutions run in), against the float32 reference; compiled only in the first row.

Every round runs each variant ``--steps`` times, the variants' order rotating between rounds; the
figures are medians over all rounds, so load from other processes hits all variants alike. Also:
peak RSS (``ru_maxrss``) of this process, the L-BFGS history overhead, a whole-run figure (300
iterations at 512 px: a proxy built from the measured parts, or with ``--whole-run full`` the real
run) and the memory estimator (:mod:`nst_lightning.memory`) against the measured peak RSS of a child
process per size. On a CUDA device, ``--precisions`` adds 32-true / bf16-mixed / 16-mixed at
``--gpu-sizes``: iterations per second and the final loss against 32-true. Time to quality (what
reaches the seed's final loss soonest) is ``benchmarks/time_to_quality.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, even where another copy is installed
sys.path.insert(0, str(REPO / "benchmarks"))

CONTENT = REPO / "nst_lightning" / "samples" / "content_tubingen.jpg"
STYLE = REPO / "nst_lightning" / "samples" / "style_starry_night.jpg"
WHOLE_RUN_STEPS, WHOLE_RUN_SIZE = 300, 512
REFERENCE_HISTORY = 100  # torch's L-BFGS default, which the tutorial-style reference keeps
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="data.image_size values (longest side)")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds per size (default 5)")
    p.add_argument("--steps", type=int, default=2, help="iterations per variant per round (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=20.0,
        help="before each round, wait up to this many seconds for other processes to leave the CPUs idle",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--precision",
        nargs="+",
        default=None,
        help="precisions of the main table, a row each (default 32-true, plus bf16-mixed on a CPU with AMX)",
    )
    p.add_argument("--compile", choices=["off", "on", "both"], default="both", help="project variants (default both)")
    p.add_argument(
        "--whole-run",
        choices=["proxy", "full", "off"],
        default="proxy",
        help="300 iterations at 512 px: proxy from the measured parts (default) or the real run",
    )
    p.add_argument(
        "--compile-cache",
        choices=["fresh", "keep"],
        default="fresh",
        help="fresh (default): an empty inductor cache, so the compile's one-off cost is a first run's",
    )
    p.add_argument("--memory", choices=["on", "off"], default="on", help="estimator vs measured RSS (children)")
    p.add_argument(
        "--precisions",
        nargs="+",
        default=["32-true", "bf16-mixed", "16-mixed"],
        help="mixed-precision section, CUDA only",
    )
    p.add_argument("--gpu-sizes", type=int, nargs="+", default=[512, 1024], help="sizes of the CUDA precision section")
    p.add_argument("--gpu-steps", type=int, default=50, help="steps for the final-loss agreement (CUDA)")
    p.add_argument("--quick", action="store_true", help="256 px, 3 rounds of 1 step, no compile, short memory check")
    p.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    p.add_argument("--memory-child", nargs=3, type=int, metavar=("SIZE", "HISTORY", "STEPS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.steps, args.compile = [256], 3, 1, "off"
        args.gpu_sizes, args.gpu_steps = [512], 20
    return args


# --------------------------------------------------------------------------------------------- set-up


def setup_torch(args: argparse.Namespace):
    if args.compile != "off" and args.compile_cache == "fresh" and not args.memory_child:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nst-bench-inductor-")
    import torch

    from nst_lightning.runtime import keep_freed_memory, physical_cores

    keep_freed_memory()  # as cli.py does (it applies to the reference and the floor alike)
    args.threads = args.threads or physical_cores()
    if args.precision is None:  # what a run without trainer.precision gets here, beside float32
        from nst_lightning.runtime import automatic_precision

        args.precision = list(dict.fromkeys(["32-true", automatic_precision(accelerator(args.device)) or "32-true"]))
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")  # random weights, few workers, eval-mode modules: all expected here
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench.py: --device cuda but torch sees no CUDA device")
    return torch


def sync_fn(device: str):
    import torch

    if device.startswith("cuda"):
        return torch.cuda.synchronize
    return lambda: None


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# A sample is "clean" when other processes used less than this share of one core while it ran.
CLEAN_OTHERS = 0.1


def _busy_cpu_s() -> float:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or NaN."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return float("nan")
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Clock:
    """Times one piece of work: its wall time and the cores other processes kept busy meanwhile
    (from /proc/stat minus this process's own CPU time), to tell clean samples from disturbed ones."""

    def __init__(self, device: str) -> None:
        self.sync = sync_fn(device)
        self.times: list[float] = []
        self.others: list[float] = []

    def start(self) -> None:
        self.sync()
        self._busy, self._own, self._t = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()

    def stop(self, record: bool = True) -> float:
        self.sync()
        wall = time.perf_counter() - self._t
        others = ((_busy_cpu_s() - self._busy) - (_own_cpu_s() - self._own)) / wall
        if record:
            self.times.append(wall)
            self.others.append(max(others, 0.0))
        return wall

    def summary(self) -> dict:
        clean = [t for t, o in zip(self.times, self.others, strict=True) if o < CLEAN_OTHERS]
        return {
            "s_per_iter": median(self.times),
            "clean_s_per_iter": median(clean),
            "clean_samples": len(clean),
            "samples": self.times,
            "others_cores": self.others,
        }


def others_now(seconds: float = 1.0) -> float:
    """Cores that other processes keep busy, measured over ``seconds``."""
    busy, own = _busy_cpu_s(), _own_cpu_s()
    time.sleep(seconds)
    return ((_busy_cpu_s() - busy) - (_own_cpu_s() - own)) / seconds


def wait_quiet(limit_s: float) -> float:
    """Waits (at most ``limit_s``) until other processes leave the CPUs idle; returns the wait."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        if not others_now(1.0) >= 0.05:  # NaN (no /proc/stat) counts as quiet
            break
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec() makes
    anew; ru_maxrss would carry a parent's high-water mark over into a child process."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def accelerator(device: str) -> str:
    return "gpu" if device.startswith("cuda") else "cpu"


# --------------------------------------------------------------------------------------------- variants


class Project:
    """The real module and data module, driven by real ``Trainer.fit`` calls of a few steps each.

    The module keeps its image and targets between fits (``setup`` runs once); each fit builds a new
    optimiser, so the L-BFGS history stays short here: its cost at full length is measured apart.
    """

    def __init__(self, size: int, device: str, precision: str, compile: bool, **module_kwargs) -> None:
        import torch

        from nst_lightning import StyleTransfer, StyleTransferDataModule

        if compile:
            # Each size compiles afresh with static shapes, as in a real (one-size) run; without the
            # reset, a second size would recompile with dynamic shapes.
            torch._dynamo.reset()
        self.device, self.precision = device, precision
        self.module = StyleTransfer(weights="random", compile=compile, **module_kwargs)
        self.data = StyleTransferDataModule(str(CONTENT), str(STYLE), image_size=size)
        self.clock = Clock(device)
        self.evaluations: list[float] = []
        self.first_fit_s: float | None = None
        self.first_step_s: float | None = None

    def fit(self, steps: int, record: bool = True) -> list[float]:
        from lightning import Callback, Trainer

        clock = self.clock
        times, evals = [], []

        class StepTimer(Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                clock.start()

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                times.append(clock.stop(record))
                evals.append(float(trainer.callback_metrics["closure_evaluations"]))

        trainer = Trainer(
            accelerator=accelerator(self.device),
            devices=1,
            precision=self.precision,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[StepTimer()],
        )
        start = time.perf_counter()
        trainer.fit(self.module, datamodule=self.data)
        if self.first_fit_s is None:
            self.first_fit_s = time.perf_counter() - start
            self.first_step_s = times[0]
        if record:
            self.evaluations += evals
        return times

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.image.shape[-2:])

    def initial_loss(self) -> float:
        import torch

        with torch.no_grad():
            return float(self.module(self.data.content_image.to(self.module.image.device))["total"])


class ReferenceRun:
    def __init__(self, project: Project, device: str) -> None:
        from reference import Reference

        from nst_lightning.features import load_backbone

        data = project.data
        cnn = load_backbone("vgg19", "random")  # the same seeded weights as the project's extractor
        self.ref = Reference(cnn, data.content_image.to(device), data.style_image.to(device))
        self.clock = Clock(device)

    def run(self, steps: int, record: bool = True) -> None:
        for _ in range(steps):
            self.clock.start()
            self.ref.step()
            self.clock.stop(record)


# The dtype the convolutions run in under each precision (autocast's choice for conv2d).
CONV_DTYPES = {"32-true": "float32", "bf16-mixed": "bfloat16", "16-mixed": "float16"}


class Floor:
    """The extractor's convolutions alone: forward and backward to the input, at their real shapes,
    in the dtype that ``precision`` runs them in (bfloat16 under bf16-mixed, as autocast would)."""

    def __init__(self, extractor, height: int, width: int, device: str, precision: str = "32-true") -> None:
        import torch
        from torch import nn

        if precision == "16-mixed" and not device.startswith("cuda"):
            precision = "bf16-mixed"  # as Lightning runs it on a CPU
        self.dtype = dtype = getattr(torch, CONV_DTYPES.get(precision, "float32"))
        self.gflop = 0.0
        shapes = []
        with torch.no_grad():
            x = torch.zeros(1, 3, height, width, device=device)
            for layer in extractor.body:
                if isinstance(layer, nn.Conv2d):
                    y = layer(x)
                    shapes.append((layer, tuple(x.shape)))
                    # forward + backward to the input: 2 * (2 * Cin * 9 * Cout * H * W)
                    self.gflop += 4 * layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1] * y.numel() / 1e9
                    x = y
                else:
                    x = layer(x)
        self.layouts = {}
        for name, fmt in (("contiguous", torch.contiguous_format), ("channels_last", torch.channels_last)):
            convs = []
            for layer, shape in shapes:
                inp = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
                weight = layer.weight.detach().to(dtype).contiguous(memory_format=fmt)
                bias = layer.bias.detach().to(dtype)
                out = torch.nn.functional.conv2d(inp, weight, bias, layer.stride, layer.padding, layer.dilation)
                grad = torch.randn_like(out)
                convs.append((inp, weight, bias, grad, layer))
            self.layouts[name] = convs
        self.clocks = {name: Clock(device) for name in self.layouts}

    def _once(self, convs) -> None:
        import torch

        for inp, weight, bias, grad, layer in convs:
            torch.nn.functional.conv2d(inp, weight, bias, layer.stride, layer.padding, layer.dilation)
            torch.ops.aten.convolution_backward(
                grad, inp, weight, None, layer.stride, layer.padding, layer.dilation,
                False, [0, 0], 1, [True, False, False],
            )  # fmt: skip

    def run(self, steps: int, record: bool = True) -> None:
        for name, convs in self.layouts.items():
            for _ in range(steps):
                self.clocks[name].start()
                self._once(convs)
                self.clocks[name].stop(record)

    def best(self) -> str:
        """The faster layout."""
        return min(self.clocks, key=lambda k: median(self.clocks[k].times))


def gram_gflop(module) -> float:
    """Forward plus backward FLOPs of the Gram products (one product each way)."""
    import torch

    with torch.no_grad():
        features = module.extractor(module.image.detach())
    total = 0.0
    for layer in module.style_layers:
        b, c, h, w = features[layer].shape
        total += 2 * (2 * b * c * c * h * w)
    return total / 1e9


# --------------------------------------------------------------------------------------------- sections


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
        floor = Floor(any_project.module.extractor, height, width, args.device, precision)
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
    """Loss of the content image by the project's module and by a fresh reference (same weights)."""
    from reference import Reference

    from nst_lightning.features import load_backbone

    data = project.data
    device = project.module.image.device
    ref = Reference(load_backbone("vgg19", "random"), data.content_image.to(device), data.style_image.to(device))
    ours, theirs = project.initial_loss(), float(ref.loss())
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


def project_default(name: str):
    """A default of ``StyleTransfer`` (``lbfgs_history_size``, ``float32_final_steps``)."""
    import inspect

    from nst_lightning.module import StyleTransfer

    return inspect.signature(StyleTransfer).parameters[name].default


def whole_run(args, results: dict) -> dict:
    """300 iterations at 512 px: the real run (``--whole-run full``) or the proxy, at each precision.

    A mixed-precision run keeps its default float32 finish: its proxy is the mixed-precision
    iteration times the steps before the finish plus the float32 iteration times the finish.
    """
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
    ours = project_default("lbfgs_history_size")
    overheads = {m: lbfgs_overhead(args, height, width, m) for m in sorted({ours, REFERENCE_HISTORY})}
    out.update(lbfgs=overheads[ours], lbfgs_reference=overheads[REFERENCE_HISTORY])
    finish = project_default("float32_final_steps")
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


def memory_child(size: int, history: int, steps: int) -> None:
    """(In a child process.) Peak RSS of a run of ``steps`` iterations, and the estimate."""
    torch = sys.modules["torch"]
    baseline = peak_rss_mib()
    project = Project(size, "cpu", "32-true", compile=False, lbfgs_history_size=history)
    project.fit(steps, record=False)
    held = len(project.module.optimizers().optimizer.state[project.module.image]["old_dirs"])
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


def memory_check(args) -> list[dict]:
    """Measured peak RSS vs :func:`nst_lightning.memory.estimate_peak`, one child process per case
    (``ru_maxrss`` is a process-wide high-water mark). The history is filled to its length."""
    cases = [(size, 20, 22) for size in args.sizes if size <= 512]
    if not args.quick and 256 in args.sizes:
        history = project_default("lbfgs_history_size")
        cases.append((256, history, history + 2))  # the default history, full
    if args.quick:
        cases = [(size, 5, 6) for size in args.sizes if size <= 512]
    rows = []
    for size, history, steps in cases:
        print(f"  memory: {size} px, history {history}, {steps} steps (child process) ...", flush=True)
        command = [sys.executable, __file__, "--threads", str(args.threads), "--memory-child", str(size), str(history)]
        command.append(str(steps))
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if done.returncode != 0 or not lines:
            rows.append({"size": size, "history_size": history, "error": done.stderr.strip()[-2000:]})
            continue
        row = json.loads(lines[-1])
        row["error_total"] = row["estimate_mib"] / row["peak_rss_mib"] - 1
        rows.append(row)
    return rows


def precision_section(args) -> dict:
    """CUDA only: iterations per second at each precision and size, and the final loss after
    ``--gpu-steps`` iterations against 32-true from the same start."""
    if not args.device.startswith("cuda"):
        return {"status": "skipped: no CUDA device in this run (GPU figures not yet measured)"}
    rows = []
    for size in args.gpu_sizes:
        finals = {}
        for precision in args.precisions:
            torch = sys.modules["torch"]
            torch.cuda.reset_peak_memory_stats()
            # float32_final_steps=0: the precision's own iterations and loss, without the float32 finish.
            project = Project(size, args.device, precision, compile=False, float32_final_steps=0)
            project.fit(1, record=False)  # setup and warm-up
            times = project.fit(args.gpu_steps)
            with torch.no_grad():
                final = float(project.module(project.module.image)["total"])
            finals[precision] = final
            step = median(times)
            from nst_lightning.memory import estimate_peak

            height, width = project.shape
            estimate = estimate_peak(height, width, precision=precision, weights="random", device="cuda")
            rows.append(
                {
                    "size": size,
                    "shape": list(project.shape),
                    "precision": precision,
                    "s_per_iter": step,
                    "iter_per_s": 1 / step,
                    "final_loss": final,
                    "steps": 1 + args.gpu_steps,
                    "max_memory_allocated_mib": torch.cuda.max_memory_allocated() / MIB,
                    "max_memory_reserved_mib": torch.cuda.max_memory_reserved() / MIB,
                    "estimate_mib": estimate.total / MIB,
                }
            )
            print(f"  [{size} px] {precision}: {1 / step:.2f} it/s, final loss {final:.4g}", flush=True)
        for row in rows:
            if row["size"] == size and "32-true" in finals:
                row["final_loss_vs_32_true"] = row["final_loss"] / finals["32-true"] - 1
    return {"rows": rows}


# --------------------------------------------------------------------------------------------- report


def fmt_s(value: float) -> str:
    return f"{value:.3f}" if value == value else "–"


def fmt_ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if a == a and b == b else "–"


def report(results: dict) -> str:
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
    mem = results.get("memory")
    if mem:
        lines += ["", "| size (HxW) | L-BFGS history | measured peak RSS | estimate | error |", "|---|---|---|---|---|"]
        for row in mem:
            if "error" in row:
                lines.append(f"| {row['size']} | {row['history_size']} | failed: {row['error'][-200:]} | | |")
                continue
            lines.append(
                f"| {row['size']} ({row['shape'][0]}x{row['shape'][1]}) | {row['history_held']}/{row['history_size']} "
                f"| {row['peak_rss_mib']:.0f} MiB | {row['estimate_mib']:.0f} MiB | {row['error_total']:+.0%} |"
            )
    lines.append("")
    lines.append(f"Peak RSS of the benchmark process: {results['peak_rss_mib']:.0f} MiB")
    prec = results["precision"]
    if "rows" in prec:
        lines += [
            "",
            "| size | precision | it/s | final loss | vs 32-true | max allocated | max reserved | estimate |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in prec["rows"]:
            lines.append(
                f"| {row['size']} | {row['precision']} | {row['iter_per_s']:.2f} | {row['final_loss']:.5g} "
                f"| {row.get('final_loss_vs_32_true', float('nan')):+.2%} | {row['max_memory_allocated_mib']:.0f} MiB "
                f"| {row['max_memory_reserved_mib']:.0f} MiB | {row['estimate_mib']:.0f} MiB |"
            )
    else:
        lines.append(f"Mixed precision: {prec['status']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch = setup_torch(args)
    if args.memory_child:
        memory_child(*args.memory_child)
        return
    started = time.perf_counter()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results: dict = {
        "environment": {
            "torch": torch.__version__,
            "device": device_name,
            "cpu": cpu,
            "threads": args.threads,
            "precision": args.precision,
            "repeats": args.repeats,
            "steps": args.steps,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default") if args.compile != "off" else None,
            "load_average_start": os.getloadavg(),
        },
        "sizes": [],
    }
    for size in args.sizes:
        print(f"size {size} ...", flush=True)
        results["sizes"] += bench_size(args, size)
    results["whole_run"] = whole_run(args, results)
    results["memory"] = memory_check(args) if args.memory == "on" and not args.device.startswith("cuda") else []
    results["precision"] = precision_section(args)
    results["peak_rss_mib"] = peak_rss_mib()
    results["environment"]["load_average_end"] = os.getloadavg()
    results["environment"]["wall_s"] = time.perf_counter() - started
    print()
    print(report(results))
    print(f"\n(benchmark wall time {results['environment']['wall_s'] / 60:.1f} min)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    if Path(cache).name.startswith("nst-bench-inductor-"):
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


if __name__ == "__main__":
    main()
