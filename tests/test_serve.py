"""The web app's API through FastAPI's test client, on tiny real jobs (32 px, random weights, CPU)."""

from __future__ import annotations

import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web app's tests need its extra: pip install -e '.[web]'")
pytest.importorskip("multipart", reason="the web app's tests need python-multipart: pip install -e '.[web]'")

with warnings.catch_warnings():  # Starlette 1.x: httpx in its test client is deprecated (for httpx2)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from nst_lightning.serve.app import create_app  # noqa: E402
from nst_lightning.serve.progress import read_progress  # noqa: E402
from tests.conftest import make_image, wait_for  # noqa: E402

TINY = {"data": {"image_size": 32}, "trainer": {"max_steps": 4}, "model": {"weights": "random", "init": "noise"}}


@pytest.fixture(autouse=True)
def passive_threads(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the runs share two cores with the tests


@pytest.fixture
def uploads(tmp_path: Path) -> dict[str, bytes]:
    return {
        "content": make_image(tmp_path / "c.png", 40, 30, seed=1).read_bytes(),
        "style": make_image(tmp_path / "s.jpg", 32, 32, seed=2).read_bytes(),
        "style2": make_image(tmp_path / "s2.png", 24, 24, seed=3).read_bytes(),
    }


def post_job(client: TestClient, uploads: dict[str, bytes], settings: dict | None = None, **kwargs):
    files = [
        ("content", ("../../etc/passwd", uploads["content"], "image/png")),
        ("style", ("style one.jpg", uploads["style"], "image/jpeg")),
        *kwargs.pop("more", []),
    ]
    data = {"settings": json.dumps(TINY if settings is None else settings)}
    return client.post("/api/jobs", files=files, data=data, **kwargs)


def job(client: TestClient, job_id: str) -> dict:
    return client.get(f"/api/jobs/{job_id}").json()


def wait_state(client: TestClient, job_id: str, *states: str, timeout: float = 120) -> dict:
    wait_for(lambda: job(client, job_id)["state"] in states, timeout, f"job state in {states}")
    return job(client, job_id)


def events(client: TestClient, job_id: str) -> list[tuple[str, dict]]:
    """The job's event stream, read to its end (it ends when the job has finished)."""
    found, name = [], None
    with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                found.append((name, json.loads(line[6:])))
    return found


def bomb_png() -> bytes:
    """A PNG whose header claims 100000 x 100000 pixels: Pillow refuses it before decoding."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "field, body, status, message",
    [
        ("content", b"just some text, not an image\n", 422, "not an image Pillow can read"),
        ("style", None, 422, "decompression bombs"),
        ("content", b"\x89PNG" + b"\0" * 1_200_000, 413, "over the upload limit of 1 MB"),
        ("content", b"", 422, "content is empty"),
    ],
)
def test_bad_uploads_are_refused_by_content(tmp_path, uploads, field, body, status, message):
    with TestClient(create_app(tmp_path / "data", max_upload_mb=1)) as client:
        bad = dict(uploads, **{field: bomb_png() if body is None else body})
        response = post_job(client, bad)
        assert response.status_code == status, response.text
        assert message in response.json()["detail"]
        assert str(tmp_path) not in response.json()["detail"], "no server path in the message"
        assert client.get("/api/jobs").json() == []
        assert list((tmp_path / "data" / "jobs").iterdir()) == [], "nothing left behind"


@pytest.mark.parametrize(
    "settings, key, message",
    [
        ({"model": {"style_wieght": 1}}, "model.style_wieght", "unrecognized"),
        ({"model": {"style_weight": "much"}}, "model.style_weight", "Expected a"),
        ({"model": {"style_weight": -1, "weights": "random"}}, "model.style_weight", "finite number >= 0"),
        ({"trainer": {"max_steps": 0}}, "trainer.max_steps", "at least 1"),
        ({"trainer": {"default_root_dir": "/"}}, "trainer.default_root_dir", "not a setting a job can change"),
        ({"output": {"path": "/tmp/x.png"}}, "output.path", "set by the server"),
        ({"model": {"weights": "/etc/passwd"}}, "model.weights", "not offered here"),
        ({"model": {"init": "/etc/hosts"}}, "model.init", "a file cannot be given"),
        ({"trainer.max_steps": {"class_path": "os.system"}}, "trainer.max_steps", "not an object"),
    ],
)
def test_bad_settings_are_a_422_naming_the_key(tmp_path, uploads, settings, key, message):
    with TestClient(create_app(tmp_path / "data")) as client:
        response = post_job(client, uploads, {**TINY, **settings} if "." not in next(iter(settings)) else settings)
        assert response.status_code == 422, response.text
        assert response.json()["key"] == key and message in response.json()["detail"]


def test_bad_json_and_missing_fields(tmp_path, uploads):
    with TestClient(create_app(tmp_path / "data")) as client:
        content = ("content", ("c.png", uploads["content"], "image/png"))
        response = client.post("/api/jobs", files=[content], data={"settings": "{}"})
        assert response.status_code == 422 and response.json()["key"] == "style", response.text
        style = ("style", ("s.jpg", uploads["style"], "image/jpeg"))
        response = client.post("/api/jobs", files=[content, style], data={"settings": "{not json"})
        assert response.status_code == 422 and response.json()["key"] == "settings", response.text


def test_the_token_is_needed_on_every_api_call(tmp_path, uploads):
    with TestClient(create_app(tmp_path / "data", token="s3cret")) as client:
        assert client.get("/").status_code == 200, "the page itself holds nothing"
        for method, url in (("get", "/api/jobs"), ("get", "/api/options"), ("get", "/api/jobs/0/events")):
            response = getattr(client, method)(url)
            assert response.status_code == 401 and "token" in response.json()["detail"]
        assert client.get("/api/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert post_job(client, uploads).status_code == 401
        assert client.get("/api/jobs", headers={"Authorization": "Bearer s3cret"}).json() == []
        assert client.get("/api/jobs?token=s3cret").status_code == 200
        assert "random" in client.get("/api/options", headers={"X-Token": "s3cret"}).json()["weights"]


@pytest.mark.slow
def test_cancel_stops_a_run_and_keeps_its_image_and_takes_a_queued_job_off(tmp_path, uploads):
    data = tmp_path / "data"
    with TestClient(create_app(data)) as client:
        long = post_job(client, uploads, {**TINY, "trainer": {"max_steps": 2000}}).json()["id"]
        queued = post_job(client, uploads).json()["id"]
        assert job(client, queued)["position"] in (1, 2)
        # A queued job is cancelled at once, without a run.
        assert client.post(f"/api/jobs/{queued}/cancel").json()["state"] == "cancelled"
        wait_for(lambda: job(client, long)["step"] >= 2, 120, "the job's steps")
        assert job(client, long)["position"] == 0
        assert client.post(f"/api/jobs/{long}/cancel").status_code == 200
        cancelled = wait_state(client, long, "cancelled", "failed", "done")
        assert cancelled["state"] == "cancelled" and 2 <= cancelled["step"] < 2000
        assert client.get(f"/api/jobs/{long}/result").status_code == 404
        partial = client.get(f"/api/jobs/{long}/result?partial=true")
        assert partial.status_code == 200
        # Named after the uploads as sent ("../../etc/passwd", "style one.jpg"), sanitised: never a path.
        assert partial.headers["content-disposition"] == 'attachment; filename="passwd-x-style-one-partial.png"'
        assert client.get(f"/api/jobs/{long}/preview").status_code == 200
        assert job(client, queued)["state"] == "cancelled"
        assert not (data / "jobs" / queued / "progress.jsonl").exists(), "the cancelled queued job never ran"


@pytest.mark.slow
def test_jobs_queue_run_stream_their_progress_survive_a_restart_and_are_deleted(tmp_path, uploads):
    data = tmp_path / "data"
    with TestClient(create_app(data)) as client:
        created = post_job(client, uploads, more=[("style", ("b.png", uploads["style2"], "image/png"))])
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        interrupted = post_job(client, uploads, {**TINY, "trainer": {"max_steps": 60}}).json()["id"]
        wait_for(lambda: job(client, job_id)["state"] != "queued", 60, "the first job to start")
        waiting = job(client, interrupted)
        assert waiting["state"] == "queued" and waiting["position"] == 1, "the second job waits for the first"
        stream = events(client, job_id)
        states = [data["state"] for name, data in stream if name == "state"]
        assert states[-1] == "done" and "running" in states
        losses = [pair for name, data in stream if name == "progress" for pair in data["losses"]]
        assert [step for step, _ in losses] == [1, 2, 3, 4, 4], "every step once, in order; the last again, finished"
        log = (data / "jobs" / job_id / "run.log").read_text()
        assert f"final loss {losses[-1][1]:.4g}," in log, (losses, log)  # the finished image's, as the run says
        assert any(name == "preview" for name, _ in stream)

        shown = job(client, job_id)
        assert shown["step"] == shown["max_steps"] == 4 and shown["loss"] == losses[-1][1] and shown["error"] is None
        assert shown["position"] is None and shown["settings"]["data.image_size"] == 32
        assert shown["names"]["content"] == "../../etc/passwd"  # shown, never a path:
        folder = data / "jobs" / job_id
        assert sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg")) == [
            "content.png",
            "preview.png",
            "result.png",
            "style_0.jpg",
            "style_1.png",
        ]
        assert list(folder.glob("lightning_logs/version_0/events.out.tfevents.*")), "TensorBoard logs as the CLI's"
        assert list(folder.glob("lightning_logs/version_0/checkpoints/*.ckpt"))
        result = client.get(f"/api/jobs/{job_id}/result")
        assert result.status_code == 200 and Image.open(io.BytesIO(result.content)).size == (32, 24)
        assert client.get(f"/api/jobs/{job_id}/preview").headers["content-type"] == "image/png"
        assert client.get(f"/api/jobs/{job_id}/inputs/style1").content == uploads["style2"]
        assert [j["id"] for j in client.get("/api/jobs").json()] == [interrupted, job_id]

        # Then the second job runs; a restart keeps the finished job and resumes the other from its checkpoint.
        wait_for(lambda: job(client, interrupted)["step"] >= 3, 120, "the second job's steps")
    # The server stopped: the run got SIGTERM, as from the command line, and wrote its checkpoint.
    second = data / "jobs" / interrupted
    assert list(second.glob("lightning_logs/version_0/checkpoints/interrupted.ckpt"))
    with TestClient(create_app(data)) as client:
        assert job(client, job_id)["state"] == "done"
        assert client.get(f"/api/jobs/{job_id}/result").content == result.content
        after = wait_state(client, interrupted, "done", "failed")
        assert after["state"] == "done" and "went on from its checkpoint" in after["note"], after
        starts = [record["start"] for record in read_progress(second) if "start" in record]
        assert starts[0] == 0 and starts[1] >= 3, "the second run went on from the checkpoint"
        assert after["step"] == 60 and client.get(f"/api/jobs/{interrupted}/result").status_code == 200

        assert client.delete(f"/api/jobs/{job_id}").status_code == 200
        assert not folder.exists()
        assert client.get(f"/api/jobs/{job_id}").status_code == 404
        assert [j["id"] for j in client.get("/api/jobs").json()] == [interrupted]


@pytest.mark.slow
def test_the_serve_command_starts_on_localhost_and_stops_on_ctrl_c(tmp_path):
    import signal
    import socket
    import subprocess
    import sys
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "nst_lightning", "serve", "--port", str(port), "--data", str(tmp_path / "d")]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith(f"nst-lightning: serving on http://127.0.0.1:{port}/"), line + server.stderr.read()

        def answers() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/options", timeout=5) as response:
                    return json.load(response)["defaults"]["data.image_size"] == 512
            except OSError:
                return False

        wait_for(answers, 60, "the server to answer")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert b'<script src="/static/app.js">' in response.read()
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
        assert "Traceback" not in server.stderr.read()
        assert (tmp_path / "d" / "jobs.sqlite3").is_file()
    finally:
        if server.poll() is None:
            server.kill()


def test_the_server_files_are_short_say_their_job_and_the_core_never_imports_them():
    import ast

    from tests.conftest import REPO
    from tests.test_package import FILE_LINES, FILE_STATEMENTS, imports_of, statements

    for path in sorted((REPO / "nst_lightning" / "serve").glob("*.py")):
        lines = path.read_text().splitlines()
        assert len(lines) <= FILE_LINES, f"{path.name} has {len(lines)} lines (at most {FILE_LINES})"
        assert statements(path.read_text()) <= FILE_STATEMENTS, f"{path.name} has too many statements"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path.name} has no docstring saying its job"
    for path in (REPO / "nst_lightning").rglob("*.py"):
        serve = {name for name in imports_of(path) if name.startswith("nst_lightning.serve")}
        inside = path.is_relative_to(REPO / "nst_lightning" / "serve")
        assert not serve or inside or path.name == "main.py", f"{path} imports {serve}"


@pytest.mark.slow
def test_serve_on_every_interface_prints_addresses_a_browser_opens_and_file_routes_answer_head(tmp_path):
    import httpx

    from nst_lightning.serve.jobs import JOB_ID_LENGTH
    from tests.serving import Server, upload_files

    server = Server(tmp_path / "d", tmp_path / "log", args=["--host", "0.0.0.0"])
    try:
        line = server.first_line()
        assert line.startswith(f"nst-lightning: serving on http://localhost:{server.port}/ ("), line + server.stderr()
        assert "0.0.0.0" not in line, line
        wait_for(server.answers, 60, "the server to answer")
        job_id = server.post(upload_files(tmp_path)).json()["id"]
        wait_for(lambda: server.job(job_id)["state"] in ("done", "failed"), 120, "the job to finish")
        assert server.job(job_id)["state"] == "done", server.job(job_id)
        for path in ("result", "result?partial=true", "preview", "inputs/content", "inputs/style0"):
            got = httpx.get(f"{server.url}/api/jobs/{job_id}/{path}", timeout=30)
            head = httpx.head(f"{server.url}/api/jobs/{job_id}/{path}", timeout=30)
            assert head.status_code == 200 and head.content == b"", (path, head.status_code)
            assert head.headers["content-type"] == got.headers["content-type"], path
            assert int(head.headers["content-length"]) == len(got.content), path
        assert httpx.head(f"{server.url}/api/jobs/{'0' * JOB_ID_LENGTH}/result", timeout=30).status_code == 404
        assert httpx.head(f"{server.url}/", timeout=30).status_code == 200
    finally:
        server.stop()
    assert "Traceback" not in server.stderr()


def test_empty_settings_mean_the_defaults_and_a_zero_weight_says_what_it_makes(tmp_path, uploads):
    base = {"data": {"image_size": 32}, "model": {"weights": "random", "init": "noise"}}
    with TestClient(create_app(tmp_path / "data")) as client:
        empty = {**base, "trainer": {"max_steps": ""}, "model": {**base["model"], "style_weight": "", "seed": None}}
        response = post_job(client, uploads, empty)
        assert response.status_code == 201, response.text
        first = response.json()["id"]
        client.post(f"/api/jobs/{first}/cancel")
        shown = job(client, first)
        assert shown["settings"]["model.style_weight"] == 1e6 and shown["max_steps"] == 300, shown["settings"]
        assert shown["note"] is None
        for weight, says in (
            ("style_weight", "the photo as the network sees it, with no style"),
            ("content_weight", "none of the photo's layout"),
        ):
            zero = {**base, "trainer": {"max_steps": 2}, "model": {**base["model"], weight: 0}}
            response = post_job(client, uploads, zero)
            assert response.status_code == 201, response.text
            note = job(client, response.json()["id"])["note"]
            assert note.startswith(f"model.{weight} is 0: ") and says in note, note
        both = {**base, "model": {**base["model"], "style_weight": 0, "content_weight": 0}}
        response = post_job(client, uploads, both)
        assert response.status_code == 422 and "both 0" in response.json()["detail"], response.text
        assert response.json()["key"] == "model.content_weight"
