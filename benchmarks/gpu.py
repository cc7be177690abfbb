#!/usr/bin/env python
"""The GPU table of ``benchmarks/gpu.sh``: at each size, the project's loop (its default precision, bf16-mixed and,
where the option exists, torch's L-BFGS), the plain tutorial loop and the floor, in one process, with the
whole-command wall times gpu.sh measured beside them. Run gpu.sh rather than this (it times the commands first).

    python benchmarks/gpu.py --device cuda --weights W --sizes 512 1024 --steps 300 100 --walls walls.tsv

Rows (each from the same start, the content image, on the sample Tübingen / Starry Night pair):

- **project default**: ``StyleTransfer`` through a real ``Trainer`` at the precision a run without
  ``trainer.precision`` gets here (``runtime.automatic_precision``), everything else at its default.
- **project bf16-mixed**: the same with ``trainer.precision bf16-mixed`` (its float32 finish included).
- **project torch L-BFGS**: the same with ``--torch-lbfgs KEY=VALUE`` (the option that selects torch's
  L-BFGS, where there is one); absent otherwise.
- **tutorial loop**: ``benchmarks/reference.py``'s tutorial-style loop (loss modules inserted into the
  network, ``torch.optim.LBFGS`` one ``step()`` per iteration, no line search, float32), on the project's
  own normalised network cut after the last loss layer (as the PyTorch tutorial cuts it), so that it
  minimises the same function.
- **floor**: ``benchmarks/floor.py``: the same network's convolutions alone, forward and backward, bf16
  channels-last (the faster layout): what no implementation of this loss goes below per evaluation.

Columns: median seconds per iteration (the first, with cuDNN's autotuning, left out), the loop's seconds
scaled to 300 iterations, the whole command's wall time (gpu.sh: process start to exit, weights and
image writing included), and the final loss of the clamped image (what gets written) by the float32
objective, against the 32-true row's. Where fewer than 300 iterations run (1024 px), the float32 finish of
a mixed-precision run is scaled with them (50 of 300).
"""

from __future__ import annotations

import copy
import time

import common
from common import CONTENT, STYLE, Clock, accelerator, median

FINISH_PER_300 = 50  # model.float32_final_steps' default, per 300 iterations


def parse_setting(text: str | None) -> dict:
    """``model.key=value`` (or ``key=value``) as StyleTransfer keyword arguments; the value read as YAML."""
    if not text:
        return {}
    import yaml

    key, _, value = text.partition("=")
    return {key.strip().removeprefix("model."): yaml.safe_load(value)}


def run_project(args, size: int, steps: int, precision: str, **model) -> dict:
    """One run of ``steps`` iterations through a real Trainer: step times, the module (for its image)."""
    from lightning import Callback, Trainer

    from nst_lightning import StyleTransfer, StyleTransferDataModule
    from nst_lightning.run.runtime import quiet_lightning

    finish = (FINISH_PER_300 * steps + 150) // 300  # rounded half up, as gpu.sh rounds it
    module = StyleTransfer(backbone=args.backbone, weights=args.weights, float32_final_steps=finish, **model)
    data = StyleTransferDataModule(str(CONTENT), str(STYLE), image_size=size)
    clock, times = Clock(args.device), []

    class StepTimer(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append(clock.stop())

    with quiet_lightning():
        trainer = Trainer(
            accelerator=accelerator(args.device),
            devices=1,
            precision=precision,
            max_steps=steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[StepTimer()],
            benchmark=args.device.startswith("cuda") or None,
        )
        trainer.fit(module, datamodule=data)
    return {"times": times, "image": module.image.detach(), "module": module, "data": data}


def run_tutorial(args, project: dict, steps: int) -> dict:
    """The tutorial loop on the project's normalised network (a copy), ``steps`` iterations."""
    import torch
    from reference import Reference

    data, module = project["data"], project["module"]
    body = copy.deepcopy(module.objective.extractor.body).to(memory_format=torch.contiguous_format)  # plain
    content, style = data.content_image.to(args.device), data.style_image.to(args.device)
    ref = Reference(body, content, style)
    start_loss = float(ref.loss())  # of the content image: the project's must be the same (the same function)
    clock, times = Clock(args.device), []
    for _ in range(steps):
        clock.start()
        ref.step()
        times.append(clock.stop())
    return {"times": times, "image": ref.input_img.detach(), "start_loss": start_loss}


def run_floor(args, project: dict, repeats: int) -> dict:
    from floor import Floor

    height, width = project["image"].shape[-2:]
    floor = Floor(project["module"].objective.extractor, height, width, args.device, "bf16-mixed")
    floor.run(1, record=False)
    floor.run(repeats)
    layout = floor.best()
    return {"times": floor.clocks[layout].times, "layout": layout}


def final_loss(judge, image) -> float:
    """The float32 loss of the clamped image by ``judge`` (the 32-true run's module, on the device)."""
    import torch

    with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
        return float(judge(image.clamp(0, 1).to(judge.image.device))["total"])


def read_walls(path) -> dict:
    """gpu.sh's whole-command times: ``size<TAB>row<TAB>seconds<TAB>steps`` lines."""
    walls = {}
    if path is not None and path.is_file():
        for line in path.read_text().splitlines():
            size, row, seconds, steps = line.split("\t")
            walls[(int(size), row)] = (float(seconds), int(steps))
    return walls


def measure(args) -> list[dict]:
    import torch

    from nst_lightning.run.runtime import automatic_precision

    default = automatic_precision(accelerator(args.device)) or "32-true"
    variants = [("project default", default, {})]
    if default != "bf16-mixed":
        variants.append(("project bf16-mixed", "bf16-mixed", {}))
    if args.torch_lbfgs:
        variants.append(("project torch L-BFGS", default, parse_setting(args.torch_lbfgs)))
    rows = []
    for size, steps in zip(args.sizes, args.steps, strict=True):
        runs = {}
        for name, precision, model in variants:
            print(f"[{size} px] {name} ({precision}, {steps} iterations) ...", flush=True)
            runs[name] = {**run_project(args, size, steps, precision, **model), "precision": precision}
        base = runs["project default"]
        if default != "32-true":  # the judge and the 32-true reference: a float32 run
            print(f"[{size} px] project 32-true (the reference of the loss column) ...", flush=True)
            runs["project 32-true"] = base = {**run_project(args, size, steps, "32-true"), "precision": "32-true"}
        judge = base["module"].to(args.device)
        print(f"[{size} px] tutorial loop ...", flush=True)
        runs["tutorial loop"] = {**run_tutorial(args, base, steps), "precision": "32-true"}
        print(f"[{size} px] floor ...", flush=True)
        runs["floor"] = {**run_floor(args, base, args.floor_repeats), "precision": "bf16-mixed"}
        reference = final_loss(judge, base["image"])
        agreement = runs["tutorial loop"]["start_loss"] / final_loss(judge, base["data"].content_image) - 1
        for name, run in runs.items():
            times = run["times"][1:] or run["times"]
            loss = final_loss(judge, run["image"]) if "image" in run and name != "floor" else None
            rows.append(
                {
                    "size": size,
                    "shape": list(base["image"].shape[-2:]),
                    "row": name,
                    "precision": run["precision"],
                    "steps": steps,
                    "s_per_iter": median(times),
                    "loop_s": sum(run["times"]),
                    "final_loss": loss,
                    "vs_32_true": None if loss is None else loss / reference - 1,
                    "layout": run.get("layout"),
                    "first_s": run["times"][0],
                    "tutorial_agreement": agreement,
                }
            )
        del runs, judge
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def table(rows: list[dict], walls: dict) -> list[str]:
    lines = [
        "| size (HxW) | row | precision | s/iteration | s for 300 | whole command | final loss | vs 32-true |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = r["s_per_iter"]
        # The first iteration (cuDNN's autotuning, allocations) once, the others scaled to 299.
        rest = (r["loop_s"] - r["first_s"]) * 299 / max(r["steps"] - 1, 1)
        scaled = "–" if r["row"] == "floor" else f"{r['first_s'] + rest:.1f}"
        if r["steps"] != 300 and r["row"] != "floor":
            scaled += f" (from {r['steps']})"
        wall = walls.get((r["size"], r["row"]))
        wall_text = "–" if wall is None else f"{wall[0]:.1f} s ({wall[1]} it)"
        loss = "–" if r["final_loss"] is None else f"{r['final_loss']:.5g}"
        vs = "–" if r["vs_32_true"] is None else f"{r['vs_32_true']:+.2%}"
        name = r["row"] + (f" ({r['layout']})" if r["layout"] else "")
        lines.append(
            f"| {r['size']} ({r['shape'][0]}x{r['shape'][1]}) | {name} | {r['precision']} | {per:.4f} | {scaled} "
            f"| {wall_text} | {loss} | {vs} |"
        )
    agreement = {r["size"]: r["tutorial_agreement"] for r in rows}
    lines += [
        "",
        "The tutorial loop's loss of the content image against the project's (the same function): "
        + "; ".join(f"{size} px {value:+.1e}" for size, value in agreement.items()),
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    from pathlib import Path

    parser = common.base_parser(__doc__)
    parser.add_argument("--weights", required=True, help="the network's weights (a file, imagenet or random)")
    parser.add_argument("--backbone", default="vgg16", help="the network (default vgg16, the shared weights')")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--steps", type=int, nargs="+", default=[300, 100], help="iterations at each size")
    parser.add_argument("--floor-repeats", type=int, default=10, help="timed rounds of the floor (default 10)")
    parser.add_argument("--torch-lbfgs", default="", help="KEY=VALUE selecting torch's L-BFGS (a row when given)")
    parser.add_argument("--walls", type=Path, default=None, help="gpu.sh's whole-command times (TSV)")
    parser.add_argument("--compile-check", action="store_true", help="also compare compiled and eager gradients")
    args = parser.parse_args(argv)
    torch, _ = common.setup_torch(args.threads, args.device)
    started = time.perf_counter()
    if args.device.startswith("cuda"):
        from nst_lightning.run.precision import use_tf32

        use_tf32()  # as the command sets it on CUDA (and trainer.benchmark: cuDNN autotuning)
        torch.backends.cudnn.benchmark = True
    rows = measure(args)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    matmul, autotune = torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark
    print(
        f"\ntorch {torch.__version__}, {device}, weights {args.weights} ({args.backbone}); "
        f"float32 matmul precision {matmul}, cudnn.benchmark {autotune}\n"
    )
    print("\n".join(table(rows, read_walls(args.walls))))
    if args.compile_check:
        from compile_check import compile_check

        print("\n" + compile_check(args.device, args.backbone, args.weights))
    print(f"\n(gpu.py wall time {time.perf_counter() - started:.0f} s)")
    if args.json:
        import json

        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
