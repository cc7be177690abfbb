"""Helpers for the tests that run the real ``nst-lightning serve`` command and talk to it over HTTP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import REPO, make_image, wait_for

TINY = {"data": {"image_size": 32}, "trainer": {"max_steps": 4}, "model": {"weights": "random", "init": "noise"}}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python -m nst_lightning serve --port PORT --data DATA`` of this checkout, in a process of its own (after the
    command ``wrap``, if given; with more ``args``); its stderr goes to ``log``."""

    def __init__(self, data: Path, log: Path, wrap: list[str] | None = None, args: list[str] = (), **popen) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = log
        env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
        command = [
            *(wrap or []),
            sys.executable,
            "-m",
            "nst_lightning",
            "serve",
            "--port",
            str(self.port),
            "--data",
            str(data),
            *args,
        ]
        with open(log, "wb") as err:
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=env, text=True, **popen)

    def first_line(self) -> str:
        return self.process.stdout.readline()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def answers(self) -> bool:
        try:
            return httpx.get(f"{self.url}/api/jobs", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_up(self) -> Server:
        line = self.first_line()
        assert line.startswith("nst-lightning: serving on"), line + self.stderr()
        wait_for(self.answers, 60, "the server to answer")
        return self

    def post(self, files: list[tuple[str, tuple[str, bytes, str]]], settings: dict | None = None) -> httpx.Response:
        data = {"settings": json.dumps(TINY if settings is None else settings)}
        return httpx.post(f"{self.url}/api/jobs", files=files, data=data, timeout=60)

    def job(self, job_id: str) -> dict:
        return httpx.get(f"{self.url}/api/jobs/{job_id}", timeout=30).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self.process.stdout.close()


def upload_files(folder: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """A tiny content PNG and style JPEG as the form's files."""
    content = make_image(folder / "c.png", 40, 30, seed=1).read_bytes()
    style = make_image(folder / "s.jpg", 32, 32, seed=2).read_bytes()
    return [("content", ("c.png", content, "image/png")), ("style", ("s.jpg", style, "image/jpeg"))]
