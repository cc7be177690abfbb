"""Batch runs: many content x style pairs from one configuration (``python cli.py batch``).

Every pair is an independent optimisation with the ``model:``, ``data:``, ``trainer:`` and ``output:``
settings of the configuration, its own output file and its own TensorBoard run. A pair that fails is
reported and skipped; the summary at the end lists every pair. With ``batch.devices`` or
``batch.num_nodes`` above 1, Lightning's launcher starts one process per device and node and each
process optimises its share of the pairs on its own device (no gradient is exchanged); the processes
only talk to each other to agree on the pairs at the start and to collect the results at the end.

This module holds the pairs and their bookkeeping; how one pair is configured and run is the command
line's (:class:`nst_lightning.batch.command.BatchCLI`, a :class:`PairRunner`), which this module does not import.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from tqdm import tqdm

from nst_lightning.batch.launch import as_rank_zero, device_placement, launch, start_fabric
from nst_lightning.batch.pairs import (
    BatchSettings,
    Pair,
    PairResult,
    check_existing,
    expand,
    make_pairs,
    pending_checkpoint,
    resume_advice,
    summary,
)
from nst_lightning.errors import ConfigError, Interrupted, NSTError
from nst_lightning.io.files import check_outputs_apart, check_replaceable, file_kind, remove_file
from nst_lightning.io.image_io import check_writable
from nst_lightning.io.text import duration
from nst_lightning.run.callbacks import partial_path
from nst_lightning.run.memory import out_of_memory


class StepProgress(L.Callback):
    """Tells the batch's bar how far the pair in progress is: ``report(step, max_steps, first)`` at its start (a
    resumed pair starts past 0: ``first`` is True) and after each step."""

    def __init__(self, report: Callable[[int, int, bool], None]) -> None:
        self.report = report

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.report(trainer.global_step, trainer.max_steps, True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.report(trainer.global_step, trainer.max_steps, False)


class ResumeRefused(Exception):
    """An interrupted pair's checkpoint does not fit this run: the pair starts over."""


class PairRunner(Protocol):
    """What a batch needs of the command line: its settings, its files, and a way to run one pair."""

    settings: BatchSettings
    root_dir: Path
    """trainer.default_root_dir: the pairs' runs and interrupted checkpoints go under it."""
    accelerator: Any
    """trainer.accelerator, for a sharded batch's launcher."""
    overwrite: bool
    """output.overwrite (``--overwrite``): pairs may replace existing images."""
    step_progress: StepProgress | None
    """Set by :func:`run_share` while a bar is shown: the runner adds it to each pair's callbacks."""

    def contents_and_styles(self) -> tuple[list[str], list[str]]: ...

    def input_files(self) -> list[tuple[str, Path]]: ...

    def run_pair(self, pair: Pair, placement: dict[str, Any], resume: Path | None, pending: Path) -> tuple[bool, str]:
        """Optimises ``pair`` (from the checkpoint ``resume`` where given; an interruption's checkpoint
        goes to ``pending``); returns (finished, log folder). A ``resume`` that does not fit raises
        :class:`ResumeRefused` before the first step."""
        ...


def check_outputs(runner: PairRunner, pairs: Sequence[Pair]) -> None:
    """Before any pair runs: no pair's output (nor its partial image) may be one of the batch's
    inputs, or exist as something other than a regular file; nor exist at all, unless ``--overwrite``
    (or ``batch.skip_existing``, which skips those pairs)."""
    inputs = sorted({("batch.contents", p.content) for p in pairs} | {("batch.styles", p.style) for p in pairs})
    inputs += runner.input_files()
    outputs = []
    for pair in pairs:
        outputs.append(("the output", pair.output, "batch.output_dir or batch.name"))
        outputs.append(("the partial image", partial_path(pair.output), "batch.output_dir or batch.name"))
    check_outputs_apart(outputs, inputs)
    for _, path, _ in outputs:
        check_replaceable(path, "output")
    check_existing(pairs, runner.overwrite, runner.settings.skip_existing)


def fit_pair(runner: PairRunner, pair: Pair, placement: dict[str, Any]) -> tuple[bool, str]:
    """Optimises one pair; returns (finished, log folder).

    ``placement`` holds trainer arguments that override the configuration (the device of this
    process in a sharded batch). A pair interrupted in an earlier run resumes from its checkpoint
    (:func:`pending_checkpoint`), which is removed once the pair is done; a checkpoint that does
    not fit this run's settings or images is reported and the pair starts over.
    """
    pending = pending_checkpoint(runner.root_dir, pair)
    resume = pending if file_kind(pending) == "file" else None
    try:
        finished, log_dir = runner.run_pair(pair, placement, resume, pending)
    except ResumeRefused as err:  # another configuration or other images since the interruption
        print(
            f"nst-lightning: pair {pair.n}: cannot resume from {pending} ({err}); starting the pair over",
            file=sys.stderr,
            flush=True,
        )
        finished, log_dir = runner.run_pair(pair, placement, None, pending)
    if finished:
        remove_file(pending)  # done: the next run must not resume from it
    return finished, log_dir


def _run_pair(runner: PairRunner, pair: Pair, placement: dict[str, Any], rank: int, report: Any) -> PairResult:
    """One pair; an error is caught and described in the result (Ctrl-C is not caught)."""
    result = PairResult(pair, "failed", rank=rank)
    start = time.perf_counter()
    try:
        with as_rank_zero():
            finished, result.log_dir = fit_pair(runner, pair, placement)
        result.status = "done" if finished else "failed"
        result.error = "" if finished else "the run stopped before its last step"
    except Interrupted:  # Ctrl-C or SIGTERM during the pair's optimisation: stop the batch
        raise
    except NSTError as err:  # the user's problem: the message says it all
        result.error = " ".join(str(err).split())
    except Exception as err:  # out of memory: one line; a bug or another crash: keep the traceback for a report
        if (shortage := out_of_memory(err)) is not None:
            result.error = str(shortage)
        else:
            result.error = f"{type(err).__name__}: {' '.join(str(err).split())}"
            report(traceback.format_exc().rstrip())
    finally:
        result.seconds = time.perf_counter() - start
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def run_share(
    runner: PairRunner,
    pairs: Sequence[Pair],
    total: int,
    rank: int,
    world_size: int,
    placement: dict[str, Any],
    results: list[PairResult] | None = None,
) -> list[PairResult]:
    """Optimises this process's pairs one after the other; a failing pair is reported and skipped.

    The results are appended to ``results`` as they come (so an interrupted batch can still report).
    """
    settings = runner.settings
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    show_bar = sys.stderr.isatty() if settings.progress_bar is None else settings.progress_bar
    bar = tqdm(
        total=len(pairs),
        desc=f"{prefix}pairs",
        disable=not show_bar,
        position=rank % settings.devices if world_size > 1 else None,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0,  # the rate is the pairs run over the time spent: skipped pairs are not counted as quick ones
        bar_format="{desc}: {percentage:3.0f}%|{bar:20}| [{elapsed}<{remaining}{postfix}]",
    )
    counted = 0  # the pairs dealt with (done, failed or skipped): the bar stands at this plus the pair in progress

    def report(line: str) -> None:
        bar.write(line, file=sys.stderr)

    def not_timed(amount: float) -> None:  # progress made before this run: left out of the rate
        if bar.disable:
            return
        bar.initial += amount
        bar.n += amount

    def step_done(step: int, max_steps: int, first: bool) -> None:
        fraction = min(step / max_steps, 1.0) if max_steps > 0 else 0.0
        if first:
            not_timed(fraction)  # a resumed pair's steps before its interruption
        else:
            bar.update(counted + fraction - bar.n)  # redrawn at most every 0.1 s
        bar.set_postfix_str(f"pair {pair.n}/{total} {pair.run}: step {step}/{max_steps}", refresh=False)

    runner.step_progress = StepProgress(step_done) if show_bar else None
    results = [] if results is None else results
    try:
        for pair in pairs:
            bar.set_postfix_str(f"pair {pair.n}/{total} {pair.run}")
            # The final path only ever holds a finished image; an interrupted pair is resumed even so.
            pending = file_kind(pending_checkpoint(runner.root_dir, pair)) == "file"
            if settings.skip_existing and file_kind(pair.output) != "missing" and not pending:
                result = PairResult(pair, "skipped", rank=rank)
                report(f"{prefix}pair {pair.n}/{total} skipped: {pair.output} exists")
                not_timed(1.0)
            else:
                if pending:
                    report(f"{prefix}pair {pair.n}/{total}: resuming from {pending_checkpoint(runner.root_dir, pair)}")
                pair_started = time.perf_counter()
                try:
                    result = _run_pair(runner, pair, placement, rank, report)
                except BaseException as err:  # Ctrl-C (Lightning turns it into SystemExit): stop the batch
                    stopped = PairResult(pair, "interrupted", time.perf_counter() - pair_started, rank=rank)
                    if isinstance(err, Interrupted):
                        stopped.error = f"stopped after step {err.step} of {err.max_steps}"
                    results.append(stopped)
                    if isinstance(err, Interrupted):
                        done = sum(r.status == "done" for r in results)
                        err.advice = resume_advice(pair, err, settings.skip_existing, done)
                    raise
                if result.status == "done":
                    report(f"{prefix}pair {pair.n}/{total} done: {pair.output} ({duration(result.seconds)})")
                else:
                    where = f"{pair.content} x {pair.style}"
                    report(f"nst-lightning: {prefix}pair {pair.n}/{total} ({where}) failed: {result.error}")
            results.append(result)
            counted += 1
            bar.update(counted - bar.n)
    finally:
        runner.step_progress = None
        bar.close()
    return results


def _finish(results: Sequence[PairResult], started: float, world_size: int, pairs: Sequence[Pair] = ()) -> int:
    print(summary(results, time.perf_counter() - started, world_size, pairs), flush=True)
    return 1 if any(r.status != "done" and r.status != "skipped" for r in results) else 0


def _sharded(fabric: Any, runner: PairRunner, pairs: list[Pair], started: float) -> int:
    """The body of each process of a sharded batch; returns the exit status (rank 0 reports)."""
    import torch.distributed as dist

    rank, world_size = fabric.global_rank, fabric.world_size
    # Rank 0's list of pairs is the one that counts (nodes could see different files).
    shared: list[Any] = [pairs]
    dist.broadcast_object_list(shared, src=0)
    pairs = shared[0]
    results = run_share(runner, pairs[rank::world_size], len(pairs), rank, world_size, device_placement(fabric))
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(results, gathered, dst=0)
    if rank != 0:
        return 0
    return _finish([r for share in gathered for r in share], started, world_size, pairs)


def run_batch(runner: PairRunner, args: Sequence[str], started: float) -> int:
    """``python cli.py batch ...`` once the command line has checked its configuration (``runner``);
    ``args`` are the arguments after ``batch`` as typed (a sharded batch's processes rerun them). Returns
    the exit status: 0 when every pair is done (or skipped), 1 when any pair failed."""
    settings = runner.settings
    contents, styles = runner.contents_and_styles()
    pairs = make_pairs(
        expand(contents, "batch.contents"), expand(styles, "batch.styles"), settings.output_dir, settings.name
    )
    check_outputs(runner, pairs)
    for folder in sorted({pair.output.parent for pair in pairs}):
        check_writable(folder / f"check{pairs[0].output.suffix}")
    if settings.world_size > 1:
        return _launch(runner, pairs, list(args), started)
    results: list[PairResult] = []
    try:
        run_share(runner, pairs, len(pairs), 0, 1, {}, results)
    except BaseException:  # interrupted: report what was done, then stop
        print(summary(results, time.perf_counter() - started, 1, pairs), flush=True)
        raise
    return _finish(results, started, 1, pairs)


def _launch(runner: PairRunner, pairs: list[Pair], args: list[str], started: float) -> int:
    if sys.argv[1:] != ["batch", *args]:
        raise ConfigError(
            "batch.devices / batch.num_nodes above 1 start processes that re-run the command line: "
            "run it as a command (python cli.py batch ...), not through cli_main(args) from Python"
        )
    settings, accelerator = runner.settings, runner.accelerator
    if not isinstance(accelerator, str):
        raise ConfigError("a sharded batch needs trainer.accelerator as a name: auto, cpu or gpu")
    if settings.num_nodes > 1 and not other_nodes_announced():
        raise ConfigError(
            f"batch.num_nodes is {settings.num_nodes}, but nothing says other machines take part (no NODE_RANK, "
            "SLURM, torchrun or LSF environment), so this process would wait for them forever: run the "
            "same command on every machine with MASTER_ADDR, MASTER_PORT and NODE_RANK set (or under SLURM or "
            "torchrun), or set batch.num_nodes 1"
        )
    fabric = start_fabric(accelerator, settings.devices, settings.num_nodes, "trainer.accelerator")
    return launch(fabric, functools.partial(_sharded, runner=runner, pairs=pairs, started=started))


def other_nodes_announced() -> bool:
    """Whether a launcher's environment says this process is one node of several: Lightning's own
    (``NODE_RANK``), or one of the cluster environments Lightning detects."""
    from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    # Kubeflow is not in the list: Lightning cannot detect it (its detect() raises), only be told.
    if "NODE_RANK" in os.environ:
        return True
    return any(env.detect() for env in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment))
