"""Time to quality: coarse-to-fine schedules against the seed's 300 single-scale L-BFGS iterations.

For each schedule the real LightningModule runs through a real Trainer on the shipped Tübingen /
Starry Night pair. The quality measure is the total loss at the final size, measured with the same
extractor and the same full-resolution targets: at the last scale of a coarse-to-fine run the logged
loss *is* that loss. The script prints, per schedule, the wall time, the final loss, and the wall time
at which the loss first reached the single-scale run's final loss.

Without ``--weights`` the extractor has random weights (pretrained weights cannot be downloaded on
the machines this was written on): the figures then show how the schedules compare on that loss,
not how good the images look. Pass ``--weights /path/to/vgg19-dcbb9e9d.pth`` for the real thing.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/time_to_quality.py --size 512 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_schedule(text: str) -> tuple[list[int], list[int]]:
    """``256:200,512:50`` -> ([256, 512], [200, 50])."""
    sizes, steps = zip(*(tuple(int(x) for x in part.split(":")) for part in text.split(",")), strict=True)
    return list(sizes), list(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="final longest side (default 512)")
    parser.add_argument("--baseline-steps", type=int, default=300, help="single-scale iterations (the seed's 300)")
    parser.add_argument(
        "--schedule",
        action="append",
        help="a coarse-to-fine schedule as size:steps pairs, e.g. 256:200,512:50 (repeatable)",
    )
    parser.add_argument("--weights", default="random", help="backbone weights: random (default) or a file")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--content", default=str(REPO / "nst_lightning/samples/content_tubingen.jpg"))
    parser.add_argument("--style", default=str(REPO / "nst_lightning/samples/style_starry_night.jpg"))
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        print("note: set OMP_WAIT_POLICY=PASSIVE before running, as shared machines need it", file=sys.stderr)

    import torch
    from lightning import Callback, Trainer

    from nst_lightning.data import StyleTransferDataModule
    from nst_lightning.module import StyleTransfer

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    class Clock(Callback):
        """Wall time and loss of each step, and the image size it ran at."""

        def __init__(self) -> None:
            self.start = time.perf_counter()
            self.steps: list[tuple[float, float, int]] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            side = max(pl_module.image.shape[-2:])
            self.steps.append((time.perf_counter() - self.start, float(outputs["loss"]), side))

    def run(sizes: list[int] | None, steps: list[int] | None, max_steps: int) -> dict:
        clock = Clock()
        module = StyleTransfer(weights=args.weights, scales=sizes, scale_steps=steps)
        data = StyleTransferDataModule(args.content, args.style, image_size=args.size)
        trainer = Trainer(
            accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=[clock],
        )  # fmt: skip
        trainer.fit(module, datamodule=data)
        with torch.no_grad():
            final = float(module(module.image)["total"])  # the loss of the final image at full size
        return {"seconds": time.perf_counter() - clock.start, "final_loss": final, "steps": clock.steps}

    print(f"single scale: {args.baseline_steps} iterations at {args.size} px ...", flush=True)
    results = {"single": run(None, None, args.baseline_steps)}
    target = results["single"]["final_loss"]
    for text in args.schedule or [f"{args.size // 2}:200,{args.size}:50"]:
        sizes, steps = parse_schedule(text)
        print(f"coarse to fine {text} ...", flush=True)
        results[text] = run(sizes, steps, sum(steps))

    print(f"\nfinal size {args.size} px, weights: {args.weights}, threads: {args.threads}")
    print("| run | wall time (s) | final loss at full size | reaches the single-scale loss at (s) | speed-up |")
    print("|---|---|---|---|---|")
    for name, result in results.items():
        reached = next((t for t, loss, side in result["steps"] if side == args.size and loss <= target), None)
        if reached is None and result["final_loss"] <= target:
            reached = result["seconds"]
        speedup = f"{results['single']['seconds'] / reached:.2f}x" if reached else "not reached"
        label = f"single scale, {args.baseline_steps} its" if name == "single" else name
        print(f"| {label} | {result['seconds']:.0f} | {result['final_loss']:.5g} | "
              f"{'' if reached is None else f'{reached:.0f}'} | {speedup} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
