"""The benchmarks' one small helper: this checkout's package on the path, the sample pair, a clock that tells
clean samples from disturbed ones, peak memory, torch's set-up, and the project driven by a real Trainer."""

from __future__ import annotations

import argparse
import os
import resource
import statistics
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
MIB = 2**20


def base_parser(doc: str) -> argparse.ArgumentParser:
    """A parser with what every benchmark takes: threads, device, a JSON file for the results."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--json", type=Path, default=None, help="also write all results to this JSON file")
    return parser


def setup_torch(threads: int | None = None, device: str = "cpu", fresh_inductor_cache: bool = False):
    """Imports torch as a run would have it (one thread per physical core, freed memory kept, as cli.py
    does: it applies to the reference and the floor alike); returns (torch, threads)."""
    if fresh_inductor_cache:
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="nst-bench-inductor-")
    import torch

    from nst_lightning.run.runtime import keep_freed_memory, physical_cores

    keep_freed_memory()
    threads = threads or physical_cores()
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")  # random weights, few workers, eval-mode modules: all expected here
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"{Path(sys.argv[0]).name}: --device cuda but torch sees no CUDA device")
    return torch, threads


def drop_fresh_inductor_cache() -> None:
    """Removes the inductor cache :func:`setup_torch` made, if it made one."""
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    if Path(cache).name.startswith("nst-bench-inductor-"):
        import shutil

        shutil.rmtree(cache, ignore_errors=True)


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


def sample_objective(weights: str, size: int, device: str = "cpu"):
    """The default layers' objective on the VGG-16 of ``weights``, its targets from the sample pair at ``size``
    px; and the content image (where a run starts): what the tiling benchmarks evaluate, whole or over tiles."""
    import torch

    from nst_lightning import StyleTransferDataModule
    from nst_lightning.core.features import FeatureExtractor
    from nst_lightning.core.objective import Objective
    from nst_lightning.names import CONTENT_LAYERS, STYLE_LAYERS

    extractor = FeatureExtractor([*CONTENT_LAYERS, *STYLE_LAYERS], "vgg16", weights, normalize=True).to(device)
    objective = Objective(extractor, CONTENT_LAYERS, STYLE_LAYERS, [1.0] * len(STYLE_LAYERS)).to(device)
    data = StyleTransferDataModule(str(CONTENT), str(STYLE), image_size=size)
    data.setup("fit")
    with torch.no_grad():
        objective.set_targets(data.inputs(), device)
    return objective, data.inputs().content.to(device)


def accelerator(device: str) -> str:
    return "gpu" if device.startswith("cuda") else "cpu"


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

            def on_losses(self, trainer, pl_module, rows):  # the module's loss log, a few steps late
                evals.extend(row.values["closure_evaluations"] for row in rows)

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
