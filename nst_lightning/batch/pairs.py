"""A batch's pairs: the ``batch:`` settings, the content x style pairs they make, what became of each,
and the summary at the end."""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nst_lightning.cli import early
from nst_lightning.errors import ConfigError, ImageError, Interrupted
from nst_lightning.io.files import check_outputs_apart, file_kind, find_images
from nst_lightning.io.text import duration
from nst_lightning.run.checks import InputPath, check_batch


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
        contents: list[InputPath] | InputPath | None = None,
        styles: list[InputPath] | InputPath | None = None,
        output_dir: str = "outputs/batch",
        name: str = "{content}__{style}.png",
        skip_existing: bool = False,
        devices: int = 1,
        num_nodes: int = 1,
        progress_bar: bool | None = None,
    ) -> None:
        self.contents = _as_list(contents)
        self.styles = _as_list(styles)
        check_batch(contents=self.contents, styles=self.styles, name=name, devices=devices, num_nodes=num_nodes)
        self.output_dir = Path(output_dir)
        self.name = name
        self.skip_existing = skip_existing
        self.devices = devices
        self.num_nodes = num_nodes
        self.progress_bar = progress_bar

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _as_list(value: list[str] | str | None) -> list[str] | None:
    if value is None:
        return None
    return [os.fspath(value)] if isinstance(value, (str, os.PathLike)) else [os.fspath(v) for v in value]


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


def check_existing(pairs: Sequence[Pair], overwrite: bool, skip_existing: bool) -> None:
    """No pair's output may exist already, unless ``--overwrite`` (or ``batch.skip_existing``, which skips
    those pairs): an :class:`ImageError` naming the first, and how many more."""
    existing = [pair.output for pair in pairs if file_kind(pair.output) == "file"]
    if existing and not overwrite and not skip_existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise ImageError(
            f"the batch's output {existing[0]}{more} exists: pass --overwrite to replace them, or "
            "--batch.skip_existing true to skip those pairs (nothing was written)"
        )


def pending_checkpoint(root: Path, pair: Pair) -> Path:
    """Where an interrupted pair's checkpoint goes, and where the next run of the batch looks for it:
    ``<default_root_dir>/lightning_logs/batch/<run>/interrupted.ckpt``, whatever the logger."""
    from nst_lightning.run.guard import INTERRUPTED_CHECKPOINT  # Lightning: not for the checks before it loads

    return root / "lightning_logs" / "batch" / pair.run / INTERRUPTED_CHECKPOINT


def resume_advice(pair: Pair, err: Interrupted, skip_existing: bool, done: int) -> str:
    """How to go on after an interruption during ``pair``: the same command resumes that pair from
    its checkpoint (:func:`pending_checkpoint`); skip_existing skips the pairs done."""
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


def summary(results: Sequence[PairResult], seconds: float, world_size: int, pairs: Sequence[Pair] = ()) -> str:
    """The end-of-batch report: counts, then one line per pair in batch order. ``pairs`` is the whole batch: the
    pairs without a result (a batch stopped by Ctrl-C before them) count, and are listed, as not started."""
    ran = {r.pair.n for r in results}
    unstarted = [PairResult(p, "not started") for p in pairs if p.n not in ran]
    results = sorted([*results, *unstarted], key=lambda r: r.pair.n)
    counts = {
        status: sum(r.status == status for r in results)
        for status in ("done", "failed", "skipped", "interrupted", "not started")
    }
    head = f"batch: {counts['done']} of {len(results)} pairs done, {counts['failed']} failed"
    if counts["skipped"]:
        head += f", {counts['skipped']} skipped (output exists)"
    for status in ("interrupted", "not started"):
        if counts[status]:
            head += f", {counts[status]} {status}"
    head += f", in {duration(seconds)}"
    if world_size > 1:
        head += f" on {world_size} processes"
    lines = [head]
    width = len(str(len(results)))
    label = 11 if counts["interrupted"] else 8  # INTERRUPTED is the one longer label
    for r in results:
        where = f", rank {r.rank}" if world_size > 1 else ""
        pair = f"{r.pair.n:>{width}}  {r.pair.content} x {r.pair.style}"
        if r.status == "done":
            lines.append(f"  {'done':<{label}} {pair} -> {r.pair.output} ({duration(r.seconds)}{where})")
        elif r.status == "skipped":
            lines.append(f"  {'skipped':<{label}} {pair} -> {r.pair.output} (exists{where})")
        elif r.status == "not started":
            lines.append(f"  {'not run':<{label}} {pair}: not started (the batch stopped before it)")
        else:
            lines.append(f"  {r.status.upper():<{label}} {pair}: {r.error or 'stopped'} ({duration(r.seconds)}{where})")
    return "\n".join(lines)


def check_early(argv: Sequence[str]) -> None:
    """``batch``'s image lists that find nothing, outputs that are inputs, and outputs that exist already (without
    ``--overwrite`` or ``batch.skip_existing``)."""
    try:
        settings = early.read_settings(argv)
    except early.Unknown:
        return
    lists = []
    for key, fallback in (("batch.contents", "data.content"), ("batch.styles", "data.style")):
        if key in settings and settings[key][0] is not None:
            entries = [str(path) for path in early.setting_paths(settings, key)]
        else:
            entries = [str(path) for path in early.setting_paths(settings, fallback)]
        if not entries:
            return  # the full checks say what is missing
        lists.append(expand(entries, key))
    defaults = inspect.signature(BatchSettings).parameters
    output_dir = early.setting_string(settings, "batch.output_dir") or defaults["output_dir"].default
    name = early.setting_string(settings, "batch.name") or defaults["name"].default
    overwrite = early.setting_flag(settings, "output.overwrite")
    skip = early.setting_flag(settings, "batch.skip_existing")
    if overwrite is None or skip is None:
        return
    try:
        pairs = make_pairs(lists[0], lists[1], Path(output_dir), name)
    except (KeyError, IndexError, ValueError):
        return  # a batch.name that is no pattern: the full checks word it
    inputs = sorted({("batch.contents", p.content) for p in pairs} | {("batch.styles", p.style) for p in pairs})
    inputs += [(key, path) for key in early.INPUT_KEYS for path in early.setting_paths(settings, key)]
    where = "batch.output_dir or batch.name"
    check_outputs_apart([("the output", pair.output, where) for pair in pairs], inputs)
    check_existing(pairs, overwrite, skip)
