"""The web app against a hostile client: near-miss, look-alike and repeated setting keys, print sizes out of
range, bodies that lie about their size or come slowly in chunks, a data folder that cannot be written, a
deleted ``server.lock``, and runs killed outright; through the app's test client and the real ``serve``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the web app's tests need its extra: pip install -e '.[web]'")
pytest.importorskip("multipart", reason="the web app's tests need python-multipart: pip install -e '.[web]'")

with warnings.catch_warnings():  # Starlette 1.x: httpx in its test client is deprecated (for httpx2)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from nst_lightning.serve import app as app_module  # noqa: E402
from nst_lightning.serve.app import create_app  # noqa: E402
from nst_lightning.serve.jobs import JobStore  # noqa: E402
from nst_lightning.serve.progress import NO_REASON  # noqa: E402
from nst_lightning.serve.store import StoreRefused  # noqa: E402
from nst_lightning.serve.worker import Worker  # noqa: E402
from tests.conftest import make_image, wait_for  # noqa: E402
from tests.serving import free_port  # noqa: E402

RANDOM = '"model.weights": "random", "data.image_size": 32, "trainer.max_steps": 2'


@pytest.fixture(autouse=True)
def passive_threads(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp("images")
    content = make_image(folder / "c.png", 40, 30, seed=1).read_bytes()
    style = make_image(folder / "s.png", 32, 32, seed=2).read_bytes()
    return [("content", ("c.png", content, "image/png")), ("style", ("s.png", style, "image/png"))]


@contextlib.contextmanager
def idle_app(data: Path):
    """The app over ``data`` without workers (jobs stay queued), in its test client."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(app_module.jobs, "device_workers", lambda store: [])
        with TestClient(create_app(data), raise_server_exceptions=False) as client:
            yield client


@pytest.fixture(scope="module")
def idle(tmp_path_factory):
    data = tmp_path_factory.mktemp("idle") / "data"
    with idle_app(data) as client:
        yield client, data


def refused(idle, images, text: str) -> dict:
    client, data = idle
    response = client.post("/api/jobs", files=images, data={"settings": text})
    assert response.status_code == 422, response.text
    assert "Traceback" not in response.text
    assert client.get("/api/jobs").json() == [] and list((data / "jobs").iterdir()) == [], "nothing kept"
    return response.json()


@pytest.mark.parametrize(
    "text, key, message",
    [
        ('{"model.style_w": 1}', "model.style_w", "unrecognized"),
        ('{"model.style_weightx": 1}', "model.style_weightx", "unrecognized"),
        ('{"modell": {"style_weight": 1}}', "modell.style_weight", "not a setting a job can change"),
        ('{"model.style_weight.": 1}', "model.style_weight.", "unrecognized"),
        ('{"model.style_weight ": 1}', "model.style_weight ", "unrecognized"),
        ('{" model.style_weight": 1}', " model.style_weight", "not a setting a job can change"),
        ('{"model..style_weight": 1}', "model..style_weight", "unrecognized"),
        ('{"model.styl\\u0435_weight": 1}', "model.styl\u0435_weight", "unrecognized"),  # a Cyrillic e
        ('{"m\\u043edel.style_weight": 1}', "m\u043edel.style_weight", "not a setting"),  # a Cyrillic o
        ('{"model.style_weight\\u200b": 1}', "model.style_weight\u200b", "unrecognized"),  # a zero-width space
        ('{"model.\\uff53tyle_weight": 1}', "model.\uff53tyle_weight", "unrecognized"),  # a full-width s
        ('{"MODEL.style_weight": 1}', "MODEL.style_weight", "not a setting"),
        ('{"--model.style_weight": 1}', "--model.style_weight", "not a setting"),
        ('{"model": {"model": {"style_weight": 1}}}', "model.model", "unrecognized"),
        ('{"model.style_weight+": [1]}', "model.style_weight+", "append form"),
    ],
)
def test_near_miss_and_look_alike_keys_are_a_422_naming_the_key(idle, images, text, key, message):
    answer = refused(idle, images, text)
    assert answer["key"] == key and message in answer["detail"], answer


@pytest.mark.parametrize(
    "text, shown",
    [
        ('{"": 1}', '""'),
        ('{"model.style_weight ": 1}', '"model.style_weight "'),
        ('{"model.styl\\u0435_weight": 1}', '"model.styl\\u0435_weight"'),  # the Cyrillic e shows as its code point
        ('{"model.style_weight\\u200b": 1}', '"model.style_weight\\u200b"'),
        ('{"model.style_layers\\u200b+": [1]}', '"model.style_layers\\u200b+"'),  # and its whole list's key too
    ],
)
def test_a_key_that_reads_wrong_is_shown_quoted_and_escaped(idle, images, text, shown):
    answer = refused(idle, images, text)
    assert answer["detail"].startswith(shown + " ") or answer["detail"].startswith(shown + ":"), answer
    assert "\u200b" not in answer["detail"], "no invisible letter in what the message says to send"


@pytest.mark.parametrize(
    "text, key",
    [
        ('{"model.style_weight": 1, "model.style_weight": 2}', "model.style_weight"),
        ('{"model.style_weight": "x", "model": {"style_weight": 1}}', "model.style_weight"),  # before: 201, "x" lost
        ('{"model": {"style_weight": 1}, "model.style_weight": 2}', "model.style_weight"),
        ('{"model": {"style_weight": 1, "style_weight": 2}}', "model.style_weight"),
        ('{"model": {"weights": "/etc/passwd"}, "model": {"weights": "random"}}', "model"),
    ],
)
def test_a_key_given_twice_is_a_422_not_one_value_kept_silently(idle, images, text, key):
    answer = refused(idle, images, text)
    assert answer == {"detail": f"{key} is given twice (nested or dotted): send each setting once", "key": key}


@pytest.mark.parametrize(
    "setting, key, message",
    [
        ('"model.tile_size": 128.5', "model.tile_size", "Expected a <class 'int'>"),
        ('"model.tile_size": true', "model.tile_size", "Expected a <class 'int'>"),
        ('"model.tile_size": "big"', "model.tile_size", "Expected a <class 'int'>"),
        ('"model.tile_size": [512]', "model.tile_size", "one value, not a list"),
        ('"model.tile_size": 63', "model.tile_size", "64 px or more"),
        ('"data.image_size": 100000', "data.image_size", "lower data.image_size"),
        ('"data.image_size": 1e9', "data.image_size", "Expected a <class 'int'>"),
        ('"data.image_size": true', "data.image_size", "Expected a <class 'int'>"),
        ('"data.image_size": -1', "data.image_size", "positive number of pixels"),
    ],
)
def test_print_sizes_out_of_range_are_a_422_naming_the_key(idle, images, setting, key, message):
    answer = refused(idle, images, "{" + RANDOM.replace('"data.image_size": 32, ', "") + ", " + setting + "}")
    assert answer["key"] == key and message in answer["detail"], answer


@contextlib.contextmanager
def frozen(path: Path):
    """``path`` cannot be changed meanwhile: ``chattr +i`` for root (whom modes do not stop), else mode 0o555."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("root without chattr +i: nothing here makes a folder unwritable")
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)


def test_an_unwritable_data_folder_is_a_503_and_a_job_whose_files_cannot_go_is_kept(tmp_path, images):
    data = tmp_path / "data"
    settings = {"settings": "{" + RANDOM + "}"}
    with idle_app(data) as client:
        job_id = client.post("/api/jobs", files=images, data=settings).json()["id"]
        with frozen(data / "jobs"):
            answer = client.post("/api/jobs", files=images, data=settings)
        assert answer.status_code == 503 and answer.headers["retry-after"], answer.text
        assert "cannot write its data folder" in answer.json()["detail"] and str(tmp_path) not in answer.text
        with frozen(data / "jobs.sqlite3"):
            answer = client.post("/api/jobs", files=images, data=settings)
            assert answer.status_code == 503 and "readonly database" in answer.json()["detail"], answer.text
            assert client.get("/api/jobs").status_code == 200, "reads go on"
        assert [job["id"] for job in client.get("/api/jobs").json()] == [job_id] and len(os.listdir(data / "jobs")) == 1
        with frozen(data / "jobs" / job_id):
            answer = client.delete(f"/api/jobs/{job_id}")
        assert answer.status_code == 503 and "could not be deleted" in answer.json()["detail"], answer.text
        assert client.get(f"/api/jobs/{job_id}").status_code == 200, "before: 200 'deleted', its files left unlisted"
        assert client.delete(f"/api/jobs/{job_id}").json() == {"deleted": job_id}
        assert os.listdir(data / "jobs") == [] and client.get("/api/jobs").json() == []
        assert client.post("/api/jobs", files=images, data=settings).status_code == 201, "writable again: it recovers"


def test_a_deleted_server_lock_does_not_let_a_second_server_in(tmp_path):
    data = tmp_path / "data"
    first = JobStore(data)
    (data / "server.lock").unlink()  # taken for a stale lock
    with pytest.raises(StoreRefused, match="in use by another nst-lightning server .its server.lock was removed"):
        JobStore(data)  # before: it started, and its recovery stopped the first server's runs
    first.close()
    JobStore(data).close()  # let go with the first server


def test_a_killed_run_fails_naming_the_signal_and_a_run_left_by_a_killed_server_is_queued_again(tmp_path, images):
    data = tmp_path / "data"
    with idle_app(data) as client:
        ids = [client.post("/api/jobs", files=images, data={"settings": "{" + RANDOM + "}"}).json()["id"] for _ in "ab"]
        store = client.app.state.store
        (store.folder(ids[0]) / "run.log").write_text("Epoch 0:  40%\n")  # killed before it could say anything
        outcome = Worker(store, "cpu")._outcome(ids[0], store.folder(ids[0]), -9, None)
        assert outcome["state"] == "failed" and outcome["error"].startswith("the run was killed (SIGKILL: out of")
        assert Worker(store, "cpu")._outcome(ids[0], store.folder(ids[0]), 1, None)["error"] == NO_REASON
        # The server and its run killed together (kill -9 of both): the store says running, with a dead pid.
        dead = subprocess.Popen(["true"])
        dead.wait()
        assert store.claim("cpu")[0] == ids[0]
        store.update(ids[0], pid=dead.pid)
        store.lock.release()  # as a killed process lets it go
    with idle_app(data) as client:
        shown = client.get(f"/api/jobs/{ids[0]}").json()
        assert shown["state"] == "queued" and shown["position"] == 1, shown
        assert "restarted from the start" in shown["note"]
        assert client.get(f"/api/jobs/{ids[0]}/result").status_code == 404, "no image until it finishes"
        assert client.get(f"/api/jobs/{ids[1]}").json()["position"] == 2


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The real ``serve`` command with 0.1 MB images: a request may hold 9 of them and the form, 1.9 MB."""
    port, data = free_port(), tmp_path_factory.mktemp("served") / "data"
    command = [sys.executable, "-m", "nst_lightning", "serve", "--port", str(port), "--data", str(data)]
    server = subprocess.Popen([*command, "--max-upload-mb", "0.1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = server.stdout.readline().decode()
        assert line.startswith("nst-lightning: serving on"), line + server.stderr.read().decode()
        wait_for(lambda: _answers(port), 60, "the server to answer")
        yield port, data, server
    finally:
        server.terminate()
        server.wait(timeout=60)


def _answers(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET /api/options HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        return sock.recv(12).startswith(b"HTTP/1.1 200")
    return False


HEAD = "POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
PART = b'--x\r\nContent-Disposition: form-data; name="content"; filename="c.png"\r\n\r\n'


def answer_of(sock: socket.socket, wait: float = 5) -> bytes:
    sock.settimeout(wait)
    answer = b""
    with contextlib.suppress(OSError):
        while (more := sock.recv(65536)) and b"}" not in answer + more:
            answer += more
        answer += more
    return answer


def still_whole(port: int, data: Path, server: subprocess.Popen) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /api/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert answer_of(sock).startswith(b"HTTP/1.1 200"), "the server answers on"
    assert server.poll() is None and list((data / "jobs").iterdir()) == [], "nothing kept"
    held = [os.readlink(f"/proc/{server.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{server.pid}/fd")]
    assert not [name for name in held if name.endswith("(deleted)")], f"spooled bodies still open: {held}"


@pytest.mark.slow
def test_a_slow_chunked_body_is_stopped_at_the_limit(served):
    port, data, server = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"{HEAD}Transfer-Encoding: chunked\r\n\r\n".encode() + b"%x\r\n%s\r\n" % (len(PART), PART))
        chunk, sent, answer = b"\1" * (16 << 10), 0, b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            while sent < 8 << 20 and not answer:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                time.sleep(0.002)
                sock.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    answer = sock.recv(65536)
                sock.setblocking(True)
        answer += answer_of(sock) if b"}" not in answer else b""
    assert answer.startswith(b"HTTP/1.1 413") and b"over the upload limit" in answer, answer[:300]
    assert sent < 3 << 20, f"{sent >> 10} KB taken before the 413"
    wait_for(lambda: list((data / "jobs").iterdir()) == [], 10, "nothing kept")
    still_whole(port, data, server)


@pytest.mark.slow
@pytest.mark.parametrize(
    "headers, body, status",
    [
        ("Content-Length: 5000000\r\n", PART + b"\0" * 1000, b"HTTP/1.1 413"),  # over the limit: at once
        ("Content-Length: 100\r\n", PART + b"\0" * 300_000, b"HTTP/1.1 4"),  # the rest is no request
        ("Content-Length: 1000000\r\n", PART + b"\0" * 1000, b""),  # shorter, then the client goes
        ("Content-Length: 10\r\nTransfer-Encoding: chunked\r\n", b"1\r\n\0\r\n" * 50, b"HTTP/1.1 400"),
        ("Content-Length: -1\r\n", PART, b"HTTP/1.1 400"),
        ("Content-Length: 99999999999999999999999999\r\n", PART, b"HTTP/1.1 400"),
    ],
)
def test_a_body_that_lies_about_its_length_keeps_nothing(served, headers, body, status):
    port, data, server = served
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):  # the server may answer and close first
            sock.sendall(f"{HEAD}{headers}\r\n".encode() + body)
            sock.shutdown(socket.SHUT_WR)
        answer = answer_of(sock)
    assert answer.startswith(status), answer[:300]
    assert b"Traceback" not in answer
    still_whole(port, data, server)


def test_settings_json_is_one_object_of_unique_keys():
    from nst_lightning.serve.settings import JsonObject, SettingsError, flatten

    assert flatten(json.loads('{"model": {"a": 1}, "data.b": 2}', object_pairs_hook=JsonObject)) == {
        "model.a": 1,
        "data.b": 2,
    }
    with pytest.raises(SettingsError, match="model.a is given twice"):
        flatten(json.loads('{"model.a": 1, "model": {"a": 1}}', object_pairs_hook=JsonObject))


def test_a_broken_client_connection_is_one_line_and_other_loop_faults_keep_their_traceback(caplog):
    """uvicorn's h11 protocol fails on a body sent on after its answer, and the transport reports that to the event
    loop, whose default handler printed a traceback (seen in CI on ``--watch``'s terminal): one line instead. Any
    other fault of the loop (a bug of the app's own) still goes to the default handler."""
    import h11

    from nst_lightning.serve.guards import quiet_protocol_faults

    class Server:  # uvicorn.Server's part: run() calls serve() in its own loop
        def run(self, sockets=None):
            asyncio.run(self.serve(sockets=sockets))

        async def serve(self, sockets=None):
            loop = asyncio.get_running_loop()
            for error in (h11.LocalProtocolError("can't handle event type Response"), ValueError("a bug")):
                try:
                    raise error
                except Exception as caught:  # noqa: BLE001 - reported to the loop, as a transport does
                    loop.call_exception_handler(
                        {
                            "message": "Fatal error: protocol.data_received() call failed."
                            if isinstance(caught, h11.LocalProtocolError)
                            else "Task failed",
                            "exception": caught,
                        }
                    )

    said: list[str] = []
    server = Server()
    quiet_protocol_faults(server, said.append)
    server.run(sockets=[])
    assert said == [
        "Fatal error: protocol.data_received() call failed. (LocalProtocolError: can't handle event type Response)"
    ]
    (record,) = [r for r in caplog.records if r.name == "asyncio"]  # the loop's default handler: logged whole
    assert record.getMessage() == "Task failed" and isinstance(record.exc_info[1], ValueError), record
