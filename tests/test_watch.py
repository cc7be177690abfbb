"""``nst-lightning PHOTO PAINTING -o OUT --watch [PORT]`` (issue 24): the web app's live page for one command-line
run, through the real command: the page, the run's state, its image and event stream while it runs; read-only; the
run's output and exit status as without it; the missing extra and a port in use as one line each."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, make_image

pytest.importorskip("fastapi", reason="--watch needs the web app's extra: pip install -e '.[web]'")
pytest.importorskip("uvicorn", reason="--watch needs the web app's extra: pip install -e '.[web]'")

TINY = ["--size", "32", "--weights", "random", "--device", "cpu"]
ENV = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(REPO))
URL_LINE = re.compile(r"^nst-lightning: watch at (http://127\.0\.0\.1:\d+/)$", re.M)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[str, str]:
    make_image(tmp_path / "photo.png", 40, 30, seed=1)
    make_image(tmp_path / "painting.jpg", 32, 32, seed=2)
    return "photo.png", "painting.jpg"


def command(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120
    )


def get(url: str, method: str = "GET", host: str | None = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request; an HTTP error is a status like any other."""
    request = urllib.request.Request(url, method=method, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:  # the first waits for torch's import
            return response.status, response.headers.get("content-type", ""), response.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


def events(url: str, into: list[tuple[str, dict]]) -> None:
    """The Server-Sent Events of ``url`` until the stream ends, as (name, data)."""
    name = None
    with urllib.request.urlopen(url, timeout=60) as stream:
        for raw in stream:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: ") and name:
                into.append((name, json.loads(line[len("data: ") :])))


def hostile_body(url: str) -> None:
    """A 64 MB chunked body posted to the read-only page: refused (or the connection cut) without a word on the
    command's terminal (uvicorn used to log the protocol error there with a traceback)."""
    host, port = url.split("//")[1].rstrip("/").split(":")

    def chunks():
        for _ in range(1024):
            yield b"x" * 65536

    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("POST", "/api/jobs", body=chunks(), headers={"Transfer-Encoding": "chunked"})
        assert connection.getresponse().status in (404, 405)
    except (ConnectionError, http.client.HTTPException):
        pass  # the server closed the connection mid-body
    finally:
        connection.close()


@pytest.mark.slow
def test_a_watched_run_is_live_in_the_browser_and_read_only(tmp_path, pair):
    run, err_path, url = start(tmp_path, *pair, "-o", "out.png", "--steps", "80", *TINY, "--watch", "0")
    try:
        seen: list[tuple[str, dict]] = []
        stream = threading.Thread(target=events, args=(url + "api/jobs/run/events", seen), daemon=True)
        stream.start()
        status, kind, body = get(url)
        assert status == 200 and kind.startswith("text/html") and b'data-watch="run"' in body
        assert get(url + "static/app.js")[0] == 200 and get(url, "HEAD")[0] == 200
        for method, path in (("POST", ""), ("POST", "api/jobs/run"), ("PUT", "api/jobs/run/preview")):
            assert get(url + path, method)[0] == 405, (method, path)
        assert get(url + "static/../watch.py")[0] == 404 and get(url + "api/jobs/other")[0] == 404
        assert get(url, host="evil.example")[0] == 400, "another site's name (DNS rebinding) is refused"
        for _ in range(300):  # about 1 in 80 tripped uvicorn's h11 protocol, whose traceback asyncio printed
            hostile_body(url)
        steps, image = set(), None
        while run.poll() is None and (len(steps) < 2 or image is None):
            job = json.loads(get(url + "api/jobs/run")[2])
            assert job["state"] == "running" and job["names"] == {"content": "photo.png", "styles": ["painting.jpg"]}
            if job["step"] > 0:
                assert job["max_steps"] == 80 and job["loss"] > 0 and job["elapsed_s"] >= 0
                steps.add(job["step"])
            status, kind, body = get(url + "api/jobs/run/preview")
            if status == 200:
                assert kind == "image/png"
                image = Image.open(io.BytesIO(body))
                image.load()
            time.sleep(0.05)
        assert len(steps) >= 2, f"the step advanced while the run ran: {steps}"
        assert image is not None and image.size == (32, 24)
        stdout = run.communicate(timeout=60)[0].decode()
        stream.join(10)
    finally:
        run.kill()
    assert run.returncode == 0, err_path.read_text()
    assert "Traceback" not in err_path.read_text(), err_path.read_text()  # the hostile body left no trace there
    summary = re.match(r"done: out\.png \((\d+ of )?80 iterations", stdout)
    assert summary and (tmp_path / "out.png").exists(), stdout  # L-BFGS may stop early, once the loss levels off
    last = int(summary.group(1).split()[0]) if summary.group(1) else 80
    names = [name for name, _ in seen]
    assert {"progress", "preview"} <= set(names) and names[-1] == "state", names
    assert seen[-1][1]["state"] == "done" and seen[-1][1]["step"] == last
    losses = [pair for name, data in seen if name == "progress" for pair in data["losses"]]
    assert [step for step, _ in losses] == [*range(1, last + 1), last] and all(loss > 0 for _, loss in losses)
    # The last record repeats the last step with the finished image's loss: the page ends on the summary's.
    final = re.search(r"final loss ([0-9.e+-]+)", stdout).group(1)
    assert f"{losses[-1][1]:.4g}" == final and f"{seen[-1][1]['loss']:.4g}" == final, (losses[-2:], stdout)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url, timeout=5)  # the server stopped with the command


def start(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path, str]:
    """The command with ``args`` in ``tmp_path``, its stderr to a file: (the process, that file, the page's address)."""
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        run = subprocess.Popen(
            [sys.executable, str(REPO / "cli.py"), *args], cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=err
        )
    deadline = time.monotonic() + 60
    while not (found := URL_LINE.search(err_path.read_text())):
        if run.poll() is not None or time.monotonic() > deadline:
            run.kill()
            pytest.fail(err_path.read_text())
        time.sleep(0.05)
    return run, err_path, found.group(1)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_stopped_run_tells_its_page_and_exits_as_without_watch(tmp_path, pair):
    run, err_path, url = start(tmp_path, *pair, "-o", "out.png", "--steps", "5000", *TINY, "--watch", "0")
    try:
        seen: list[tuple[str, dict]] = []
        stream = threading.Thread(target=events, args=(url + "api/jobs/run/events", seen), daemon=True)
        stream.start()
        deadline = time.monotonic() + 60
        while json.loads(get(url + "api/jobs/run")[2])["step"] < 3:
            assert run.poll() is None and time.monotonic() < deadline, err_path.read_text()
            time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        run.wait(timeout=60)
        stream.join(10)
    finally:
        run.kill()
    assert run.returncode == 130, err_path.read_text()
    last = err_path.read_text().splitlines()[-1]
    assert last.startswith("nst-lightning: interrupted: SIGINT: stopped after step") and "Traceback" not in last
    assert seen[-1][0] == "state" and seen[-1][1]["state"] == "cancelled", seen[-3:]
    assert (tmp_path / "out.partial.png").exists() and not (tmp_path / "out.png").exists()


@pytest.mark.slow
def test_the_output_and_the_exit_are_as_without_watch(tmp_path, pair):
    plain = command(tmp_path, *pair, "-o", "plain.png", "--steps", "3", *TINY)
    watched = command(tmp_path, *pair, "-o", "watched.png", "--steps", "3", *TINY, "--watch", "0")
    assert plain.returncode == watched.returncode == 0, watched.stderr
    assert re.sub(r"\d+\.\d s|version_\d|plain|watched", "", plain.stdout) == re.sub(
        r"\d+\.\d s|version_\d|plain|watched", "", watched.stdout
    )
    assert Image.open(tmp_path / "plain.png").tobytes() == Image.open(tmp_path / "watched.png").tobytes()
    assert URL_LINE.search(watched.stderr) and "Traceback" not in watched.stderr
    failed = command(tmp_path, *pair, "-o", "bad.png", "--steps", "3", *TINY, "--watch", "0", "--set", "model.x=1")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr


def test_a_port_in_use_is_one_line_before_anything_runs(tmp_path, pair):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = command(tmp_path, *pair, "-o", "out.png", *TINY, "--watch", str(port))
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"nst-lightning: error: --watch cannot listen on 127.0.0.1:{port} (Address already in use): give another "
        "port, or --watch 0 for a free one\n"
    )
    assert not list(tmp_path.glob("out*")) and not (tmp_path / "lightning_logs").exists()
    bad = command(tmp_path, *pair, "-o", "out.png", "--watch", "70000")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "'70000' is not a port" in bad.stderr


def test_without_the_extra_watch_is_one_line_before_torch_loads(tmp_path, pair):
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"
        "from nst_lightning.main import cli_main\n"
        f"try:\n    cli_main({[*pair, '-o', 'out.png', *TINY, '--watch', '0']!r})\n"
        "except SystemExit as stop:\n    print('exit', stop.code, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=ENV, capture_output=True, text=True)
    assert done.stdout.strip() == "exit 2 False", done.stdout + done.stderr
    assert done.stderr == (
        "nst-lightning: error: --watch needs the web app's extra (uvicorn missing): pip install 'nst-lightning[web]'\n"
    )
    assert not list(tmp_path.glob("out*"))
