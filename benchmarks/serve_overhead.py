#!/usr/bin/env python
"""Server overhead: the same job through ``nst-lightning serve`` and through ``nst-lightning fit``, interleaved.

Each server run is timed from the upload (POST /api/jobs) to the job's ``done`` state, with the page's load on it:
an open event stream and every live preview fetched, as the page does. Each CLI run is timed from the command's
start to its exit. Both include starting Python, torch and the model (the server starts one such process per
job). The overhead is the median server time over the median CLI time, less one.

    python benchmarks/serve_overhead.py --size 256 --steps 40 --repeats 3 \
        --backbone vgg16 --weights ../shared/weights/vgg16_imagenet_keras.pth
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import CONTENT, STYLE, median

# The run's own time, from the summary line that ends every run ("done: ... (40 iterations, ..., 12.3 s)").
SUMMARY = re.compile(r"iterations, final loss [^,]+, ([0-9.]+) s\)")


def run_time(text: str) -> float:
    found = SUMMARY.findall(text)
    return float(found[-1]) if found else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings(args) -> dict:
    model = {"backbone": args.backbone, "weights": Path(args.weights).name if args.weights != "random" else "random"}
    return {"data": {"image_size": args.size}, "trainer": {"max_steps": args.steps}, "model": model}


def cli_run(args, folder: Path) -> tuple[float, float]:
    """One ``nst-lightning fit`` of the job: (seconds from start to exit, the run's own seconds)."""
    weights = args.weights if args.weights == "random" else str(Path(args.weights).resolve())
    command = [
        sys.executable,
        "-m",
        "nst_lightning",
        "fit",
        f"--data.content={CONTENT}",
        f"--data.style={STYLE}",
        f"--data.image_size={args.size}",
        f"--trainer.max_steps={args.steps}",
        f"--model.backbone={args.backbone}",
        f"--model.weights={weights}",
        f"--output.path={folder / 'result.png'}",
        f"--trainer.default_root_dir={folder}",
        "--trainer.enable_progress_bar=false",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, check=True, cwd=folder, capture_output=True, text=True)
    return time.perf_counter() - started, run_time(done.stdout)


def server_run(httpx, base: str, args, data: Path) -> tuple[float, float]:
    """One job through the server, watched as the page watches it: (seconds from the upload to ``done``, the
    run's own seconds, from its log in the server's ``data`` folder)."""
    body = settings(args)
    files = [
        ("content", (CONTENT.name, CONTENT.read_bytes(), "image/jpeg")),
        ("style", (STYLE.name, STYLE.read_bytes(), "image/jpeg")),
    ]
    with httpx.Client(base_url=base, timeout=None) as client:
        started = time.perf_counter()
        response = client.post("/api/jobs", files=files, data={"settings": json.dumps(body)})
        response.raise_for_status()
        job_id = response.json()["id"]
        state = None
        with client.stream("GET", f"/api/jobs/{job_id}/events") as events:
            name = None
            for line in events.iter_lines():
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: ") and name == "preview":
                    client.get(f"/api/jobs/{job_id}/preview").raise_for_status()
                elif line.startswith("data: ") and name == "state":
                    state = json.loads(line[6:])["state"]
        elapsed = time.perf_counter() - started
        if state != "done":
            raise SystemExit(f"the server's job ended {state}: see its run.log under the server's data folder")
        own = run_time((data / "jobs" / job_id / "run.log").read_text())
        client.delete(f"/api/jobs/{job_id}")
    return elapsed, own


def main() -> None:
    parser = common.base_parser(__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="vgg19")
    parser.add_argument("--weights", default="random", help="random, or a weights file (offered by the server)")
    args = parser.parse_args()
    import httpx

    work = Path(tempfile.mkdtemp(prefix="nst-serve-bench-"))
    weights_dir = work / "weights"
    weights_dir.mkdir()
    if args.weights != "random":
        (weights_dir / Path(args.weights).name).symlink_to(Path(args.weights).resolve())
    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(common.REPO)}
    command = [
        sys.executable,
        "-m",
        "nst_lightning",
        "serve",
        "--port",
        str(port),
        "--data",
        str(work / "data"),
        "--weights-dir",
        str(weights_dir),
    ]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    server.stdout.readline()  # "serving on ..."
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(base + "/api/options").raise_for_status()
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise SystemExit("the server did not answer") from None
            time.sleep(0.2)
    cli_times, server_times, cli_own, server_own = [], [], [], []
    try:
        for repeat in range(args.repeats):  # interleaved: the machine's load falls on both alike
            order = (("cli", "server"), ("server", "cli"))[repeat % 2]
            for kind in order:
                if kind == "cli":
                    folder = work / f"cli_{repeat}"
                    folder.mkdir()
                    wall, own = cli_run(args, folder)
                    cli_times.append(wall)
                    cli_own.append(own)
                else:
                    wall, own = server_run(httpx, base, args, work / "data")
                    server_times.append(wall)
                    server_own.append(own)
                print(f"repeat {repeat + 1}: {kind} {wall:.1f} s (the run itself {own:.1f} s)", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=180)
        shutil.rmtree(work, ignore_errors=True)
    cli, served = median(cli_times), median(server_times)
    results = {
        "size": args.size,
        "steps": args.steps,
        "backbone": args.backbone,
        "weights": Path(args.weights).name,
        "cli_s": cli_times,
        "server_s": server_times,
        "cli_median_s": cli,
        "server_median_s": served,
        "cli_run_s": cli_own,
        "server_run_s": server_own,
        "overhead_pct": 100 * (served / cli - 1),
    }
    print(
        f"{args.size} px, {args.steps} steps, {args.backbone} ({Path(args.weights).name}): CLI median {cli:.1f} s, "
        f"server median {served:.1f} s (upload to done, previews fetched): overhead {results['overhead_pct']:+.1f} %; "
        f"the runs' own time (from their summary line): CLI median {median(cli_own):.1f} s, server median "
        f"{median(server_own):.1f} s"
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
