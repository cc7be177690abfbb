#!/usr/bin/env python
"""DeviceLBFGS against torch's L-BFGS: the final loss at equal iterations, and the time per iteration.

Two lanes per size, run step by step in turn so that load from other processes hits both alike: the
default configuration with ``model.lbfgs_line_search: backtrack`` (nst_lightning.core.lbfgs.DeviceLBFGS, the
new default) and with ``strong_wolfe`` (torch.optim.LBFGS with its line search, the default before). Each
lane is a real StyleTransfer (set up by a Trainer: targets, the image) whose own optimiser
(``configure_optimizers``) and Evaluator make each iteration exactly as ``training_step`` does, without
Lightning's logging. Per size it prints the loss of each lane's final image, their ratio, the function
evaluations, the steps DeviceLBFGS undid, and the median seconds per iteration (all of it, and the part
outside the function evaluations: the optimiser's own work).

    python benchmarks/lbfgs_agreement.py --weights ../shared/weights/vgg16_imagenet_keras.pth --backbone vgg16 \\
        --sizes 128 256 --steps 300 --json agreement.json
    python benchmarks/lbfgs_agreement.py ... --sizes 64 --steps 100      # timing at a small size
"""

from __future__ import annotations

import json
import time

from common import CONTENT, STYLE, base_parser, median, setup_torch, sync_fn

LANES = ("backtrack", "strong_wolfe")
# The loss curve is read at these iterations (and at the last).
MARKS = (10, 25, 50, 100, 200)


class Lane:
    """One optimisation: the module at ``size`` with ``lbfgs_line_search=line_search``, stepped by hand."""

    def __init__(self, line_search: str | None, size: int, args) -> None:
        from lightning import Trainer

        from nst_lightning import StyleTransfer, StyleTransferDataModule
        from nst_lightning.core.lbfgs import DeviceLBFGS, last_accepted
        from nst_lightning.run.closure import Evaluator

        self.module = StyleTransfer(backbone=args.backbone, weights=args.weights, lbfgs_line_search=line_search)
        data = StyleTransferDataModule(str(CONTENT), str(STYLE), image_size=size)
        accelerator = "gpu" if args.device.startswith("cuda") else "cpu"
        Trainer(
            accelerator=accelerator,
            devices=1,
            max_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(self.module, datamodule=data)
        self.module.to(args.device)
        self.optimizer = self.module.configure_optimizers()
        self.evaluator = Evaluator(self.module.objective, lambda loss: loss.backward())
        device = isinstance(self.optimizer, DeviceLBFGS)
        self.evaluate = self.evaluator.once if device else self.evaluator
        self.sync = sync_fn(args.device)
        self.result = lambda: last_accepted(self.module.image, [self.optimizer])  # what the run would write
        self.curve: dict[int, float] = {}
        self.times: list[float] = []
        self.own_times: list[float] = []  # the step minus its function evaluations

    def step(self, step: int) -> None:
        image, spent = self.module.image, [0.0]

        def closure():
            start = time.perf_counter()
            total = self.evaluate(image, self.optimizer, step=step)["total"]
            self.sync()
            spent[0] += time.perf_counter() - start
            return total

        self.sync()
        start = time.perf_counter()
        self.optimizer.step(closure)
        self.sync()
        self.times.append(time.perf_counter() - start)
        self.own_times.append(self.times[-1] - spent[0])

    def loss(self) -> float:
        """The loss of the image the run would write now (outside the timed steps)."""
        import torch

        self.evaluator.check()  # a non-finite evaluation is raised here, not hidden
        with torch.no_grad():
            return float(self.module(self.result())["total"])


def main() -> None:
    parser = base_parser(__doc__)
    parser.add_argument("--weights", required=True, help="trained weights of --backbone (a state dict file)")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--steps", type=int, default=300, help="iterations per lane (default 300)")
    parser.add_argument("--also-none", action="store_true", help="a third lane: torch's L-BFGS without line search")
    args = parser.parse_args()
    torch, threads = setup_torch(args.threads, args.device)
    rows = []
    for size in args.sizes:
        names = (*LANES, None) if args.also_none else LANES
        lanes = {name: Lane(name, size, args) for name in names}
        for step in range(args.steps):
            for lane in lanes.values():
                lane.step(step)
                if step + 1 in MARKS:
                    lane.curve[step + 1] = lane.loss()
        losses = {name: lane.loss() for name, lane in lanes.items()}
        new, old = lanes["backtrack"], lanes["strong_wolfe"]
        rows.append(
            {
                "size": size,
                "shape": list(new.module.image.shape[-2:]),
                "steps": args.steps,
                "loss_backtrack": losses["backtrack"],
                "loss_strong_wolfe": losses["strong_wolfe"],
                "ratio": losses["backtrack"] / losses["strong_wolfe"],
                "evaluations_backtrack": new.evaluator.count,
                "evaluations_strong_wolfe": old.evaluator.count,
                "undone_backtrack": int(new.optimizer.state[new.module.image]["undone"]),
                "s_per_iter_backtrack": median(new.times),
                "s_per_iter_strong_wolfe": median(old.times),
                "own_s_per_iter_backtrack": median(new.own_times),
                "own_s_per_iter_strong_wolfe": median(old.own_times),
                "curves": {str(name): {**lane.curve, args.steps: losses[name]} for name, lane in lanes.items()},
            }
        )
        print_row(rows[-1], first=len(rows) == 1)
        for name, curve in rows[-1]["curves"].items():
            print(f"    {name}: " + ", ".join(f"{step}: {loss:.5g}" for step, loss in curve.items()), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": threads, "device": args.device, "rows": rows}, indent=2))


def print_row(row: dict, first: bool) -> None:
    if first:
        print(
            "| size | steps | final loss backtrack | final loss strong_wolfe | ratio | evaluations (bt / sw) "
            "| undone | s/iter bt | s/iter sw | optimiser s/iter bt | optimiser s/iter sw |"
        )
        print("|---" * 11 + "|")
    cells = [
        f"{row['shape'][1]}x{row['shape'][0]}",
        row["steps"],
        f"{row['loss_backtrack']:.5g}",
        f"{row['loss_strong_wolfe']:.5g}",
        f"{row['ratio']:.4f}",
        f"{row['evaluations_backtrack']} / {row['evaluations_strong_wolfe']}",
        row["undone_backtrack"],
        *(
            f"{row[key]:.4f}"
            for key in (
                "s_per_iter_backtrack",
                "s_per_iter_strong_wolfe",
                "own_s_per_iter_backtrack",
                "own_s_per_iter_strong_wolfe",
            )
        ),
    ]
    print("| " + " | ".join(str(cell) for cell in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
