"""``fit --help`` and ``batch --help`` with this tool's settings first and Lightning's trainer options on request.

LightningCLI's help lists every Trainer argument (about 650 lines, most of them meaningless here: ``fast_dev_run``,
``overfit_batches``, validation intervals). :func:`short_help` keeps the text jsonargparse writes, reorders its
sections (ours first) and keeps only the trainer keys this tool uses; ``--help-all`` prints the whole text. Every
Trainer key is accepted either way: only the help is shortened.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterator

HELP_ALL = "--help-all"
# The Trainer keys a user of this tool sets (the README's and docs/configuration.md's).
TRAINER_KEYS = (
    "accelerator",
    "devices",
    "precision",
    "max_steps",
    "max_time",
    "default_root_dir",
    "logger",
    "callbacks",
    "enable_progress_bar",
    "enable_model_summary",
    "enable_checkpointing",
    "log_every_n_steps",
    "deterministic",
)
CKPT_HELP = (
    "  --ckpt_path CKPT_PATH\n"
    "                        resume from this checkpoint: the interruption's message names it (a finished run's\n"
    "                        last checkpoint goes on with a larger --trainer.max_steps)"
)
_OPTION = re.compile(r"^  (-\w, )?--([\w.]+)")


def _sections(text: str) -> list[list[str]]:
    """The help's sections: each a title line (not indented) and its lines; the usage is the first."""
    sections: list[list[str]] = []
    for line in text.splitlines():
        if line and not line.startswith(" "):
            sections.append([line])
        elif sections:
            sections[-1].append(line)
    return sections


def _entries(lines: list[str]) -> list[tuple[str, list[str]]]:
    """A section's options: (key, lines), the lines after the title; a key of "" for text that is no option."""
    entries: list[tuple[str, list[str]]] = []
    for line in lines:
        match = _OPTION.match(line)
        if match or not entries:
            entries.append((match.group(2) if match else "", [line]))
        else:
            entries[-1][1].append(line)
    return entries


def short_help(text: str, command: str) -> str:
    """LightningCLI's help ``text`` of ``command`` (``fit``, ``batch``) with: a short usage; the tool's sections
    (model, data, output, guard, batch) before the trainer's; the trainer keys of :data:`TRAINER_KEYS` only; and
    ``--ckpt_path`` said in one line."""
    sections = _sections(text)
    if len(sections) < 3:
        return text  # not the help this was written for: leave it whole
    ours, trainer, tail = [], [], []
    hidden = 0
    for section in sections[1:]:
        keys = [key for key, _ in _entries(section[1:]) if key]
        if any(key.startswith("trainer.") for key in keys):
            kept = [section[0]]
            for key, lines in _entries(section[1:]):
                name = key.removeprefix("trainer.").removesuffix(".help")
                if key == "trainer" or (name in TRAINER_KEYS and not key.endswith(".help")):
                    kept += lines
                elif key:
                    hidden += not key.endswith(".help")
            trainer.append(kept)
        elif "ckpt_path" in keys:
            tail.append(["Resuming:", CKPT_HELP, ""])
        else:
            ours.append(section)
    usage = [
        f"usage: nst-lightning {command} [--config FILE|NAME ...] [--KEY VALUE ...]"
        + (" [--ckpt_path CKPT]" if command == "fit" else ""),
        "",
        "Every key below is a flag (--model.style_weight 1e5) and a config file's key; later ones win.",
        "",
    ]
    footer = [
        f"Lightning's {hidden} other trainer options (fast_dev_run, overfit_batches...) work too but mean little here:",
        f"nst-lightning {command} {HELP_ALL} lists every option.",
    ]
    lines = usage + [line for section in [*ours, *trainer, *tail] for line in section] + footer
    return "\n".join(lines).rstrip() + "\n"


@contextlib.contextmanager
def shortened(argv: list[str], command: str) -> Iterator[list[str]]:
    """Runs the body (LightningCLI on the arguments yielded) with its ``--help`` text shortened by :func:`short_help`;
    ``--help-all`` becomes LightningCLI's own ``--help``, the whole text."""
    if HELP_ALL in argv:
        yield ["--help" if arg == HELP_ALL else arg for arg in argv]
        return
    if not ("--help" in argv or "-h" in argv):
        yield argv
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            yield argv
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            sys.stdout.write(buffer.getvalue())
            raise
        with contextlib.suppress(BrokenPipeError):
            sys.stdout.write(short_help(buffer.getvalue(), command))
            sys.stdout.flush()
        raise
    sys.stdout.write(buffer.getvalue())
