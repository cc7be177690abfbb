"""The web app's walls, through its HTTP API (FastAPI's test client, and the real ``serve`` command): no setting
reaches a server path, no message names one, bodies are counted as they arrive, other sites and unknown Host
names are refused, bad values are a 422 naming the key, uploads are decoded a few at a time."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="the web app's tests need its extra: pip install -e '.[web]'")
pytest.importorskip("multipart", reason="the web app's tests need python-multipart: pip install -e '.[web]'")

with warnings.catch_warnings():  # Starlette 1.x: httpx in its test client is deprecated (for httpx2)
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient  # noqa: E402

from nst_lightning.core.backbones import load_backbone  # noqa: E402
from nst_lightning.serve import app as app_module  # noqa: E402
from nst_lightning.serve import settings as settings_module  # noqa: E402
from nst_lightning.serve.app import create_app  # noqa: E402
from nst_lightning.serve.guards import Scrubber  # noqa: E402
from tests.conftest import make_image, wait_for  # noqa: E402
from tests.test_serve import TINY, job, post_job  # noqa: E402


@pytest.fixture(autouse=True)
def passive_threads(monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")


@pytest.fixture
def uploads(tmp_path: Path) -> dict[str, bytes]:
    return {
        "content": make_image(tmp_path / "c.png", 40, 30, seed=1).read_bytes(),
        "style": make_image(tmp_path / "s.jpg", 32, 32, seed=2).read_bytes(),
    }


@pytest.fixture
def no_runs(monkeypatch):
    """The app without workers: jobs stay queued (these tests are about what gets in)."""
    monkeypatch.setattr(app_module.jobs, "device_workers", lambda store: [])


def merged(extra: dict) -> dict:
    settings = json.loads(json.dumps(TINY))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(settings.get(key), dict):
            settings[key].update(value)
        else:
            settings[key] = value
    return settings


SECRET = "SECRET"  # replaced by the path of an image of the server's, outside its data folder
PATH_SETTINGS = [
    ({"data": {"cont": SECRET}}, "data.cont"),  # before: 201, and the job's result was the server's file
    ({"data": {"content": SECRET}}, "data.content"),
    ({"data": {"sty": SECRET}}, "data.sty"),
    ({"data": {"style": SECRET}}, "data.style"),
    ({"data": {"style+": SECRET}}, "data.style+"),  # before: 201, the server's file as a second style
    ({"data": {"style_masks": [SECRET]}}, "data.style_masks"),
    ({"data": {"style_masks+": SECRET}}, "data.style_masks+"),
    ({"data": {"style_m": [SECRET]}}, "data.style_m"),
    ({"model": {"init": SECRET}}, "model.init"),
    ({"model": {"ini": SECRET}}, "model.ini"),  # before: 201, the run started from the server's file
    ({"model": {"weights": SECRET}}, "model.weights"),
    ({"model": {"weigh": SECRET}}, "model.weigh"),  # before: 201
    ({"model": {"weights": [SECRET]}}, "model.weights"),  # before: 500
    ({"model": SECRET}, "model"),
    ({"guard.": SECRET}, "guard."),
    ({"config": SECRET}, "config"),
    ({"ckpt_path": SECRET}, "ckpt_path"),
    ({"trainer": {"default_root_dir": SECRET}}, "trainer.default_root_dir"),
    ({"trainer.default_root": SECRET}, "trainer.default_root"),
    ({"trainer": {"callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}]}}, "trainer.callbacks"),
    ({"trainer": {"logger": SECRET}}, "trainer.logger"),
    ({"output": {"path": SECRET}}, "output.path"),
    ({"output.pa": SECRET}, "output.pa"),
]


@pytest.mark.parametrize("extra, key", PATH_SETTINGS, ids=[key for _, key in PATH_SETTINGS])
def test_no_setting_can_name_a_server_path(tmp_path, uploads, no_runs, extra, key):
    secret = str(make_image(tmp_path / "secret.png", 33, 33, seed=9))
    settings = json.loads(json.dumps(merged(extra)).replace(SECRET, secret))
    with TestClient(create_app(tmp_path / "data")) as client:
        response = post_job(client, uploads, settings)
        assert response.status_code == 422, response.text
        assert response.json()["key"] == key, response.text
        assert secret not in response.text and str(tmp_path) not in response.text
        assert client.get("/api/jobs").json() == []
        assert list((tmp_path / "data" / "jobs").iterdir()) == [], "nothing left behind"


@pytest.mark.slow
@pytest.mark.parametrize(
    "argument, key",
    [
        ("--data.cont=SECRET", None),  # abbreviations are off: "unrecognized"
        ("--data.style+=SECRET", "data.style"),
        ("--data.style_masks=[SECRET]", "data.style_masks"),
        ("--model.init=SECRET", "model.init"),
        ("--model.weights=SECRET", "model.weights"),
        ("--config=CONFIG", "config"),  # a config file of the server's (setting model.init: SECRET)
        ("--trainer.max_epochs=3", "trainer.max_epochs"),
        ("--trainer.logger=false", "trainer.logger"),
        ("--seed_everything=-5", "seed_everything"),
    ],
)
def test_the_parsed_settings_are_compared_with_the_servers_own(tmp_path, images, argument, key):
    """The second wall, behind the names: whatever reached the parser is judged by what it parsed to (the server's
    own folders and output come after the job's settings, so they win there)."""
    secret = str(make_image(tmp_path / "secret.png", 33, 33, seed=9))
    folder = tmp_path / "job"
    folder.mkdir()
    own = settings_module.fit_arguments(folder, images["content"], [images["style"]], [], 5)
    config = tmp_path / "server.yaml"
    config.write_text(f"model:\n  init: {secret}\n")
    chosen = [
        "--model.weights=random",
        "--data.image_size=32",
        argument.replace(SECRET, secret).replace("CONFIG", str(config)),
    ]
    fit = settings_module.fit_arguments(folder, images["content"], [images["style"]], chosen, 5)
    with pytest.raises(settings_module.SettingsError) as refused:
        settings_module.validate(fit, own, {"imagenet": "imagenet", "random": "random"})
    assert refused.value.key == key or (key is None and "unrecognized" in str(refused.value)), str(refused.value)
    assert settings_module.validate([*own, "--model.weights=random"], own, {"random": "random"})["max_steps"] == 300


@pytest.mark.parametrize(
    "settings_text, key, message",
    [
        ('{"model": {"weights": {"a": 1}}}', "model.weights", "not an object"),
        ('{"model": {"weights": ["imagenet"]}}', "model.weights", "one value, not a list"),
        ('{"model": {"backbone": ["vgg19"]}}', "model.backbone", "one value, not a list"),
        ('{"model": {"content_layers": "relu4_2"}}', "model.content_layers", "Expected a"),
        ('{"trainer": {"max_steps": 100000000000000000000000}}', "trainer.max_steps", "within 64 bits"),
        ('{"trainer": {"max_steps": "100000000000000000000000"}}', "trainer.max_steps", "over the most"),
        ('{"seed_everything": -5}', "seed_everything", "from 0 to 4294967295"),
        ('{"seed_everything": 4294967296}', "seed_everything", "from 0 to 4294967295"),
        ('{"seed_everything": "7"}', "seed_everything", "whole number"),
        ('{"model": {"seed": -1}}', "model.seed", "from 0 to 4294967295"),
        # Print sizes (model.tile_size), played against a live server: one 422 naming the key, nothing stored.
        ('{"model": {"weights": "random", "tile_size": -5}}', "model.tile_size", "64 px or more"),
        ('{"model": {"weights": "random", "tile_size": "../../etc/passwd"}}', "model.tile_size", "Expected a"),
        ('{"model": {"weights": "random", "tile_size": 1e9}}', "model.tile_size", "Expected a"),
        ('{"model": {"tv_weight": NaN}}', "settings", "NaN is not a JSON number"),
        ('{"model": {"tv_weight": Infinity}}', "settings", "Infinity is not a JSON number"),
    ],
)
def test_values_that_crashed_the_handler_are_a_422_naming_the_key(
    tmp_path, uploads, no_runs, settings_text, key, message
):
    with TestClient(create_app(tmp_path / "data"), raise_server_exceptions=False) as client:
        files = [("content", ("c.png", uploads["content"], "image/png")), ("style", ("s.jpg", uploads["style"]))]
        response = client.post("/api/jobs", files=files, data={"settings": settings_text})
        assert response.status_code == 422, response.text  # before: 500 (and a traceback) for most
        assert response.json()["key"] == key and message in response.json()["detail"], response.text
        assert client.get("/api/jobs").json() == [], "the store holds nothing it cannot give back"


@pytest.mark.slow
def test_a_failed_jobs_error_names_no_server_path(tmp_path, uploads):
    weights = tmp_path / "secret-weights-folder"
    weights.mkdir()
    # A VGG-16 the server offers (its layers' shapes are right) whose values are damaged: the run fails at load.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        state = load_backbone("vgg16", "random").state_dict()
    state["0.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, weights / "broken.pth")
    with TestClient(create_app(tmp_path / "data", weights_dir=weights)) as client:
        response = post_job(client, uploads, merged({"model": {"weights": "broken.pth"}}))
        assert response.status_code == 201, response.text
        job_id = response.json()["id"]
        wait_for(lambda: job(client, job_id)["state"] in ("failed", "done"), 120, "the job to fail")
        shown = job(client, job_id)
        assert shown["state"] == "failed" and "broken.pth" in shown["error"], shown
        listed = json.dumps(client.get("/api/jobs").json())
        for text in (json.dumps(shown), listed):
            assert str(tmp_path) not in text and "secret-weights-folder" not in text, text


def test_the_scrubber_keeps_names_and_drops_folders(tmp_path):
    data = tmp_path / "data"
    folder = data / "jobs" / ("a" * 32)
    scrubber = Scrubber(data, {"random": "random", "v.pth": str(tmp_path / "w" / "v.pth")})
    text = (
        f"cannot write {folder}/result.png: disk full; weights {tmp_path}/w/v.pth; store {data}/jobs.sqlite3; "
        "also /etc/passwd and ./here/x.png, see http://127.0.0.1:8000/api/jobs, 3/4 done"
    )
    assert scrubber.scrub(text, folder) == (
        "cannot write result.png: disk full; weights v.pth; store <data>/jobs.sqlite3; "
        "also passwd and ./here/x.png, see http://127.0.0.1:8000/api/jobs, 3/4 done"
    )


def test_with_a_token_the_page_static_files_and_schema_stay_open(tmp_path):
    with TestClient(create_app(tmp_path / "data", token="tok")) as client:
        for url in ("/", "/static/app.js", "/docs", "/openapi.json"):
            assert client.get(url).status_code == 200, url
        assert client.get("/api/jobs").status_code == 401


def post_into(answers: list, client: TestClient, uploads: dict) -> None:
    answers.append(post_job(client, uploads).status_code)


@pytest.mark.slow
def test_uploads_are_decoded_a_few_at_a_time_and_a_jpeg_at_the_jobs_scale(tmp_path, uploads, no_runs, monkeypatch):
    import nst_lightning.io.image_io as image_io

    decoding, most, sizes = [0], [0], []
    lock = threading.Lock()
    real = image_io.open_rgb

    def watched(path, draft=None):
        with lock:
            decoding[0] += 1
            most[0] = max(most[0], decoding[0])
        try:
            time.sleep(0.2)
            image = real(path, draft=draft)
            sizes.append(image.size)
            return image
        finally:
            with lock:
                decoding[0] -= 1

    monkeypatch.setattr(image_io, "open_rgb", watched)
    big = make_image(tmp_path / "big.jpg", 1600, 1200, seed=4).read_bytes()
    for slots in (1, 4):
        monkeypatch.setattr(app_module, "decode_slots", lambda slots=slots: slots)
        most[0], answers = 0, []
        with TestClient(create_app(tmp_path / f"data{slots}")) as client:
            threads = [
                threading.Thread(target=post_into, args=(answers, client, dict(uploads, content=big))) for _ in range(4)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert answers == [201] * 4
            assert most[0] == 1 if slots == 1 else most[0] > 1, f"{most[0]} decodes at once with {slots} slots"
            assert (200, 150) in sizes and (1600, 1200) not in sizes, f"32 px jobs: the JPEG decoded at 1/8: {sizes}"
            stored = client.get(f"/api/jobs/{client.get('/api/jobs').json()[0]['id']}/inputs/content").content
            assert stored == big, "the upload is kept as sent"
    from nst_lightning.serve.uploads import MAX_DECODES, decode_slots

    assert decode_slots(available=0) == 1 and decode_slots(available=1 << 50) == MAX_DECODES
    monkeypatch.setenv("NST_MAX_IMAGE_PIXELS", "1000000")
    assert decode_slots(available=2 * 8 * 3_000_000) == 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The real ``serve`` command on a free port, uploads limited to 1 MB, answering to nst.example too."""
    port = free_port()
    data = tmp_path_factory.mktemp("served") / "d"
    command = [
        sys.executable,
        "-m",
        "nst_lightning",
        "serve",
        "--port",
        str(port),
        "--data",
        str(data),
        "--max-upload-mb",
        "1",
        "--allowed-host",
        "nst.example",
    ]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = server.stdout.readline()
        assert line.startswith("nst-lightning: serving on"), line + server.stderr.read()
        wait_for(lambda: request(port, "GET", "/api/options")[0] == 200, 60, "the server to answer")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=60)


def request(port: int, method: str, path: str, headers: dict | None = None, body: bytes = b"") -> tuple[int, dict]:
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data.startswith(b"{") else {}
    except OSError:
        return 0, {}
    finally:
        connection.close()


@pytest.mark.slow
def test_other_sites_and_unknown_host_names_are_refused(served):
    port = served
    assert request(port, "GET", "/api/jobs", {"Host": "evil.example"}) == (
        403,
        {
            "detail": "this server does not answer to the name 'evil.example': start it with "
            "--allowed-host evil.example to allow it",
            "key": "host",
        },
    )
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "nst.example", "10.1.2.3:8000"):
        assert request(port, "GET", "/api/options", {"Host": host})[0] == 200, host
    form = {"Content-Type": "multipart/form-data; boundary=x"}
    body = b"--x--\r\n"
    for origin in ("http://evil.example", "null", f"http://localhost:{port + 1}"):
        status, answer = request(port, "POST", "/api/jobs", {**form, "Origin": origin}, body)
        assert (status, answer.get("key")) == (403, "origin"), origin
    assert request(port, "DELETE", "/api/jobs/" + "a" * 32, {"Origin": "http://evil.example"})[0] == 403
    # The server's own page (Origin = Host), a proxy's name given by --allowed-host, and clients without Origin:
    for headers in ({"Origin": f"http://127.0.0.1:{port}"}, {"Origin": "https://nst.example"}, {}):
        status, answer = request(port, "POST", "/api/jobs", {**form, **headers}, body)
        assert status == 422 and answer["key"] in ("content", "style"), (headers, answer)


def test_a_chunked_body_is_stopped_at_the_limit(served):
    """1 MB images: a request may hold 9 images and the form, 10 MB; a 200 MB chunked body is cut off there."""
    port = served
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST /api/jobs HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n\r\n".encode()
        )
        part = b'--x\r\nContent-Disposition: form-data; name="content"; filename="c.png"\r\n\r\n'
        chunk = b"\0" * (1 << 20)
        sent, answer = 0, b""
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(part), part))
            while sent < 200 << 20 and not answer:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
                sock.settimeout(0.001)
                try:
                    answer = sock.recv(4096)
                except (TimeoutError, BlockingIOError):
                    pass
                sock.settimeout(30)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(30)
        with contextlib.suppress(ConnectionResetError):
            while b"upload limit" not in answer and (more := sock.recv(4096)):
                answer += more
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]  # before: the whole body spooled, then a 422
    assert b"over the upload limit" in answer
    assert sent < 60 << 20, f"{sent >> 20} MB sent before the server stopped it"


SAMPLES = Path(__file__).resolve().parents[1] / "nst_lightning" / "samples"


@pytest.mark.parametrize(
    "args, status, message",
    [
        (["serve", "--port", "70000"], 2, "--port: '70000' is not a port"),
        (["serve", "--port", "-1"], 2, "--port: '-1' is not a port"),
        (["serve", "--max-upload-mb", "nan"], 2, "--max-upload-mb: 'nan' is not a size"),
        (["serve", "--max-upload-mb", "-1"], 2, "--max-upload-mb: '-1' is not a size"),
        (["c.png", "s.png", "--seed", "-1"], 1, "--seed must be a whole number from 0 to 4294967295"),
        (["c.png", "s.png", "--seed", "4294967296"], 1, "--seed must be a whole number from 0 to 4294967295"),
        (
            [
                "fit",
                f"--data.content={SAMPLES}/content_tubingen.jpg",
                f"--data.style={SAMPLES}/style_starry_night.jpg",
                "--seed_everything=-5",
            ],
            2,
            "seed_everything must be a whole number from 0 to 4294967295",
        ),
    ],
)
def test_bad_command_line_values_are_one_line(tmp_path, monkeypatch, capsys, args, status, message):
    from nst_lightning.main import cli_main

    monkeypatch.chdir(tmp_path)
    data = ["--data", str(tmp_path / "d")] if args[0] == "serve" else []
    with pytest.raises(SystemExit) as stopped:
        cli_main([*args, *data])
    err = capsys.readouterr().err
    assert stopped.value.code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == [], "refused before anything was made"
