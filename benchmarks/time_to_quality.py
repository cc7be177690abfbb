"""Time to quality: coarse-to-fine schedules against the seed's 300 single-scale L-BFGS iterations.

For each schedule the real LightningModule runs through a real Trainer on the shipped Tübingen /
Starry Night pair. The quality measure is the total loss at the final size, measured with the same
extractor and the same full-resolution targets: at the last scale of a coarse-to-fine run the logged
loss *is* that loss. The script prints, per schedule, the wall time, the final loss, and the wall time
at which the loss first reached the single-scale run's final loss (and came within 1% of it).

Weights: pretrained VGG-19 weights cannot be downloaded on the machines this was written on. The
default, ``--weights scaled-random``, is the proxy of ``benchmarks/proxy_weights.py`` (random, each
convolution rescaled so that every layer contributes to the loss, as with trained weights); plain
``random`` weights make the loss, in effect, conv1_1's statistics alone. Neither says how good the
images look. Pass ``--weights /path/to/vgg19-dcbb9e9d.pth`` for the real thing.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/time_to_quality.py --size 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: idle threads must not spin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

CONTENT = REPO / "nst_lightning" / "samples" / "content_tubingen.jpg"
STYLE = REPO / "nst_lightning" / "samples" / "style_starry_night.jpg"
CLOSE = 0.01  # "within 1%" of the single-scale run's final loss


def parse_schedule(text: str) -> tuple[list[int], list[int]]:
    """``256:200,512:50`` -> ([256, 512], [200, 50])."""
    sizes, steps = zip(*(tuple(int(x) for x in part.split(":")) for part in text.split(",")), strict=True)
    return list(sizes), list(steps)


def parse_run(text: str) -> tuple[str, str]:
    """``256:100,512:150@bf16-mixed`` -> (schedule, precision); ``single@bf16-mixed`` is the
    single-scale run at that precision; without ``@`` the precision is 32-true."""
    schedule, _, precision = text.partition("@")
    return schedule, precision or "32-true"


def default_schedules(size: int) -> list[str]:
    return [f"{size // 4}:100,{size // 2}:100,{size}:100", f"{size // 2}:100,{size}:150"]


def resolve_weights(weights: str, size: int, folder: str, content: str | Path = CONTENT) -> str:
    """``scaled-random`` becomes a proxy weights file in ``folder``; anything else is passed on."""
    if weights != "scaled-random":
        return weights
    from proxy_weights import write_scaled_random_vgg19

    from nst_lightning.image_io import load_image

    return str(write_scaled_random_vgg19(load_image(content, size), Path(folder) / "vgg19-scaled-random.pth"))


def compare(
    size: int,
    schedules: list[str],
    weights: str = "scaled-random",
    baseline_steps: int = 300,
    content: str | Path = CONTENT,
    style: str | Path = STYLE,
    log=print,
) -> dict:
    """Runs the single-scale baseline, then each schedule, one after the other; returns the results."""
    import torch
    from lightning import Callback, Trainer

    from nst_lightning.data import StyleTransferDataModule
    from nst_lightning.module import StyleTransfer

    class Clock(Callback):
        """Wall time and loss of each step, and the image size it ran at.

        The loss is the one the step logged (that of the image the step started from). A run at a
        precision other than 32-true logs losses computed at that precision, so there the clock
        pauses before each step and computes the float32 loss of the same image instead: every run
        is judged by the same function, and the judging costs no run any time.
        """

        def __init__(self, exact: bool) -> None:
            self.exact = exact
            self.start = time.perf_counter()
            self.paused = 0.0
            self.at_start: tuple[float, int] | None = None
            self.steps: list[tuple[float, float, int]] = []

        def elapsed(self) -> float:
            return time.perf_counter() - self.start - self.paused

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.exact:
                pause = time.perf_counter()
                self.at_start = float32_loss(pl_module), max(pl_module.image.shape[-2:])
                self.paused += time.perf_counter() - pause

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if self.exact:
                loss, side = self.at_start
            else:
                loss, side = float(outputs["loss"]), max(pl_module.image.shape[-2:])
            self.steps.append((self.elapsed(), loss, side))

    def float32_loss(module) -> float:
        # Before the first step of a new scale this is still the previous scale's image and loss
        # (training_step changes the scale), and the clock records it with that size.
        with torch.no_grad(), torch.autocast(module.image.device.type, enabled=False):
            return float(module(module.image)["total"])

    def run(path: str, sizes: list[int] | None, steps: list[int] | None, max_steps: int, precision: str) -> dict:
        clock = Clock(exact=precision != "32-true")
        module = StyleTransfer(weights=path, scales=sizes, scale_steps=steps)
        data = StyleTransferDataModule(str(content), str(style), image_size=size)
        trainer = Trainer(
            accelerator="cpu", max_steps=max_steps, precision=precision, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
        seconds = clock.elapsed()
        # The loss of the final image at full size, in float32 whatever the run's precision.
        return {"seconds": seconds, "precision": precision, "final_loss": float32_loss(module), "steps": clock.steps}

    with tempfile.TemporaryDirectory(prefix="nst-ttq-") as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = resolve_weights(weights, size, folder, content)
        log(f"single scale: {baseline_steps} iterations at {size} px ...")
        runs = {"single": run(path, None, None, baseline_steps, "32-true")}
        for text in schedules:
            schedule, precision = parse_run(text)
            if schedule == "single":
                log(f"single scale at {precision} ...")
                runs[text] = run(path, None, None, baseline_steps, precision)
                continue
            sizes, steps = parse_schedule(schedule)
            log(f"coarse to fine {text} ...")
            runs[text] = run(path, sizes, steps, sum(steps), precision)
    target = runs["single"]["final_loss"]
    for result in runs.values():
        at_size = [(t, loss) for t, loss, side in result["steps"] if side == size]
        result["reached_s"] = next((t for t, loss in at_size if loss <= target), None)
        if result["reached_s"] is None and result["final_loss"] <= target:
            result["reached_s"] = result["seconds"]
        result["within_1pct_s"] = next((t for t, loss in at_size if loss <= target * (1 + CLOSE)), None)
    single = runs["single"]
    single["within_1pct_step"] = next(
        (i + 1 for i, (_, loss, _) in enumerate(single["steps"]) if loss <= target * (1 + CLOSE)), None
    )
    return {"size": size, "weights": weights, "baseline_steps": baseline_steps, "runs": runs}


def table(results: dict) -> str:
    """The comparison as a Markdown table, with a line on the single-scale run's own convergence."""
    runs, steps = results["runs"], results["baseline_steps"]
    single = runs["single"]["seconds"]

    def speedup(seconds: float | None) -> str:
        return f"{single / seconds:.2f}x" if seconds else "not reached"

    lines = [
        f"final size {results['size']} px, weights: {results['weights']}",
        "",
        "| run | wall time (s) | final loss at full size | reaches the single-scale final loss at (s) "
        "| speed-up | within 1% at (s) | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        schedule, precision = parse_run(name)
        label = f"single scale, {steps} its" if schedule == "single" else schedule
        label += "" if precision == "32-true" else f" @ {precision}"
        reached, close = r["reached_s"], r["within_1pct_s"]
        lines.append(
            f"| {label} | {r['seconds']:.0f} | {r['final_loss']:.5g} | {'' if reached is None else f'{reached:.0f}'} "
            f"| {speedup(reached)} | {'' if close is None else f'{close:.0f}'} | {speedup(close)} |"
        )
    step = runs["single"].get("within_1pct_step")
    if step:
        lines += [
            "",
            f"The single-scale run itself was within 1% of its final loss after {step} of {steps} iterations.",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="final longest side (default 512)")
    parser.add_argument("--baseline-steps", type=int, default=300, help="single-scale iterations (the seed's 300)")
    parser.add_argument(
        "--schedule",
        action="append",
        help="a coarse-to-fine schedule as size:steps pairs, e.g. 256:200,512:50, or 'single' for the "
        "single-scale run; '@bf16-mixed' after either runs it at that precision (repeatable)",
    )
    parser.add_argument(
        "--weights", default="scaled-random", help="scaled-random (default, a proxy), random, or a weights file"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--content", default=str(CONTENT))
    parser.add_argument("--style", default=str(STYLE))
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    import torch

    from nst_lightning.runtime import keep_freed_memory

    keep_freed_memory()  # as cli.py does
    torch.set_num_threads(args.threads)
    results = compare(
        args.size,
        args.schedule or default_schedules(args.size),
        weights=args.weights,
        baseline_steps=args.baseline_steps,
        content=args.content,
        style=args.style,
        log=lambda text: print(text, flush=True),
    )
    print()
    print(f"threads: {args.threads}")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
