"""Batch runs: ``python cli.py batch``, many content x style pairs from one configuration.

Every pair is an independent optimisation with the ``model:``, ``data:``, ``trainer:`` and ``output:``
settings of the configuration, its own output file and its own TensorBoard run. A pair that fails is
reported and skipped; the summary at the end lists every pair. With ``batch.devices`` or
``batch.num_nodes`` above 1, Lightning's launcher starts one process per device and node and each
process optimises its share of the pairs on its own device (no gradient is exchanged); the processes
only talk to each other to agree on the pairs at the start and to collect the results at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import os
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import seed_everything
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerStatus
from tqdm import tqdm

from nst_lightning.callbacks import partial_path
from nst_lightning.checkpoint import check_same_config, read_checkpoint
from nst_lightning.cli import StyleTransferCLI, quiet_lightning, record_layer_means, trainer_error
from nst_lightning.errors import CheckpointError, ConfigError, ImageError, Interrupted, NSTError
from nst_lightning.guard import INTERRUPTED_CHECKPOINT, RunGuard
from nst_lightning.image_io import (
    check_outputs_apart,
    check_replaceable,
    check_writable,
    file_kind,
    find_images,
    image_format,
)

NAME_FIELDS = ("content", "style", "n")

# How long the processes of a sharded batch wait for each other at the end: one process may finish
# its pairs long before another does.
_GATHER_TIMEOUT = timedelta(days=7)

# In a batch, unlike ``fit``: no per-pair progress bar or model summary (the bar is over pairs), and
# no checkpoints at the end of a pair (each is hundreds of MB at 512 px, and a finished pair is not
# resumed); an interrupted pair still gets its checkpoint, from which the next run resumes it. The
# configuration may turn them back on.
BATCH_TRAINER_DEFAULTS = {
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "trainer.enable_checkpointing": False,
}


class BatchSettings:
    """The ``batch:`` section: the pairs, where their images go, and how many processes share them.

    Args:
        contents: content images: files, folders (their image files) or glob patterns such as
            ``photos/*.jpg``. null takes data.content.
        styles: style images, given the same way. null takes data.style. Every content image is
            stylised with every style image.
        output_dir: folder of the stylised images.
        name: file name of each stylised image inside output_dir; ``{content}`` and ``{style}`` are
            the names of the two images without extension, ``{n}`` the pair's number (1, 2, ...).
            The extension picks the format; a ``/`` makes subfolders.
        skip_existing: leave out the pairs whose output file already exists (to finish an
            interrupted batch; an interrupted pair is resumed from its checkpoint either way).
        devices: processes per node, each on its own device (a GPU, or a share of the CPU); the
            pairs are dealt out among all processes of all nodes.
        num_nodes: machines taking part (Lightning's launcher: MASTER_ADDR, MASTER_PORT and
            NODE_RANK on each, or SLURM/torchrun).
        progress_bar: show a progress bar over the pairs: true, false, or null for only when the
            error stream is a terminal.
    """

    def __init__(
        self,
        contents: list[str] | str | None = None,
        styles: list[str] | str | None = None,
        output_dir: str = "outputs/batch",
        name: str = "{content}__{style}.png",
        skip_existing: bool = False,
        devices: int = 1,
        num_nodes: int = 1,
        progress_bar: bool | None = None,
    ) -> None:
        self.contents = _as_list(contents)
        self.styles = _as_list(styles)
        self.output_dir = Path(output_dir)
        self.name = name
        self.skip_existing = skip_existing
        self.devices = devices
        self.num_nodes = num_nodes
        self.progress_bar = progress_bar
        for key, value in (("devices", devices), ("num_nodes", num_nodes)):
            if value < 1:
                raise ConfigError(f"batch.{key} must be at least 1, got {value}")
        for key, value in (("contents", self.contents), ("styles", self.styles)):
            if value is not None and not value:
                raise ConfigError(f"batch.{key} is an empty list: give files, folders or glob patterns (or null)")
        try:
            example = name.format(content="c", style="s", n=1)
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"batch.name {name!r} is not a valid pattern ({type(err).__name__}: {err}): use the fields "
                + ", ".join("{" + field + "}" for field in NAME_FIELDS)
            ) from None
        if Path(example).is_absolute() or not Path(example).name:
            raise ConfigError(
                f"batch.name {name!r} must be a file name inside batch.output_dir, such as {{content}}.png"
            )
        try:
            image_format(example)
        except ImageError:
            raise ConfigError(f"batch.name {name!r} must end in an image extension such as .png or .jpg") from None

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _as_list(value: list[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else [str(v) for v in value]


class _ResumeRefused(Exception):
    """An interrupted pair's checkpoint does not fit this run: the pair starts over."""


@dataclass(frozen=True)
class Pair:
    """One content x style optimisation of the batch."""

    n: int  # 1-based position in the batch
    content: Path
    style: Path
    output: Path
    run: str  # TensorBoard run: the output's path inside output_dir, without extension


@dataclass
class PairResult:
    """What became of a pair: ``done``, ``failed``, ``skipped`` (output existed) or ``interrupted``."""

    pair: Pair
    status: str
    seconds: float = 0.0
    rank: int = 0
    error: str = ""
    log_dir: str = ""


def expand(entries: Sequence[str], key: str) -> list[Path]:
    """The image files of a list of files, folders and glob patterns, in order, without repeats."""
    seen: set[Path] = set()
    files: list[Path] = []
    for entry in entries:
        for path in find_images(entry, key):
            resolved = path.resolve()
            if resolved not in seen:
                seen.add(resolved)
                files.append(path)
    return files


def make_pairs(contents: Sequence[Path], styles: Sequence[Path], output_dir: Path, name: str) -> list[Pair]:
    """Every content with every style (contents outer, styles inner), each with its output file.

    Two pairs that would write the same file are a :class:`ConfigError`.
    """
    pairs: list[Pair] = []
    writers: dict[Path, Pair] = {}
    for content in contents:
        for style in styles:
            n = len(pairs) + 1
            relative = Path(name.format(content=content.stem, style=style.stem, n=n))
            pair = Pair(n, content, style, output_dir / relative, relative.with_suffix("").as_posix())
            other = writers.setdefault(pair.output.resolve(), pair)
            if other is not pair:
                raise ConfigError(
                    f"pairs {other.content} x {other.style} and {content} x {style} would both write "
                    f"{pair.output}: rename one of the images or add {{n}} to batch.name"
                )
            pairs.append(pair)
    return pairs


def _is_one(value: Any) -> bool:
    """Whether a trainer.devices / trainer.num_nodes value means a single device."""
    if isinstance(value, (list, tuple)):
        return len(value) == 1
    if isinstance(value, str):
        items = [item for item in value.split(",") if item.strip()]
        return value.strip() == "1" or (value.strip().endswith(",") and len(items) == 1)
    return value == 1


class BatchCLI(StyleTransferCLI):
    """The ``fit`` command's configuration plus a ``batch:`` section (:class:`BatchSettings`).

    Constructing it parses the arguments and checks every section once (so a bad model setting is one
    error, not one failure per pair); :meth:`fit_pair` builds and runs the classes for one pair.
    Parse errors are raised as :class:`ConfigError` rather than printed with the usage.
    """

    writes_output_path = False  # output.path is not used: each pair has its own output

    def __init__(self, args: Sequence[str]) -> None:
        self.settings: BatchSettings | None = None
        parser_kwargs = {
            "exit_on_error": False,
            "description": "Stylise every content image with every style image (see batch.* below).",
        }
        try:
            super().__init__(args=list(args), run=False, parser_kwargs=parser_kwargs)
        except argparse.ArgumentError as err:
            message = " ".join(str(err).split())
            raise ConfigError(f"{message} (python cli.py batch --help lists the keys)") from None
        self._base_config = self.config.clone()

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_class_arguments(BatchSettings, "batch")
        # The pairs come from batch.contents and batch.styles; "" marks data.content/style unset.
        parser.set_defaults({"data.content": "", "data.style": "", **BATCH_TRAINER_DEFAULTS})

    def instantiate_classes(self) -> None:
        """Called once while parsing: a check of every section; the pairs' classes come later."""
        self.config_init = self._instantiate(self.config)
        self.settings = self.config_init.batch

    def _instantiate(self, config: Any) -> Any:
        # jsonargparse 4.49 renamed instantiate_classes (still what LightningCLI itself calls) to instantiate.
        instantiate = getattr(self.parser, "instantiate", None) or self.parser.instantiate_classes
        return instantiate(config)

    def contents_and_styles(self) -> tuple[list[str], list[str]]:
        """batch.contents and batch.styles, or data.content and data.style where they are null."""
        chosen = []
        for key, fallback in (("contents", "content"), ("styles", "style")):
            entries = getattr(self.settings, key)
            if entries is None:
                value = self.config.data[fallback]
                if not value:
                    raise ConfigError(f"no {fallback} images: set batch.{key} (files, folders or glob patterns)")
                entries = [value] if isinstance(value, str) else list(value)
            chosen.append(entries)
        return chosen[0], chosen[1]

    def check_trainer(self) -> None:
        """Without sharding, each pair runs with the trainer: section as it is. It must name one
        device, and a Trainer must be possible here (say, no GPU for accelerator gpu): that is one
        error before the batch rather than the same failure for every pair."""
        trainer = self.config.trainer
        if not (_is_one(trainer.devices) and _is_one(trainer.num_nodes)):
            raise ConfigError(
                f"trainer.devices is {trainer.devices} and trainer.num_nodes {trainer.num_nodes}, but in a batch "
                "each pair runs on one device: set them to 1 and use batch.devices / batch.num_nodes to share "
                "the pairs among devices"
            )
        try:
            self.instantiate_trainer(logger=False)
        except (MisconfigurationException, ValueError, TypeError, ImportError, RuntimeError) as err:
            raise trainer_error(trainer, err) from None
        finally:
            self.config_init = None

    def check_outputs(self, pairs: Sequence[Pair]) -> None:
        """Before any pair runs: no pair's output (nor its partial image) may be one of the batch's
        inputs, or exist as something other than a regular file."""
        inputs = sorted({("batch.contents", p.content) for p in pairs} | {("batch.styles", p.style) for p in pairs})
        inputs += self.input_files(self._base_config)
        outputs = []
        for pair in pairs:
            outputs.append(("the output", pair.output, "batch.output_dir or batch.name"))
            outputs.append(("the partial image", partial_path(pair.output), "batch.output_dir or batch.name"))
        check_outputs_apart(outputs, inputs)
        for _, path, _ in outputs:
            check_replaceable(path, "output")

    def pending_checkpoint(self, pair: Pair) -> Path:
        """Where an interrupted pair's checkpoint goes, and where the next run of the batch looks for
        it: ``<default_root_dir>/lightning_logs/batch/<run>/interrupted.ckpt``, whatever the logger."""
        root = Path(self._base_config.trainer.default_root_dir or ".")
        return root / "lightning_logs" / "batch" / pair.run / INTERRUPTED_CHECKPOINT

    def fit_pair(self, pair: Pair, placement: dict[str, Any]) -> tuple[bool, str]:
        """Optimises one pair; returns (finished, log folder).

        ``placement`` holds trainer arguments that override the configuration (the device of this
        process in a sharded batch). A pair interrupted in an earlier run resumes from its checkpoint
        (:meth:`pending_checkpoint`), which is removed once the pair is done; a checkpoint that does
        not fit this run's settings or images is reported and the pair starts over.
        """
        pending = self.pending_checkpoint(pair)
        if file_kind(pending) != "file":
            return self._fit_pair(pair, placement, None)
        try:
            return self._fit_pair(pair, placement, pending)
        except _ResumeRefused as err:  # another configuration or other images since the interruption
            print(
                f"nst-lightning: pair {pair.n}: cannot resume from {pending} ({err}); starting the pair over",
                file=sys.stderr,
                flush=True,
            )
            return self._fit_pair(pair, placement, None)

    def _fit_pair(self, pair: Pair, placement: dict[str, Any], resume: Path | None) -> tuple[bool, str]:
        config = self._base_config.clone()
        config.data.content = str(pair.content)
        config.data.style = str(pair.style)
        config.output.path = str(pair.output)
        # The config.yaml saved in the pair's log folder reruns exactly this pair with ``batch``.
        config.batch.contents = [str(pair.content)]
        config.batch.styles = [str(pair.style)]
        config.batch.output_dir = str(pair.output.parent)
        config.batch.name = pair.output.name.replace("{", "{{").replace("}", "}}")
        config.batch.skip_existing = False
        config.batch.devices = config.batch.num_nodes = 1
        self.config = config
        if config.seed_everything is not False:
            seed_everything(config.seed_everything, workers=True, verbose=False)
        self.config_init = self._instantiate(config)
        self.model = self.config_init.model
        self.datamodule = self.config_init.data
        record_layer_means(config, self.model)
        overrides = dict(placement)
        root = Path(config.trainer.default_root_dir or ".")
        if config.trainer.logger in (None, True):
            overrides["logger"] = TensorBoardLogger(save_dir=root / "lightning_logs" / "batch", name=pair.run)
        elif config.trainer.logger is False:
            # No logger: the pair's snapshots and config.yaml still need a folder of their own.
            overrides["default_root_dir"] = str(root / "lightning_logs" / "batch" / pair.run)
        self.trainer = self.instantiate_trainer(**overrides)
        pending = self.pending_checkpoint(pair)
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunGuard):
                callback.interrupted_path = pending
        try:
            self.check_run_outputs(self.trainer, self.input_files(config))
            if resume is not None:  # the same checks as fit's --ckpt_path, before the pair starts
                checkpoint = read_checkpoint(resume, mmap=True)
                check_same_config(resume, checkpoint, model=config.model.as_dict(), data=config.data.as_dict())
                del checkpoint
            self.trainer.fit(self.model, datamodule=self.datamodule, ckpt_path=resume)
            finished = self.trainer.state.status == TrainerStatus.FINISHED
            if finished and file_kind(pending) == "file":
                pending.unlink()  # done: the next run must not resume from it
            return finished, str(self.trainer.log_dir or "")
        except CheckpointError as err:
            # Refused before the first step (its settings, targets or size): not a failure of the pair.
            if resume is not None and self.trainer.global_step == 0:
                raise _ResumeRefused(str(err)) from None
            raise
        finally:
            self.trainer = self.model = self.datamodule = self.config_init = None


@contextlib.contextmanager
def _as_rank_zero() -> Iterator[None]:
    """Lightning's rank-zero-only switch reads 0 inside: each pair's Trainer is a single-device run
    of its own, whose logger and messages must work in every process of a sharded batch."""
    saved = getattr(rank_zero_only, "rank", 0)
    rank_zero_only.rank = 0
    try:
        yield
    finally:
        rank_zero_only.rank = saved


def _seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _run_pair(cli: BatchCLI, pair: Pair, placement: dict[str, Any], rank: int, report: Any) -> PairResult:
    """One pair; an error is caught and described in the result (Ctrl-C is not caught)."""
    result = PairResult(pair, "failed", rank=rank)
    start = time.perf_counter()
    try:
        with _as_rank_zero():
            finished, result.log_dir = cli.fit_pair(pair, placement)
        result.status = "done" if finished else "failed"
        result.error = "" if finished else "the run stopped before its last step"
    except Interrupted:  # Ctrl-C or SIGTERM during the pair's optimisation: stop the batch
        raise
    except NSTError as err:  # the user's problem: the message says it all
        result.error = " ".join(str(err).split())
    except Exception as err:  # a bug or a crash (out of memory...): keep the traceback for a report
        result.error = f"{type(err).__name__}: {' '.join(str(err).split())}"
        report(traceback.format_exc().rstrip())
    finally:
        result.seconds = time.perf_counter() - start
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return result


def run_share(
    cli: BatchCLI,
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
    settings = cli.settings
    prefix = f"[rank {rank}] " if world_size > 1 else ""
    show_bar = sys.stderr.isatty() if settings.progress_bar is None else settings.progress_bar
    bar = tqdm(
        total=len(pairs),
        desc=f"{prefix}pairs",
        unit="pair",
        disable=not show_bar,
        position=rank % settings.devices if world_size > 1 else None,
        file=sys.stderr,
        dynamic_ncols=True,
    )

    def report(line: str) -> None:
        bar.write(line, file=sys.stderr)

    results = [] if results is None else results
    try:
        for pair in pairs:
            bar.set_postfix_str(pair.run)
            # The final path only ever holds a finished image; an interrupted pair is resumed even so.
            pending = file_kind(cli.pending_checkpoint(pair)) == "file"
            if settings.skip_existing and pair.output.exists() and not pending:
                result = PairResult(pair, "skipped", rank=rank)
                report(f"{prefix}pair {pair.n}/{total} skipped: {pair.output} exists")
            else:
                if pending:
                    report(f"{prefix}pair {pair.n}/{total}: resuming from {cli.pending_checkpoint(pair)}")
                try:
                    result = _run_pair(cli, pair, placement, rank, report)
                except BaseException as err:  # Ctrl-C (Lightning turns it into SystemExit): stop the batch
                    results.append(PairResult(pair, "interrupted", rank=rank))
                    if isinstance(err, Interrupted):
                        done = sum(r.status == "done" for r in results)
                        err.advice = resume_advice(pair, err, settings.skip_existing, done)
                    raise
                if result.status == "done":
                    report(f"{prefix}pair {pair.n}/{total} done: {pair.output} ({_seconds(result.seconds)})")
                else:
                    where = f"{pair.content} x {pair.style}"
                    report(f"nst-lightning: {prefix}pair {pair.n}/{total} ({where}) failed: {result.error}")
            results.append(result)
            bar.update()
    finally:
        bar.close()
    return results


def resume_advice(pair: Pair, err: Interrupted, skip_existing: bool, done: int) -> str:
    """How to go on after an interruption during ``pair``: the same command resumes that pair from
    its checkpoint (:meth:`BatchCLI.pending_checkpoint`); skip_existing skips the pairs done."""
    how = (
        f"pair {pair.n} resumes from its checkpoint {err.checkpoint}"
        if err.checkpoint is not None
        else f"pair {pair.n} starts over"
    )
    if skip_existing:
        return f"run the same command again: {how}, and the pairs done are skipped"
    if done:
        return f"run the same command again, with --batch.skip_existing true to skip the {done} pair(s) done: {how}"
    return f"run the same command again: {how}"


def summary(results: Sequence[PairResult], seconds: float, world_size: int) -> str:
    """The end-of-batch report: counts, then one line per pair in batch order."""
    results = sorted(results, key=lambda r: r.pair.n)
    counts = {status: sum(r.status == status for r in results) for status in ("done", "failed", "skipped")}
    head = f"batch: {counts['done']} of {len(results)} pairs done, {counts['failed']} failed"
    if counts["skipped"]:
        head += f", {counts['skipped']} skipped (output exists)"
    head += f", in {_seconds(seconds)}"
    if world_size > 1:
        head += f" on {world_size} processes"
    lines = [head]
    width = len(str(len(results)))
    for r in results:
        where = f", rank {r.rank}" if world_size > 1 else ""
        pair = f"{r.pair.n:>{width}}  {r.pair.content} x {r.pair.style}"
        if r.status == "done":
            lines.append(f"  done     {pair} -> {r.pair.output} ({_seconds(r.seconds)}{where})")
        elif r.status == "skipped":
            lines.append(f"  skipped  {pair} -> {r.pair.output} (exists{where})")
        else:
            lines.append(f"  {r.status.upper():<8} {pair}: {r.error or 'stopped'} ({_seconds(r.seconds)}{where})")
    return "\n".join(lines)


def _finish(results: Sequence[PairResult], started: float, world_size: int) -> int:
    print(summary(results, time.perf_counter() - started, world_size), flush=True)
    return 1 if any(r.status != "done" and r.status != "skipped" for r in results) else 0


def _sharded(fabric: Any, cli: BatchCLI, pairs: list[Pair], started: float) -> int:
    """The body of each process of a sharded batch; returns the exit status (rank 0 reports)."""
    import torch.distributed as dist

    rank, world_size = fabric.global_rank, fabric.world_size
    # Rank 0's list of pairs is the one that counts (nodes could see different files).
    shared: list[Any] = [pairs]
    dist.broadcast_object_list(shared, src=0)
    pairs = shared[0]
    if fabric.device.type == "cuda":
        placement = {"accelerator": "cuda", "devices": [fabric.device.index]}
    else:
        placement = {"accelerator": fabric.device.type, "devices": 1}
    placement.update(num_nodes=1, strategy="auto")
    results = run_share(cli, pairs[rank::world_size], len(pairs), rank, world_size, placement)
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    dist.gather_object(results, gathered, dst=0)
    if rank != 0:
        return 0
    return _finish([r for share in gathered for r in share], started, world_size)


def batch_main(args: Sequence[str]) -> int:
    """``python cli.py batch ...`` with the arguments after ``batch``; returns the exit status:
    0 when every pair is done (or skipped), 1 when any pair failed."""
    started = time.perf_counter()
    # cli_main hands LightningCLI the arguments after "batch": not the mistake this warns about.
    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended.*")
    cli = BatchCLI(args)
    settings = cli.settings
    contents, styles = cli.contents_and_styles()
    pairs = make_pairs(
        expand(contents, "batch.contents"), expand(styles, "batch.styles"), settings.output_dir, settings.name
    )
    cli.check_outputs(pairs)
    for folder in sorted({pair.output.parent for pair in pairs}):
        check_writable(folder / f"check{pairs[0].output.suffix}")
    with quiet_lightning():
        if settings.world_size == 1:
            cli.check_trainer()
            results: list[PairResult] = []
            try:
                run_share(cli, pairs, len(pairs), 0, 1, {}, results)
            except BaseException:  # interrupted: report what was done, then stop
                print(summary(results, time.perf_counter() - started, 1), flush=True)
                raise
            return _finish(results, started, 1)
        return _launch(cli, pairs, settings, list(args), started)


def _launch(cli: BatchCLI, pairs: list[Pair], settings: BatchSettings, args: list[str], started: float) -> int:
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    if sys.argv[1:] != ["batch", *args]:
        raise ConfigError(
            "batch.devices / batch.num_nodes above 1 start processes that re-run the command line: "
            "run it as a command (python cli.py batch ...), not through cli_main(args) from Python"
        )
    accelerator = cli.config.trainer.accelerator
    if not isinstance(accelerator, str):
        raise ConfigError("a sharded batch needs trainer.accelerator as a name: auto, cpu or gpu")
    if settings.num_nodes > 1 and not other_nodes_announced():
        raise ConfigError(
            f"batch.num_nodes is {settings.num_nodes}, but nothing says other machines take part (no NODE_RANK, "
            "SLURM, torchrun or LSF environment), so this process would wait for them forever: run the "
            "same command on every machine with MASTER_ADDR, MASTER_PORT and NODE_RANK set (or under SLURM or "
            "torchrun), or set batch.num_nodes 1"
        )
    try:
        # Gloo carries the few objects the processes exchange, on every kind of device.
        strategy = DDPStrategy(process_group_backend="gloo", timeout=_GATHER_TIMEOUT)
        fabric = Fabric(
            accelerator=accelerator, devices=settings.devices, num_nodes=settings.num_nodes, strategy=strategy
        )
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"cannot start {settings.devices} process(es) per node on {settings.num_nodes} node(s) with "
            f"trainer.accelerator {accelerator}: {' '.join(str(err).split())}"
        ) from None
    return fabric.launch(functools.partial(_sharded, cli=cli, pairs=pairs, started=started))


def other_nodes_announced() -> bool:
    """Whether a launcher's environment says this process is one node of several: Lightning's own
    (``NODE_RANK``), or one of the cluster environments Lightning detects."""
    from lightning.fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment

    # Kubeflow is not in the list: Lightning cannot detect it (its detect() raises), only be told.
    if "NODE_RANK" in os.environ:
        return True
    return any(env.detect() for env in (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment))
