"""What the terminal shows: the tool's notes, Lightning kept quiet, one-line warnings, the progress bar, the last line.

A run prints a progress bar (with the loss and the time left) on stderr and, when it is done, one summary line
on stdout; warnings and notes are one line each on stderr. ``--verbose`` brings back what Lightning prints
itself (devices, seed, tips, the model summary) and the source of each warning.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from lightning.pytorch.utilities import rank_zero_only
from tqdm import tqdm

from nst_lightning.io.text import duration, shown_path

LOGGER = logging.getLogger("nst_lightning")
"""The tool's own messages: :func:`note` (shown) and :func:`detail` (shown with ``--verbose``)."""
PREFIX = "nst-lightning"
# Lightning's loggers: devices, seed, tips, "Trainer.fit stopped", the model summary.
LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


@rank_zero_only
def note(message: str) -> None:
    """A line the user should see (a choice made for them, where an image went after a failure)."""
    LOGGER.info(message)


@rank_zero_only
def detail(message: str) -> None:
    """A line only ``--verbose`` shows."""
    LOGGER.debug(message)


class _BarSafeHandler(logging.Handler):
    """Writes a message as one line on stderr, above a progress bar rather than through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(f"{PREFIX}: {record.getMessage()}", file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never break the run
            self.handleError(record)


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, line=None) -> str:
    text = " ".join(str(message).split())
    kind = "warning" if category is UserWarning else f"warning ({category.__name__})"
    return f"{PREFIX}: {kind}: {text}\n"


@contextlib.contextmanager
def session(verbose: bool = False) -> Iterator[None]:
    """The console of one command: the tool's notes on stderr (its details too with ``verbose``),
    warnings as one line without the source file's path, and Lightning's own information lines only
    with ``verbose``. Everything is put back afterwards (a test calls many commands in one process)."""
    handler = _BarSafeHandler(logging.DEBUG if verbose else logging.INFO)
    saved_level = LOGGER.level
    LOGGER.addHandler(handler)
    LOGGER.setLevel(logging.DEBUG if verbose else logging.INFO)
    lightning = [logging.getLogger(name) for name in LIGHTNING_LOGGERS]
    levels = [logger.level for logger in lightning]
    if not verbose:
        for logger in lightning:
            logger.setLevel(logging.WARNING)
    saved_format = warnings.formatwarning
    if not verbose:
        # warnings.formatwarning is the documented hook for the text of a warning.
        warnings.formatwarning = _one_line_warning
    try:
        yield
    finally:
        warnings.formatwarning = saved_format
        for logger, level in zip(lightning, levels, strict=True):
            logger.setLevel(level)
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(saved_level)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no such method, or a closed stream
        return False


class _Bar(Tqdm):
    """A bar whose description stays "stylising" (Lightning's says "Epoch 0": one epoch is the whole run).

    On a terminal it redraws itself in place. Elsewhere (a log file, a pipe, ``nohup``) it is a line of its own
    when the run starts, every :attr:`LINE_EVERY_S` seconds while it goes on, and once at its end with the final
    figures: tqdm's redraws would otherwise fill the file with a copy of the bar per step."""

    LINE_EVERY_S = 30.0

    def __init__(self, *args: Any, file: Any = None, **kwargs: Any) -> None:
        self._as_lines = not _is_terminal(file if file is not None else sys.stderr)
        self._last_line: tuple[int, float, str] | None = None  # its step, its time and its text
        self.seconds_left: float | None = None  # as the run reckons it (ProgressBar); None: not known yet
        super().__init__(*args, file=file, **kwargs)

    @property
    def format_dict(self) -> dict[str, Any]:
        left = "?" if self.seconds_left is None else self.format_interval(self.seconds_left)
        return {**super().format_dict, "left": left}

    def set_description(self, desc: str | None = None, refresh: bool = True) -> None:
        super().set_description("stylising", refresh)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if not self._as_lines:
            return super().display(msg, pos)
        if msg is not None:  # clearing the bar (see clear)
            return False
        last, now = self._last_line, time.monotonic()
        if last is None or (self.n != last[0] and now - last[1] >= self.LINE_EVERY_S):
            self._write_line(now)
        return True

    def clear(self, nolock: bool = False) -> None:
        if not self._as_lines:  # a log has nothing to take back before a message above the bar
            super().clear(nolock)

    def close(self) -> None:
        if self._as_lines and not self.disable:
            with self.get_lock():  # tqdm.write from another thread (--watch's server logging) redraws under it
                if self._last_line is None or str(self) != self._last_line[2]:
                    self._write_line(time.monotonic())  # the last figures, once
            self.leave = False  # each line ended itself: nothing to end or clear
        super().close()

    def _write_line(self, now: float) -> None:
        text = str(self)
        self.fp.write(text + "\n")
        self.fp.flush()
        self._last_line = (self.n, now, text)


class Pace:
    """The time left of a run whose steps cost differently (a coarse-to-fine run's last scale many times its
    first's a step): the pace of the current scale (seconds a unit of work, from the start of its first step,
    which computes the scale's targets too) times the work left. A step of another cost than the last starts a
    scale. tqdm's own reckoning (the mean pace times the steps left) said 4 minutes at 512 px of a print that
    took an hour more."""

    def __init__(self, now: float) -> None:
        self.start = self.last = now  # when this scale's first step began; when the last step ended
        self.work = 0.0  # this scale's work done
        self.cost: float | None = None  # its steps' cost

    def step_done(self, cost: float, now: float) -> None:
        if cost != self.cost:
            self.start, self.work, self.cost = self.last, 0.0, cost
        self.work += cost
        self.last = now

    def seconds_left(self, work_left: float) -> float | None:
        return (self.last - self.start) / self.work * work_left if self.work > 0 else None


class ProgressBar(TQDMProgressBar):
    """Lightning's bar, on stderr, saying what it counts: iterations done of all, time spent and left, and the
    current loss (no epoch number, no logger version)."""

    BAR_FORMAT = "{desc}{percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} iterations [{elapsed}<{left}{postfix}]"

    def init_train_tqdm(self) -> Tqdm:
        # As Lightning's, but on stderr (stdout holds the summary line alone), and counting the run's steps from
        # its first drawing on.
        trainer = self.trainer  # set before the bar is made (on_train_start)
        steps = trainer.max_steps if trainer.max_steps > 0 else None
        done = trainer.global_step
        return _Bar(
            total=steps,
            initial=done,
            desc="stylising: ",  # as set_description makes it
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            dynamic_ncols=True,
            file=sys.stderr,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def on_train_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._count_steps(trainer)  # a resumed run does not start its epoch again
        self._pace = Pace(time.monotonic())

    def on_train_epoch_start(self, trainer: Any, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._count_steps(trainer)

    def _count_steps(self, trainer: Any) -> None:
        """Counts the run's steps (a resumed run starts at its checkpoint's step, of ``max_steps``): one epoch is
        the whole run, and Lightning's count of an epoch's batches does not know where a resumed one started."""
        bar = self.train_progress_bar
        bar.set_description("stylising")
        if trainer.max_steps > 0:
            bar.total = trainer.max_steps
        bar.initial = bar.n = trainer.global_step  # the time left is reckoned from this run's own steps
        bar.refresh()

    def _reckon(self, trainer: Any, pl_module: Any) -> None:
        """The bar's time left, after each step (where the module reckons its work: ``work(start, end)``)."""
        work, n = getattr(pl_module, "work", None), trainer.global_step
        if callable(work) and trainer.max_steps > 0:
            self._pace.step_done(work(n - 1, n), time.monotonic())
            self.train_progress_bar.seconds_left = self._pace.seconds_left(work(n, trainer.max_steps))

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._reckon(trainer, pl_module)
        n, bar = trainer.global_step, self.train_progress_bar
        if self.is_enabled and (n % self.refresh_rate == 0 or n == bar.total):  # as Lightning's, by steps
            if not bar.disable:
                bar.n = n
                bar.refresh()
            bar.set_postfix(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        """The bar's last loss is the summary's final loss: the finished image's (the bar otherwise shows the
        loss where the last step started, a step behind)."""
        final = next((getattr(c, "final_losses", None) for c in trainer.callbacks if hasattr(c, "final_losses")), None)
        bar = self.train_progress_bar
        if final and "total" in final and bar is not None and not bar.disable:
            metrics = self.get_metrics(trainer, pl_module)
            metrics["loss"] = f"{final['total']:.4g}"
            bar.set_postfix(metrics, refresh=True)
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        """Ends the bar's line, so that what follows (the interruption's message, an error) starts a line."""
        try:
            bar = self.train_progress_bar
        except TypeError:  # the run failed before its bar was made
            return
        if not bar.disable:
            bar.close()

    def get_metrics(self, trainer: Any, pl_module: Any) -> dict[str, int | str | float | dict[str, float]]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        loss = metrics.get("loss")
        if isinstance(loss, (int, float)):
            metrics["loss"] = f"{loss:.4g}"
        return metrics


class LossPrinter(Callback):
    """Prints the loss every ``every_n_steps`` steps on stderr, one line each, above the progress bar (neural-style's
    ``-print_iter``; the one-shot form's ``--print-every N``): ``step 50 of 300: loss 6.324 (content 1.2, style
    5.1)``. A line is the loss of the image after that step; the losses reach the host every 10 steps, so the lines
    come a few steps late (never slowing the loop)."""

    def __init__(self, every_n_steps: int = 10) -> None:
        if every_n_steps < 1:
            from nst_lightning.errors import ConfigError

            raise ConfigError(f"LossPrinter's every_n_steps must be at least 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps

    def on_losses(self, trainer: Any, pl_module: Any, rows: list[Any]) -> None:
        if not trainer.is_global_zero:
            return
        hparams = getattr(pl_module, "hparams", {})
        for row in rows:  # a row holds the loss where its step started: the image after row.step steps
            if row.step == 0 or row.step % self.every_n_steps:
                continue
            terms = []
            for name in ("content", "style", "tv", "temporal"):  # weighted as in the total: the terms add up to it
                value, weight = row.values.get(f"loss/{name}"), hparams.get(f"{name}_weight", 1.0)
                if value is not None and weight:
                    terms.append(f"{name} {value * weight:.4g}")
            of = f" of {trainer.max_steps}" if trainer.max_steps > 0 else ""
            detail = f" ({', '.join(terms)})" if terms else ""
            tqdm.write(f"step {row.step}{of}: loss {row.loss:.4g}{detail}", file=sys.stderr)


def summary_line(
    output: str | Path,
    steps: int,
    max_steps: int,
    final_loss: float | None,
    seconds: float,
    log_dir: str | Path | None,
    logs_root: str | Path | None,
) -> str:
    """The last line of a run: where the image is, iterations, final loss, wall time, and where the run's
    logs and checkpoints are, with the command that shows them."""
    iterations = f"{steps} iterations" if steps >= max_steps or max_steps < 0 else f"{steps} of {max_steps} iterations"
    loss = f", final loss {final_loss:.4g}" if final_loss is not None else ""
    line = f"done: {shown_path(output)} ({iterations}{loss}, {duration(seconds)})"
    if log_dir is None:
        return line + "; no TensorBoard logs (trainer.logger is off)"
    if logs_root is None:
        return line + f"; run folder {shown_path(log_dir)}"
    return line + f"; logs and checkpoints in {shown_path(log_dir)}: tensorboard --logdir {shown_path(logs_root)}"
