#!/usr/bin/env python
"""Time to quality: which way of running reaches the seed's final loss soonest.

The baseline (the first ``--run``) is the seed's run: 300 single-scale L-BFGS iterations at the final
size. Every other run is a *lever*: other optimiser settings, or stages at other sizes (coarse to
fine), each stage starting from the previous stage's image, upsampled. All are judged by one
function, the default objective at the final size on the shipped Tübingen / Starry Night pair: a
lever whose own loss differs (other weights at a coarse stage) is judged by a separate module with
the default settings, with the clock paused.

Two clocks, because two shared cores make wall time noisy:

- **wall**: seconds of the run itself (set-up and judging excluded);
- **modelled**: the run's function evaluations at each size times the seconds one evaluation takes
  at that size, measured in one interleaved loop over the sizes (so load from other processes hits
  every size alike). Evaluations are the cost that differs between levers; L-BFGS's own vector
  arithmetic is a few per cent on top, the same for all.

Per run it prints the final loss, and when (on both clocks) the loss first reached the baseline's
final loss and came within 1% and 2% of it. ``--plot`` draws loss against modelled seconds, one panel
per lever beside the baseline (needs matplotlib: ``pip install -e ".[bench]"``); ``--sheet`` writes a
contact sheet of each lever's final image beside the baseline's image at the same modelled time.

    python benchmarks/time_to_quality.py --weights ../shared/weights/vgg16_imagenet_keras.pth --backbone vgg16 \\
        --size 512 --json ttq.json \\
        --plot docs/studies/time_to_quality.png --sheet docs/studies/time_to_quality_images.jpg

A run is ``--run LABEL STAGE [STAGE ...]``, a stage ``SIZE:STEPS`` or ``SIZE:STEPS:KEY=VALUE;KEY=VALUE``
with ``model.`` settings (VALUE read as YAML), e.g. ``--run "coarse x3 content" 256:150:content_weight=3 512:100``.
Without ``--run``: the seed's run and the levers of :func:`default_runs`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's package, even where another copy is installed
sys.path.insert(0, str(REPO / "benchmarks"))

CONTENT = REPO / "nst_lightning" / "samples" / "content_tubingen.jpg"
STYLE = REPO / "nst_lightning" / "samples" / "style_starry_night.jpg"
TRAINED = REPO.parent / "shared" / "weights" / "vgg16_imagenet_keras.pth"
MARKS = (0.0, 0.01, 0.02)  # reached the baseline's final loss, within 1%, within 2%
# Settings that change the function being minimised: a stage with any of them is judged separately.
OBJECTIVE_KEYS = {
    "content_layers",
    "style_layers",
    "style_layer_weights",
    "content_weight",
    "style_weight",
    "tv_weight",
    "style_loss",
    "preserve_color",
    "pooling",
    "normalize",
    "layer_means",
}


@dataclass
class Stage:
    size: int
    steps: int
    model: dict = field(default_factory=dict)


def parse_stage(text: str) -> Stage:
    """``512:300`` or ``256:150:content_weight=3;tv_weight=1`` -> a :class:`Stage`."""
    import yaml

    size, steps, *rest = text.split(":", 2)
    model = {}
    for item in filter(None, (rest[0] if rest else "").split(";")):
        key, _, value = item.partition("=")
        value = yaml.safe_load(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e6 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        model[key.removeprefix("model.")] = value
    return Stage(int(size), int(steps), model)


def default_runs(size: int) -> list[tuple[str, list[Stage]]]:
    """The seed's run, then the levers."""
    half, quarter = size // 2, size // 4
    return [
        ("seed: 300 iterations", [Stage(size, 300)]),
        ("no line search", [Stage(size, 300, {"lbfgs_line_search": None})]),
        ("history 100", [Stage(size, 300, {"lbfgs_history_size": 100})]),
        (f"{half}:150 + {size}:100", [Stage(half, 150), Stage(size, 100)]),
        (f"{half}:150 content x3 + {size}:100", [Stage(half, 150, {"content_weight": 3.0}), Stage(size, 100)]),
        (f"{half}:150 content x10 + {size}:100", [Stage(half, 150, {"content_weight": 10.0}), Stage(size, 100)]),
        (f"{quarter}:100 + {half}:100 + {size}:80", [Stage(quarter, 100), Stage(half, 100), Stage(size, 80)]),
        ("Adam 50 + L-BFGS 250", [Stage(size, 50, {"optimizer": "adam"}), Stage(size, 250)]),
    ]


def evaluation_seconds(base: dict, sizes: list[int], content: Path, style: Path, rounds: int = 5) -> dict[int, float]:
    """Median seconds of one function evaluation (forward and backward) at each size, the sizes
    interleaved round by round."""
    import statistics

    import torch

    from nst_lightning.run.data import StyleTransferDataModule
    from nst_lightning.run.module import StyleTransfer

    images, modules = {}, {}
    for size in sizes:
        module = StyleTransfer(**base)
        inputs = StyleTransferDataModule(str(content), str(style), image_size=size).inputs()
        with torch.no_grad():
            module.set_targets(inputs)
        images[size], modules[size] = inputs.content.clone().requires_grad_(True), module
    times: dict[int, list[float]] = {size: [] for size in sizes}
    for _ in range(rounds + 1):  # the first round warms up
        for size in sizes:
            start = time.perf_counter()
            modules[size](images[size])["total"].backward()
            times[size].append(time.perf_counter() - start)
            images[size].grad = None
    return {size: statistics.median(values[1:]) for size, values in times.items()}


def run_stages(label, stages, base, final, content, style, per_eval, folder, log) -> dict:
    """One run, stage after stage; every step recorded as (wall s, modelled s, evaluations, size,
    judged loss or None). Images at the final size are kept every 10 steps (for equal-time looks)."""
    import torch
    from lightning import Callback, Trainer

    from nst_lightning.core.lbfgs import last_accepted
    from nst_lightning.io.image_io import save_image
    from nst_lightning.run.data import StyleTransferDataModule
    from nst_lightning.run.module import StyleTransfer

    judge = StyleTransfer(**base)
    with torch.no_grad():
        judge.set_targets(StyleTransferDataModule(str(content), str(style), image_size=final).inputs())

    record = {"label": label, "steps": [], "images": {}}
    clock = {"wall": 0.0, "modelled": 0.0, "evaluations": 0}

    class Clock(Callback):
        def __init__(self, stage: Stage) -> None:
            self.stage = stage
            self.judged = stage.size == final and bool(OBJECTIVE_KEYS & set(stage.model))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.started, self.evaluations = time.perf_counter(), pl_module.evaluations

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            clock["wall"] += time.perf_counter() - self.started
            made = pl_module.evaluations - self.evaluations
            clock["evaluations"] += made
            clock["modelled"] += made * per_eval[self.stage.size]
            steps = record["steps"]
            if self.stage.size == final and not self.judged and batch_idx > 0:
                # The loss a step logs is that of the image it started from: the previous step's end.
                steps[-1] = (*steps[-1][:4], float(outputs["loss"]))
            loss = self.judge(pl_module) if self.judged else None
            if self.stage.size == final and trainer.global_step % 10 == 0:
                record["images"][round(clock["modelled"], 3)] = pl_module.output_image().cpu()
            steps.append((clock["wall"], clock["modelled"], clock["evaluations"], self.stage.size, loss))

        def on_train_end(self, trainer, pl_module) -> None:
            if self.stage.size == final and record["steps"][-1][4] is None:  # the stage's last image
                record["steps"][-1] = (*record["steps"][-1][:4], self.judge(pl_module))

        @staticmethod
        def judge(pl_module) -> float:
            """The default objective's loss of the run's current result (outside the clock): under DeviceLBFGS
            its last accepted point, as the image the run would write."""
            image = last_accepted(pl_module.image, pl_module.trainer.optimizers)
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                return float(judge(image)["total"])

    init = None
    for n, stage in enumerate(stages):
        module = StyleTransfer(**{**base, **stage.model, **({"init": init} if init else {})})
        data = StyleTransferDataModule(str(content), str(style), image_size=stage.size)
        trainer = Trainer(
            accelerator="cpu",
            max_steps=stage.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[Clock(stage)],
        )
        trainer.fit(module, datamodule=data)
        if n + 1 < len(stages):  # the next stage starts from this image (upsampled by model.init)
            init = str(save_image(module.output_image(), Path(folder) / f"stage{n}.png"))
        log(f"  {label}: stage {stage.size}:{stage.steps} done, {clock['wall']:.0f} s wall")
    record["final_image"] = module.output_image().cpu()
    record["images"][round(clock["modelled"], 3)] = record["final_image"]
    record["final_loss"] = record["steps"][-1][4]
    return record


def remodel(runs: list[dict], per_eval: dict[int, float]) -> None:
    """Recomputes each step's modelled time with other seconds per evaluation (``--remodel``)."""
    for run in runs:
        modelled, evaluations, steps = 0.0, 0, []
        for wall, _, made, size, loss in run["steps"]:
            modelled += (made - evaluations) * per_eval[size]
            evaluations = made
            steps.append((wall, modelled, made, size, loss))
        run["steps"] = steps


def first_time(steps: list, target: float, column: int) -> float | None:
    return next((step[column] for step in steps if step[4] is not None and step[4] <= target), None)


def summarise(runs: list[dict]) -> None:
    """Adds to each run when it reached the baseline's final loss (and within 1%, 2%) on both clocks."""
    target = runs[0]["final_loss"]
    for run in runs:
        run["reached"] = {
            f"{mark:.0%}": {
                "wall": first_time(run["steps"], target * (1 + mark), 0),
                "modelled": first_time(run["steps"], target * (1 + mark), 1),
            }
            for mark in MARKS
        }


def table(runs: list[dict], size: int, weights: str, per_eval: dict[int, float]) -> str:
    base = runs[0]
    lines = [
        f"final size {size} px; weights {weights}; seconds per evaluation: "
        + ", ".join(f"{s} px {t:.3f}" for s, t in sorted(per_eval.items())),
        "",
        "| run | evaluations | wall s | modelled s | final loss | reaches the seed's final loss at (modelled s) "
        "| speed-up | within 1% at | speed-up | within 2% at | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    seed_time = base["steps"][-1][1]
    for run in runs:
        wall, modelled, evaluations = run["steps"][-1][:3]
        cells = []
        for mark in MARKS:
            at = run["reached"][f"{mark:.0%}"]["modelled"]
            cells += ["—", "not reached"] if at is None else [f"{at:.0f}", f"{seed_time / at:.2f}x"]
        lines.append(
            f"| {run['label']} | {evaluations} | {wall:.0f} | {modelled:.0f} | {run['final_loss']:.4g} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levers = runs[1:]
    columns = 3
    rows = max(1, -(-len(levers) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.6 * rows), squeeze=False, sharey=True)
    target = runs[0]["final_loss"]

    def curve(run):
        points = [(s[1], s[4]) for s in run["steps"] if s[4] is not None]
        return [p[0] for p in points], [p[1] for p in points]

    for ax, run in zip(axes.flat, levers, strict=False):
        ax.plot(*curve(runs[0]), color="grey", label=runs[0]["label"])
        ax.plot(*curve(run), color="C0", label=run["label"])
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_yscale("log")
        ax.set_xlabel("modelled seconds")
        ax.set_ylim(target * 0.8, target * 20)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(levers) :]:
        ax.axis("off")
    axes[0][0].set_ylabel("loss at the final size")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def sheet(runs: list[dict], path: Path) -> None:
    """Each lever's final image beside the baseline's image at the same modelled time (the nearest
    kept one not after it), and the baseline's final image."""
    from PIL import Image, ImageDraw

    from nst_lightning.io.image_io import tensor_to_pil

    side = 384
    base = runs[0]
    kept = sorted(base["images"].items())
    cells = [(f"{base['label']} ({base['steps'][-1][1]:.0f} s)", base["final_image"])]
    for run in runs[1:]:
        at = run["steps"][-1][1]
        earlier = [item for item in kept if item[0] <= at] or kept[:1]
        cells.append((f"{run['label']} ({at:.0f} s, loss {run['final_loss']:.4g})", run["final_image"]))
        cells.append((f"seed at {earlier[-1][0]:.0f} s", earlier[-1][1]))
    images = [(label, tensor_to_pil(image)) for label, image in cells]
    for _, image in images:
        image.thumbnail((side, side))
    columns = 3
    rows = -(-len(images) // columns)
    out = Image.new("RGB", (columns * (side + 8) + 8, rows * (side + 30) + 8), "white")
    draw = ImageDraw.Draw(out)
    for n, (label, image) in enumerate(images):
        left, top = 8 + (n % columns) * (side + 8), 8 + (n // columns) * (side + 30)
        out.paste(image, (left, top + 22))
        draw.text((left, top + 4), label, fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path, quality=85)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="final longest side (default 512)")
    parser.add_argument("--weights", default=str(TRAINED) if TRAINED.is_file() else "random")
    parser.add_argument("--backbone", default="vgg16" if TRAINED.is_file() else "vgg19")
    parser.add_argument("--run", nargs="+", action="append", metavar=("LABEL", "STAGE"), help="a run (repeatable)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--content", default=str(CONTENT))
    parser.add_argument("--style", default=str(STYLE))
    parser.add_argument("--json", type=Path, help="write the results (without images) here")
    parser.add_argument("--plot", type=Path, help="loss against modelled seconds, one panel per lever (PNG)")
    parser.add_argument("--sheet", type=Path, help="final images beside the seed's at equal time (JPEG/PNG)")
    parser.add_argument(
        "--remodel",
        type=Path,
        metavar="JSON",
        help="run nothing: re-measure the seconds per evaluation (on a quiet machine) and redo the table and "
        "--plot of an earlier --json with them",
    )
    args = parser.parse_args()

    import torch

    from nst_lightning.run.runtime import keep_freed_memory

    keep_freed_memory()  # as cli.py does
    torch.set_num_threads(args.threads)
    runs_spec = (
        [(items[0], [parse_stage(s) for s in items[1:]]) for items in args.run] if args.run else default_runs(args.size)
    )
    base = {"weights": args.weights, "backbone": args.backbone}
    sizes = sorted({stage.size for _, stages in runs_spec for stage in stages})
    log = lambda text: print(text, flush=True)  # noqa: E731
    earlier = json.loads(args.remodel.read_text()) if args.remodel else None
    if earlier:
        sizes = sorted({step[3] for run in earlier["runs"] for step in run["steps"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per_eval = evaluation_seconds(base, sizes, Path(args.content), Path(args.style))
        log("seconds per evaluation: " + ", ".join(f"{s} px {t:.3f}" for s, t in per_eval.items()))
        runs = earlier["runs"] if earlier else []
        if earlier:
            remodel(runs, per_eval)
            runs_spec = []
        with tempfile.TemporaryDirectory(prefix="nst-ttq-") as folder:
            for label, stages in runs_spec:
                log(f"{label} ...")
                runs.append(run_stages(label, stages, base, args.size, args.content, args.style, per_eval, folder, log))
    summarise(runs)
    text = table(runs, args.size, Path(args.weights).name, per_eval)
    print()
    print(f"threads: {args.threads}")
    print(text)
    if args.json:
        plain = [{k: v for k, v in run.items() if k not in ("images", "final_image")} for run in runs]
        args.json.write_text(json.dumps({"size": args.size, "per_evaluation_s": per_eval, "runs": plain}, indent=1))
    if args.plot:
        plot(runs, args.plot, f"Tübingen x Starry Night, {args.size} px, {Path(args.weights).name}")
    if args.sheet and not earlier:
        sheet(runs, args.sheet)


if __name__ == "__main__":
    main()
