"""The entry point: ``nst-lightning``, ``python -m nst_lightning`` and ``python cli.py`` run :func:`cli_main`, which
picks the command, runs it, and turns what stops it into one line and an exit status."""

from __future__ import annotations

import atexit
import contextlib
import gc
import socket
import sys
import time
import warnings

from nst_lightning import __version__
from nst_lightning.errors import EXIT_ERROR, EXIT_USAGE, Interrupted, NSTError
from nst_lightning.errors import stop as _stop


def _version() -> None:
    """``--version``: this tool's version and where it runs from, the versions of torch and Lightning (from the
    installed packages' metadata, at once), then the device a run would use, which needs torch itself (its import
    takes 1-3 s on a CPU; the lines before it are out by then)."""
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    print(f"nst-lightning {__version__} ({Path(__file__).resolve().parent})", flush=True)
    found = []
    for name, label in (("torch", "torch"), ("lightning", "Lightning"), ("torchvision", "torchvision")):
        try:
            found.append(f"{label} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{label} missing")
    print(f"{', '.join(found)}, Python {sys.version.split()[0]}", flush=True)
    import os

    import torch

    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        more = f" (the first of {count}; --device gpu)" if count > 1 else ""
        device = f"gpu, {torch.cuda.get_device_name(0)}{more}; CUDA {torch.version.cuda}"
    elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        device = "gpu, Apple MPS"
    else:
        build = f"torch's CUDA {torch.version.cuda} build finds no GPU" if torch.version.cuda else "CPU-only torch"
        device = f"cpu, {os.cpu_count()} logical cores; {build}"
    print(f"device (--device auto, the default): {device}", flush=True)


def cli_main(args: list[str] | None = None) -> None:
    """Runs the command of ``args`` (default: ``sys.argv[1:]``): ``fit`` one optimisation from config files
    and dotted flags, ``batch`` many (see :mod:`nst_lightning.batch.runs`), ``configs`` the list of shipped
    configs, ``serve`` the web app (:mod:`nst_lightning.serve`), ``video`` a video (:mod:`nst_lightning.video`),
    and ``CONTENT STYLE ...`` one optimisation from plain flags (:mod:`nst_lightning.cli.oneshot`, which builds a
    ``fit`` command). ``--verbose`` anywhere shows what Lightning says as well; ``--overwrite`` lets ``fit``,
    ``batch`` and ``video`` replace existing outputs.

    Exit status: 0 when the run is done; 1 with one line on stderr for a problem with the input (or
    a batch in which some pair failed); 2 for a command line or config that does not parse;
    128 + the signal's number after Ctrl-C (130) or SIGTERM (143), once the partial image and a
    checkpoint are saved.
    Torch uses one thread per physical core unless ``OMP_NUM_THREADS`` (or ``MKL_NUM_THREADS``) says
    otherwise; freed memory is kept for the next iteration (see :func:`~nst_lightning.run.runtime.keep_freed_memory`).
    """
    argv = raw = sys.argv[1:] if args is None else list(args)
    verbose = "--verbose" in argv
    argv = [arg for arg in argv if arg != "--verbose"]
    command = argv[0] if argv else None
    if command == "--version":
        _version()
        return
    if command == "serve":  # the web app: its libraries load only here (nst_lightning.serve)
        from nst_lightning.serve.command import serve_main

        serve_main(argv[1:])
        return
    from nst_lightning.cli import (
        configs,
        oneshot,  # light: the help and the list come at once too
    )

    if command in (None, "-h", "--help"):
        if command is None:
            oneshot.parser().print_usage(sys.stderr)
            _stop("error", "give CONTENT STYLE, or a command (nst-lightning --help lists them)", EXIT_USAGE)
        oneshot.parser().parse_args([command])  # prints the help, and exits
    if command in ("configs", "--list-configs"):
        with contextlib.suppress(BrokenPipeError):  # nst-lightning configs | head
            print(configs.config_list(), flush=True)
        return
    if command == "video":  # its --help, --version and a flag that does not parse at once, PyAV installed or not
        from nst_lightning.video.command import parser as video_parser

        video_parser().parse_known_args(argv[1:])
    # Everything the command line alone can tell is checked before torch and Lightning load (seconds).
    from nst_lightning.cli import early

    watch = None  # --watch's port and the names the page shows
    if command not in ("fit", "batch", "video"):
        try:
            watch = _watch_request(argv)
            argv = oneshot.fit_arguments(argv)
        except NSTError as err:  # values that parse but cannot work, as fit's own checks say them
            _stop("error", str(err), EXIT_ERROR)
    if command != "video":
        try:
            argv = ["--output.overwrite=true" if arg == "--overwrite" else arg for arg in early.expand_shorthands(argv)]
            argv = configs.resolve_config_names(argv)
            early.check_config_files(argv)
        except NSTError as err:
            _stop("error", str(err), EXIT_USAGE)
        try:
            if argv[0] == "batch":
                from nst_lightning.batch.pairs import check_early

                check_early(argv[1:])
            else:
                early.check_fit(argv[1:])
        except NSTError as err:
            _stop("error", str(err), EXIT_ERROR)
    listener = _watch_listener(watch)
    if args is None:
        # This process is the command. Python's last garbage collection at exit went through every object of
        # torch and Lightning (about 1 s of CPU): frozen, after the other exit handlers, they are left to the
        # operating system. Everything the run writes is closed (and synced) by then.
        atexit.register(gc.freeze)
    from nst_lightning.io import console
    from nst_lightning.run.runtime import keep_freed_memory, set_default_threads

    set_default_threads()
    keep_freed_memory()
    # The loader only paces the steps: worker processes would not help. The extractor is meant to
    # stay in eval mode. Neither needs a warning on every run.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", r".*module\(s\) in eval mode.*")
    # Raised inside Lightning 2.6 itself on every step; nothing a user can act on.
    warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\).*")
    # A resume whose checkpoint lies outside this run's folder (a copied checkpoint, a batch's pair): Lightning's
    # best-k bookkeeping, which this tool does not use, starts afresh; the run itself resumes in full.
    warnings.filterwarnings("ignore", ".*dirpath has changed from.*")
    # cli_main hands LightningCLI the arguments it has built: not the mistake this warns about.
    warnings.filterwarnings("ignore", ".*LightningCLI's args parameter is intended.*")
    with console.session(verbose):
        if command == "video":  # its own flags; PyAV and OpenCV load only here
            _video_main(argv[1:], verbose)
        elif argv[0] == "batch":  # a sharded batch's processes rerun the command line as it was typed (raw)
            _batch_main(argv[1:], raw[1:], verbose)
        else:
            _fit_main(argv, verbose, listener, watch)


def _watch_request(argv: list[str]) -> tuple[int, dict] | None:
    """The one-shot form's ``--watch`` (its port and the names the page shows), once its extra is found to be
    installed (looked for, not imported: torch is not loaded yet), or None without ``--watch``."""
    from nst_lightning.cli import oneshot

    watch = oneshot.watch_request(argv)
    if watch is not None:
        from nst_lightning.serve.watch import check_extras

        try:
            check_extras()
        except NSTError as err:
            _stop("error", str(err), EXIT_USAGE)
    return watch


def _watch_listener(watch: tuple[int, dict] | None) -> socket.socket | None:
    """``--watch``'s port, listened on before torch loads (a port in use is one line); its address on stderr."""
    if watch is None:
        return None
    from nst_lightning.serve.watch import listen, url

    try:
        listener = listen(watch[0])
    except NSTError as err:
        _stop("error", str(err), EXIT_ERROR)
    print(f"nst-lightning: watch at {url(listener)}", file=sys.stderr, flush=True)
    return listener


def _fit_main(argv: list[str], verbose: bool, listener: socket.socket | None, watch: tuple[int, dict] | None) -> None:
    """``fit``, with ``--watch``'s page served on ``listener`` while it runs (if given)."""
    from nst_lightning.cli.fit import fit_main

    if listener is None or watch is None:
        fit_main(argv, verbose)
        return
    from nst_lightning.serve.watch_app import watching

    with watching(listener, watch[1]) as feed:
        fit_main(argv, verbose, callbacks=[feed])


def _video_main(args: list[str], verbose: bool) -> None:
    """``nst-lightning video ...`` with the arguments after ``video`` (see :mod:`nst_lightning.video.command`)."""
    from nst_lightning.video import Stopped
    from nst_lightning.video.command import EXTRAS_MISSING, missing_extras, video_main

    if missing_extras():
        _stop("error", EXTRAS_MISSING.format(", ".join(missing_extras())), EXIT_ERROR)
    from nst_lightning.run.runtime import quiet_lightning

    try:
        with contextlib.nullcontext() if verbose else quiet_lightning():
            video_main(args)
    except Stopped as err:
        _stop("interrupted", str(err), err.code)
    except NSTError as err:
        _stop("error", str(err), EXIT_ERROR)
    except KeyboardInterrupt:
        _stop("interrupted", "Ctrl-C before the first frame started: run the same command again", 130)


def _batch_main(args: list[str], typed: list[str], verbose: bool) -> None:
    """``python cli.py batch ...`` with the arguments after ``batch`` (``typed``: as they were typed)."""
    from nst_lightning.batch import runs as batch
    from nst_lightning.batch.command import BatchCLI
    from nst_lightning.cli.fithelp import shortened
    from nst_lightning.run.runtime import quiet_lightning

    started = time.perf_counter()
    try:
        with contextlib.nullcontext() if verbose else quiet_lightning():
            with shortened(args, "batch") as shown:  # --help as fit's
                status = batch.run_batch(BatchCLI(shown), typed, started)
    except Interrupted as err:
        _stop("interrupted", f"the batch stopped at {err}", err.exit_code)
    except NSTError as err:
        _stop("error", str(err), EXIT_ERROR)
    except KeyboardInterrupt:
        _stop("interrupted", "Ctrl-C: the batch stopped (batch.skip_existing: true skips the pairs done)", 130)
    if status:
        raise SystemExit(status)
