#!/usr/bin/env python
"""Upload decoding memory: the resident memory of a real ``nst-lightning serve`` before, at its peak and after N
jobs posted at once, each with two large PNGs that compress to little (a 9000 x 9000 gradient: about 250 KB).

The jobs carry ``trainer.max_steps 0``, so each is refused (422) once its images are decoded: what is measured is
the server taking uploads, not runs. ``--repo`` runs another checkout's server (to compare with a version before).

    python benchmarks/serve_uploads.py --jobs 6 --side 9000
    python benchmarks/serve_uploads.py --repo ../main       # the same against another checkout
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def big_png(side: int) -> bytes:
    """A ``side`` x ``side`` RGB PNG of a smooth gradient (compresses to a few hundred KB)."""
    from PIL import Image

    row = Image.linear_gradient("L").resize((side, 1))
    image = Image.merge("RGB", [row.resize((side, side))] * 3)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=9)
    return out.getvalue()


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process, in MB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def post(port: int, image: bytes, answers: list) -> None:
    boundary = uuid.uuid4().hex
    parts = []
    for field in ("content", "style"):
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{field}.png"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + image
            + b"\r\n"
        )
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="settings"\r\n\r\n'.encode())
    parts.append(b'{"trainer": {"max_steps": 0}}\r\n' + f"--{boundary}--\r\n".encode())
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/jobs",
        data=b"".join(parts),
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            answers.append(response.status)
    except urllib.error.HTTPError as err:
        answers.append(err.code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=6, help="jobs posted at once (6)")
    parser.add_argument("--side", type=int, default=9000, help="pixels on each side of the two images (9000)")
    parser.add_argument("--repo", default=str(REPO), help="the checkout whose server runs (this one)")
    args = parser.parse_args()
    image = big_png(args.side)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(args.repo).resolve()), OMP_WAIT_POLICY="PASSIVE")
    with tempfile.TemporaryDirectory() as data:
        command = [sys.executable, "-m", "nst_lightning", "serve", "--port", str(port), "--data", data]
        server = subprocess.Popen(command, cwd=args.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            server.stdout.readline()
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/options", timeout=5).read()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the server did not start") from None
                    time.sleep(0.2)
            before, _ = memory_mb(server.pid)
            answers: list = []
            started = time.perf_counter()
            threads = [threading.Thread(target=post, args=(port, image, answers)) for _ in range(args.jobs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            took = time.perf_counter() - started
            time.sleep(2)
            after, peak = memory_mb(server.pid)
        finally:
            server.terminate()
            server.wait(timeout=120)
    print(
        f"{args.jobs} jobs x 2 PNGs of {args.side}x{args.side} ({len(image) / 1e3:.0f} KB each), "
        f"answers {sorted(set(answers))}, {took:.1f} s: server RSS {before:.0f} MB before, "
        f"peak {peak:.0f} MB, {after:.0f} MB after ({args.repo})"
    )


if __name__ == "__main__":
    main()
