#!/usr/bin/env python
"""Start-up and mistake times of the one-shot command, as a user meets them (issue 22 item 4, issue 24 item 2).

Each run is the real command in a process of its own (``python -m nst_lightning CONTENT STYLE -o OUT --size 64
--steps 1``), timed from its start: to the progress bar's first line (the start), through the bar's last
iteration (the loop), to the summary line and to the exit. ``overhead`` is the wall time less the loop: what
issue 22 asks to be at most 5 s on a CPU, 4 s on a GPU. Then the seconds to the first error line of four
mistakes (a mistyped flag, a missing style, an output that exists, a batch whose outputs exist), and the
packages ``python -X importtime`` finds slowest. With ``--against DIR`` the same runs of another checkout
(``git worktree add /tmp/before HEAD~3``) alternate with this one's, so both see the same machine.

    python benchmarks/startup.py --repeats 5 --backbone vgg16 --weights ../shared/weights/vgg16_imagenet_keras.pth
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import common
from common import CONTENT, REPO, STYLE, median

MISTAKES = {
    "mistyped flag": ["{content}", "{style}", "--sise", "64"],
    "missing style": ["{content}", "no_such_style.jpg"],
    "output exists": ["{content}", "{style}", "-o", "exists.png"],
    "batch outputs exist": [
        "batch",
        "--batch.contents",
        "{content}",
        "--batch.styles",
        "{style}",
        "--batch.output_dir",
        "batch",
        "--batch.name",
        "exists.png",
    ],
}
IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)$")


def timed(checkout: Path, args: list[str], folder: Path, steps: int = 1, importtime: bool = False) -> dict:
    """One process: seconds to its first stderr line, to the bar's start and end, to 'done:', to the exit."""
    env = dict(os.environ, PYTHONPATH=str(checkout), OMP_WAIT_POLICY="PASSIVE")
    flags = ["-X", "importtime"] if importtime else []
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *flags, "-m", "nst_lightning", *args],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    marks: dict[str, float] = {}
    chunks: list[bytes] = []

    def read_stderr() -> None:
        while chunk := os.read(process.stderr.fileno(), 65536):
            now = time.perf_counter() - start
            chunks.append(chunk)
            text = b"".join(chunks[-2:]).decode(errors="replace")
            for mark, sign in (("error", "error:"), ("bar", "stylising"), ("loop end", f"{steps}/{steps} iter")):
                if sign in text:
                    marks.setdefault(mark, now)

    reader = threading.Thread(target=read_stderr)
    reader.start()
    for line in process.stdout:
        if line.startswith(b"done:"):
            marks["done"] = time.perf_counter() - start
    process.wait()
    marks["exit"] = time.perf_counter() - start
    reader.join()
    marks["stderr"] = b"".join(chunks).decode(errors="replace")
    marks["status"] = process.returncode
    return marks


def slowest_imports(stderr: str, top: int = 8) -> list[tuple[str, float]]:
    """The top-level packages by their own import time (summed over their modules), in ms."""
    own: collections.Counter[str] = collections.Counter()
    for line in stderr.splitlines():
        found = IMPORT_LINE.match(line)
        if found:
            parts = found.group(4).split(".")
            own[".".join(parts[:2]) if parts[0] == "torch" else parts[0]] += int(found.group(1)) / 1000
    return own.most_common(top)


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs of each command (default 5)")
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--weights", default="imagenet", help="imagenet or a weights file")
    parser.add_argument("--against", type=Path, default=None, help="another checkout, run in turn with this one")
    args = parser.parse_args()
    checkouts = {"this": REPO} | ({"against": args.against.resolve()} if args.against else {})
    weights = str(Path(args.weights).resolve()) if args.weights not in ("imagenet", "random") else args.weights
    device = "cpu" if args.device == "cpu" else "gpu"
    run = [
        str(CONTENT),
        str(STYLE),
        "-o",
        "out.png",
        "--overwrite",
        "--size",
        "64",
        "--steps",
        "1",
        "--backbone",
        args.backbone,
        "--weights",
        weights,
        "--device",
        device,
    ]
    results: dict[str, dict[str, list]] = {name: collections.defaultdict(list) for name in checkouts}
    with tempfile.TemporaryDirectory(prefix="nst-startup-") as work:
        folder = Path(work)
        os.environ["NST_LIGHTNING_CACHE"] = str(folder / "cache")  # measured once, by the warm-up runs
        (folder / "batch").mkdir()
        for path in (folder / "exists.png", folder / "batch" / "exists.png"):
            path.write_bytes(CONTENT.read_bytes())
        for checkout in checkouts.values():  # warm-up: the disk cache, and the means cache
            timed(checkout, run, folder)
        for _ in range(args.repeats):
            for name, checkout in checkouts.items():
                marks = timed(checkout, run, folder)
                if marks["status"] != 0:
                    raise SystemExit(f"{name}: the run failed:\n{marks['stderr'][-2000:]}")
                loop = marks.get("loop end", marks["bar"]) - marks["bar"]
                for key, value in (
                    ("start", marks["bar"]),
                    ("loop", loop),
                    ("to summary", marks.get("done")),
                    ("exit", marks["exit"]),
                    ("overhead", marks["exit"] - loop),
                ):
                    results[name][key].append(value)
                for mistake, words in MISTAKES.items():
                    words = [w.format(content=CONTENT, style=STYLE) for w in words]
                    results[name][mistake].append(timed(checkout, words, folder)["error"])
        for name, checkout in checkouts.items():
            print(f"{name} ({checkout}): medians of {args.repeats} runs, seconds")
            for key, values in results[name].items():
                print(f"  {key:<20} {median(values):6.2f}   (min {min(values):.2f}, max {max(values):.2f})")
            imports = timed(checkout, run, folder, importtime=True)["stderr"]
            listed = ", ".join(f"{package} {ms:.0f}" for package, ms in slowest_imports(imports))
            print(f"  slowest imports (own ms, -X importtime): {listed}")


if __name__ == "__main__":
    main()
