#!/usr/bin/env python
"""The cost of a run's bookkeeping: the same run with the command line's logging and without, interleaved.

"logged" has what ``nst-lightning fit`` adds to the loop: TensorBoard (every step's losses, the image every 10 steps),
the guard, the final-loss record and the progress bar (on a throwaway stream); "bare" has no logger and no
callback but the module's own loss log. Each is timed from the first step to the end of ``fit`` (the losses and
images still to write included), in milliseconds per iteration, wall and CPU (all threads); the medians over the
repeats, and the logged run's overhead over the bare one.

    python benchmarks/logging_overhead.py --size 64 --steps 60 --repeats 5
    python benchmarks/logging_overhead.py --device cuda --size 512 --steps 100 --repeats 3
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import common
from common import CONTENT, STYLE, median


def one_run(kind: str, size: int, steps: int, device: str, folder: Path) -> dict[str, float]:
    from lightning import Callback, Trainer

    from nst_lightning import StyleTransfer, StyleTransferDataModule
    from nst_lightning.io.console import ProgressBar
    from nst_lightning.run.callbacks import ImageWriter
    from nst_lightning.run.guard import RunGuard
    from nst_lightning.run.runlog import RunLogger, RunRecord

    sync = common.sync_fn(device)

    class Timer(Callback):
        def on_train_start(self, trainer, pl_module):
            sync()
            self.wall, self.cpu = time.perf_counter(), time.process_time()

    timer = Timer()
    logged = kind == "logged"
    callbacks = [timer]
    if logged:
        writer = ImageWriter(str(folder / "out.png"), log_image_every_n_steps=10, overwrite=True)
        callbacks += [writer, RunGuard(), RunRecord(), ProgressBar()]
    trainer = Trainer(
        accelerator=common.accelerator(device),
        devices=1,
        max_steps=steps,
        enable_checkpointing=False,
        logger=RunLogger(folder / "logs") if logged else False,
        log_every_n_steps=1,
        enable_progress_bar=logged,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    module = StyleTransfer(weights="random", init="content")
    with contextlib.redirect_stderr(io.StringIO()):  # the bar, drawn but not shown
        trainer.fit(module, datamodule=StyleTransferDataModule(str(CONTENT), str(STYLE), image_size=size))
    sync()
    wall, cpu = time.perf_counter() - timer.wall, time.process_time() - timer.cpu
    return {"wall_ms": 1000 * wall / steps, "cpu_ms": 1000 * cpu / steps}


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--size", type=int, default=64, help="longest side in pixels (64)")
    parser.add_argument("--steps", type=int, default=60, help="iterations per run (60)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each kind, interleaved (3)")
    args = parser.parse_args()
    common.setup_torch(args.threads, args.device)
    results: dict[str, list[dict[str, float]]] = {"bare": [], "logged": []}
    with tempfile.TemporaryDirectory(prefix="nst-logging-") as scratch:
        one_run("bare", args.size, 2, args.device, Path(scratch, "warm-up"))
        for repeat in range(args.repeats):
            for kind in results:
                folder = Path(scratch, f"{kind}{repeat}")
                results[kind].append(one_run(kind, args.size, args.steps, args.device, folder))
    keys = ("wall_ms", "cpu_ms")
    summary = {kind: {key: median([run[key] for run in runs]) for key in keys} for kind, runs in results.items()}
    for kind, values in summary.items():
        print(
            f"{kind}: {values['wall_ms']:.1f} ms wall, {values['cpu_ms']:.1f} ms CPU per iteration "
            f"({args.size} px, {args.device}, median of {args.repeats})"
        )
    overhead = summary["logged"]["wall_ms"] / summary["bare"]["wall_ms"] - 1
    print(f"logging overhead: {overhead:+.1%} of the wall time per iteration")
    if args.json:
        record = {"args": {**vars(args), "json": str(args.json)}, "runs": results, "summary": summary}
        args.json.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
