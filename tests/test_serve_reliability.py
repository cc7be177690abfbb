"""The web app when its storage or its process fails: a locked job store (503, the worker carries on), a second
server on one data folder, ``kill -9`` of the server during a run, a store that is damaged or not ours, quiet event
streams (keep-alive), and a full disk under an upload; through the real ``serve`` command or the app's test client."""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import threading
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web app's tests need its extra: pip install -e '.[web]'")
pytest.importorskip("multipart", reason="the web app's tests need python-multipart: pip install -e '.[web]'")
httpx = pytest.importorskip("httpx")

with warnings.catch_warnings():  # Starlette 1.x: httpx in its test client is deprecated (for httpx2)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from nst_lightning.serve import progress, store  # noqa: E402
from nst_lightning.serve.app import create_app  # noqa: E402
from nst_lightning.serve.progress import read_progress  # noqa: E402
from nst_lightning.serve.store import StoreRefused  # noqa: E402
from tests.conftest import wait_for  # noqa: E402
from tests.serving import TINY, Server, upload_files  # noqa: E402

LONG = {**TINY, "trainer": {"max_steps": 5000}}


@pytest.fixture(autouse=True)
def passive_threads(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the runs share two cores with the tests


def post(client: TestClient, files, settings: dict | None = None):
    return client.post("/api/jobs", files=files, data={"settings": json.dumps(settings or TINY)})


def run_pid(data: Path, job_id: str) -> int:
    with sqlite3.connect(data / store.STORE_FILE) as db:
        return db.execute("SELECT pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def is_run(pid: int, job_id: str) -> bool:
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


@pytest.mark.slow
def test_a_locked_store_is_a_503_and_the_worker_carries_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(store, "STORE_TIMEOUT_SECONDS", 0.2)
    data, files = tmp_path / "data", upload_files(tmp_path)
    with TestClient(create_app(data)) as client:
        worker = client.app.state.workers[0]

        release = threading.Event()

        def locked(seconds: float | None) -> None:
            """Another program holds the store's write lock for ``seconds`` (None: until ``release``)."""
            blocker = sqlite3.connect(data / store.STORE_FILE, isolation_level=None)
            blocker.execute("BEGIN EXCLUSIVE")
            try:
                wait_for(lambda: worker.store_trouble is not None, 30, "the worker to meet the lock")
                if seconds is None:
                    release.wait(60)
                else:
                    time.sleep(seconds)  # it meets it again and again meanwhile
            finally:
                blocker.execute("ROLLBACK")
                blocker.close()

        # Idle: the worker's claim meets the lock; a new job is a 503 with the reason, and nothing is kept.
        blocker = threading.Thread(target=locked, args=(None,))
        blocker.start()
        try:
            wait_for(lambda: worker.store_trouble is not None, 30, "the lock")
            refused = post(client, files)
            assert refused.status_code == 503 and "database is locked" in refused.json()["detail"], refused.text
            assert refused.headers["retry-after"] and str(tmp_path) not in refused.text
            assert list((data / "jobs").iterdir()) == [], "no half-made job"
            assert client.get("/api/jobs").json() == [], "reads go on"
        finally:
            release.set()
            blocker.join()
        # The lock is gone: the same worker takes the next job; locked again during its run, it still finishes.
        created = post(client, files, {**TINY, "trainer": {"max_steps": 12}})
        assert created.status_code == 201, created.text
        job_id = created.json()["id"]
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["step"] >= 1, 120, "the job's first step")
        locked(1.5)
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json()["state"] != "running", 120, "the job to end")
        shown = client.get(f"/api/jobs/{job_id}").json()
        assert shown["state"] == "done" and shown["step"] == 12, shown
        assert worker.is_alive()
    said = capsys.readouterr().err
    assert "worker cpu: the job store cannot be written (database is locked): trying again" in said
    assert "the job store can be written again" in said


@pytest.mark.slow
def test_a_second_server_on_one_data_folder_is_refused_and_leaves_the_first_alone(tmp_path):
    data = tmp_path / "data"
    first = Server(data, tmp_path / "first.err").wait_up()
    try:
        job_id = first.post(upload_files(tmp_path), LONG).json()["id"]
        wait_for(lambda: first.job(job_id)["step"] >= 2, 120, "the first server's run")
        second = Server(data, tmp_path / "second.err")
        assert second.process.wait(60) == 1 and second.first_line() == "", "the second never serves"
        lines = second.stderr().splitlines()
        assert len(lines) == 1 and "Traceback" not in second.stderr(), lines
        assert lines[0].startswith(f"nst-lightning: error: the --data folder {data} is in use by another")
        assert f"process {first.process.pid}, {first.url}/" in lines[0] and "another --data folder" in lines[0]
        step = first.job(job_id)["step"]
        wait_for(lambda: first.job(job_id)["step"] > step + 2, 120, "the first server's run to go on")
        assert "SIGTERM" not in (data / "jobs" / job_id / "run.log").read_text(), "the run was left alone"
        assert first.job(job_id)["note"] is None
    finally:
        first.stop()


@pytest.mark.slow
def test_kill_9_of_the_server_checkpoints_the_run_once_and_the_next_start_resumes_it(tmp_path):
    data = tmp_path / "data"
    server = Server(data, tmp_path / "first.err").wait_up()
    try:
        job_id = server.post(upload_files(tmp_path), LONG).json()["id"]
        wait_for(lambda: server.job(job_id)["step"] >= 3, 120, "the run's steps")
        pid = run_pid(data, job_id)
        # A busy, many-threaded server: streams and polls in flight when it dies.
        pollers = [threading.Thread(target=_poll, args=(server.url, job_id), daemon=True) for _ in range(8)]
        for poller in pollers:
            poller.start()
        time.sleep(1)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
        wait_for(lambda: not is_run(pid, job_id), 120, "the orphaned run to stop")
    finally:
        server.stop()
    folder = data / "jobs" / job_id
    log = (folder / "run.log").read_text()
    assert log.count("SIGTERM received") == 1 and "received again" not in log, log[-2000:]
    checkpoints = list(folder.glob("lightning_logs/version_*/checkpoints/interrupted.ckpt"))
    assert checkpoints and (folder / "result.partial.png").is_file()
    stopped_at = [r for r in read_progress(folder) if "step" in r][-1]["step"]
    assert stopped_at >= 3
    # The lock went with the killed process: the next start takes the folder and resumes the run.
    again = Server(data, tmp_path / "second.err").wait_up()
    try:
        wait_for(lambda: len([r for r in read_progress(folder) if "start" in r]) >= 2, 120, "the resumed run")
        starts = [r["start"] for r in read_progress(folder) if "start" in r]
        assert starts == [0, stopped_at], "went on from the checkpoint, not from step 0"
        shown = again.job(job_id)
        assert shown["state"] == "running" and "went on from its checkpoint" in shown["note"], shown
        httpx.post(f"{again.url}/api/jobs/{job_id}/cancel", timeout=30)
        wait_for(lambda: again.job(job_id)["state"] == "cancelled", 120, "the cancel")
        again.process.send_signal(signal.SIGINT)
        assert again.process.wait(60) == 0 and "Traceback" not in again.stderr()
    finally:
        again.stop()


def _poll(url: str, job_id: str) -> None:
    for _ in range(100):
        try:
            httpx.get(f"{url}/api/jobs/{job_id}", timeout=5)
        except httpx.HTTPError:
            return


def _damaged(path: Path) -> None:
    from nst_lightning.serve.jobs import JobStore

    jobs = JobStore(path.parent)
    for index in range(40):
        jobs.add(f"{index:032x}", ["fit"] * 50, {"x": "y" * 200}, {}, 4)
    jobs.close()
    with open(path, "r+b") as file:  # a page of the jobs table overwritten
        file.seek(3 * 4096)
        file.write(os.urandom(4096))


def _foreign(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT, password TEXT)")


def _other_jobs(path: Path) -> None:
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE jobs (id TEXT, owner TEXT)")


STORES = {
    "random bytes": (lambda path: path.write_bytes(os.urandom(20000)), "is damaged or not a database"),
    "a damaged page": (_damaged, "is damaged"),
    "another program's tables": (_foreign, "is not a job store of nst-lightning (tables users)"),
    "another jobs table": (_other_jobs, "its jobs table has no created"),
}


@pytest.mark.parametrize("case", sorted(STORES))
def test_a_store_that_is_damaged_or_not_ours_is_refused_at_start(tmp_path, case):
    make, message = STORES[case]
    data = tmp_path / "data"
    data.mkdir()
    path = data / store.STORE_FILE
    make(path)
    before = path.read_bytes()
    with pytest.raises(StoreRefused) as refused:
        create_app(data)
    assert message in str(refused.value) and str(path) in str(refused.value)
    assert "move it away" in str(refused.value) and path.read_bytes() == before, "the file is left as it was"


@pytest.mark.slow
def test_the_serve_command_refuses_a_bad_store_in_one_line_before_serving(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / store.STORE_FILE).write_bytes(os.urandom(20000))
    server = Server(data, tmp_path / "err")
    assert server.process.wait(60) == 1 and server.first_line() == "", "never 'serving on'"
    lines = server.stderr().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"nst-lightning: error: the job store {data}"), lines
    server.stop()


@pytest.mark.slow
def test_the_serve_command_on_a_read_only_data_folder_is_one_line(tmp_path):
    data = tmp_path / "data"
    create_app(data).state.store.close()  # a store made before the folder became read-only
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("needs unshare -m (a mount namespace) to mount a folder read-only")
    readonly = f'mount --bind {data} {data} && mount -o remount,bind,ro {data} && exec "$@"'
    server = Server(data, tmp_path / "err", wrap=["unshare", "-m", "sh", "-c", readonly, "sh"])
    assert server.process.wait(60) == 1 and server.first_line() == "", server.stderr()
    lines = server.stderr().splitlines()
    assert len(lines) == 1 and f"cannot open {data}" in lines[0] and "Read-only file system" in lines[0], lines
    assert "make the --data folder writable" in lines[0]
    assert "Traceback" not in server.stderr()
    server.stop()


def test_a_quiet_event_stream_gets_keep_alives(tmp_path, monkeypatch):
    monkeypatch.setattr(progress, "KEEPALIVE_SECONDS", 0.2)
    app = create_app(tmp_path / "data")
    client = TestClient(app)  # no lifespan, so no worker: the job stays queued and its stream has nothing to say
    try:
        job_id = post(client, upload_files(tmp_path)).json()["id"]
        seen = []
        with client.stream("GET", f"/api/jobs/{job_id}/events") as response:
            for line in response.iter_lines():
                seen.append(line)
                if seen.count(": keep-alive") == 2:
                    client.post(f"/api/jobs/{job_id}/cancel")  # the job ends, and with it the stream
        names = [line[7:] for line in seen if line.startswith("event: ")]
        assert names == ["state", "state"] and seen.count(": keep-alive") >= 2, seen
    finally:
        app.state.store.close()


def _small_files() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 19, 1 << 19))  # files over 512 kB fail (EFBIG), as on a full disk


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="RLIMIT_FSIZE")
def test_an_upload_that_meets_a_full_disk_is_one_json_error_and_keeps_nothing(tmp_path):
    data = tmp_path / "data"
    server = Server(data, tmp_path / "err", preexec_fn=_small_files).wait_up()
    try:
        # 600 kB: held in memory while the form is read, then too big for the job's folder; 3 MB: the form's spool
        # file in the temporary folder is too big already (FastAPI would call that "error parsing the body").
        for size in (600_000, 3 << 20):
            big = b"\x89PNG\r\n\x1a\n" + os.urandom(size)  # written whole before it is read as an image
            response = server.post([("content", ("c.png", big, "image/png")), upload_files(tmp_path)[1]])
            assert response.status_code == 507, response.text
            detail = response.json()["detail"]
            assert "no room" in detail and "File too large" in detail and str(tmp_path) not in detail
            assert httpx.get(f"{server.url}/api/jobs", timeout=30).json() == []
            assert list((data / "jobs").iterdir()) == [], "nothing half-written kept"
    finally:
        server.stop()
