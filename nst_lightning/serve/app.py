"""The web app's routes: the page at ``/`` and the JSON API under ``/api`` (FastAPI; OpenAPI page at ``/docs``)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import json
import os
import re
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from nst_lightning.serve import failures, jobs, progress, settings
from nst_lightning.serve.progress import PREVIEW_FILE
from nst_lightning.serve.uploads import UploadError, display_name, save_upload

STATIC = Path(__file__).resolve().parent / "static"
MAX_STYLES = 8
UPLOAD_LIMIT_MB = 25.0
PREVIEW_EVERY = 5
EVENT_POLL_SECONDS = 0.25


class ApiError(Exception):
    """An error the API answers with ``status`` and ``{"detail": message, "key": key}``."""

    def __init__(self, status: int, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.key = key


def offered_weights(weights_dir: Path | None) -> dict[str, str]:
    """The ``model.weights`` a job may pick: ``imagenet``, ``random``, and each ``.pth`` / ``.pt`` file of
    ``weights_dir`` by its name (mapped to its path)."""
    offered = {name: name for name in settings.NAMED_WEIGHTS}
    if weights_dir is not None and weights_dir.is_dir():
        for path in sorted(weights_dir.iterdir()):
            if path.suffix in (".pth", ".pt") and path.is_file():
                offered[path.name] = str(path.resolve())
    return offered


def defaults() -> dict[str, Any]:
    """The command line's defaults of the settings the page shows (from the classes' signatures)."""
    from nst_lightning.cli import TRAINER_DEFAULTS
    from nst_lightning.data import StyleTransferDataModule
    from nst_lightning.module import StyleTransfer

    model = inspect.signature(StyleTransfer.__init__).parameters
    data = inspect.signature(StyleTransferDataModule.__init__).parameters
    return {
        "data.image_size": data["image_size"].default,
        "trainer.max_steps": TRAINER_DEFAULTS["trainer.max_steps"],
        "model.style_weight": model["style_weight"].default,
        "model.preserve_color": model["preserve_color"].default,
        "model.backbone": model["backbone"].default,
        "model.weights": model["weights"].default,
    }


def _event(name: str, data: Any) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def create_app(
    data: str | os.PathLike,
    token: str | None = None,
    max_upload_mb: float = UPLOAD_LIMIT_MB,
    weights_dir: str | os.PathLike | None = None,
    preview_every: int = PREVIEW_EVERY,
) -> FastAPI:
    """The app over the data folder ``data`` (jobs, their files and the SQLite store).

    Args:
        data: the folder of the job store and the jobs' files (made if missing).
        token: when set, every API call must carry it (``Authorization: Bearer``, ``X-Token`` or ``?token=``).
        max_upload_mb: the largest image file taken, in MB.
        weights_dir: a folder of weight files offered for ``model.weights`` (default ``<data>/weights``).
        preview_every: steps between live preview images.
    """
    store = jobs.JobStore(Path(data))
    weights = offered_weights(Path(weights_dir) if weights_dir else store.data / "weights")
    limit = int(max_upload_mb * 1e6)
    workers: list[jobs.Worker] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store.recover)
        workers.extend(jobs.device_workers(store))
        for worker in workers:
            worker.start()
        yield
        for worker in workers:
            worker.stop()
        for worker in workers:
            await run_in_threadpool(worker.join, jobs.STOP_WAIT_SECONDS + 10)
        await run_in_threadpool(store.close)  # the runs stopped here resume at the next start; the folder is let go

    app = FastAPI(title="nst-lightning", summary="Neural style transfer jobs: upload, watch, keep.", lifespan=lifespan)
    app.state.store = store
    app.state.workers = workers

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError | UploadError) -> JSONResponse:
        return JSONResponse({"detail": str(err), "key": err.key}, status_code=err.status)

    app.add_exception_handler(UploadError, api_error)
    failures.install(app)  # 503 while the job store cannot be written, 507 for a full disk

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", err))
        return JSONResponse({"detail": message, "key": where or None}, status_code=422)

    @app.middleware("http")
    async def upload_limit(request: Request, call_next: Any) -> Any:
        length = request.headers.get("content-length", "")
        if request.method == "POST" and length.isdigit() and int(length) > limit * (1 + MAX_STYLES) + 1_000_000:
            detail = f"the request is over the upload limit ({1 + MAX_STYLES} images of {max_upload_mb:g} MB)"
            return JSONResponse({"detail": detail, "key": None}, status_code=413)
        return await call_next(request)

    def check_token(request: Request) -> None:
        if token is None:
            return
        given = request.headers.get("x-token") or request.query_params.get("token") or ""
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "this server needs its token: send it as 'Authorization: Bearer TOKEN' or ?token=")

    api = APIRouter(prefix="/api", dependencies=[Depends(check_token)])

    def job_or_404(job_id: str) -> jobs.Job:
        job = store.get(job_id) if jobs.is_job_id(job_id) else None
        if job is None:
            raise ApiError(404, f"no job {job_id!r}: GET /api/jobs lists them")
        return job

    def public(job: jobs.Job) -> dict[str, Any]:
        eta = progress.eta_seconds(progress.read_progress(store.folder(job.id))) if job.state == "running" else None
        return job.public(store.position(job.id), eta)

    @api.get("/options")
    def options() -> dict[str, Any]:
        """What a job may choose: backbones, weights, colour preservation, and the defaults."""
        from nst_lightning.backbones import BACKBONES
        from nst_lightning.checks import PreserveColor

        return {
            "backbones": list(BACKBONES),
            "weights": list(weights),
            "preserve_color": list(PreserveColor.__args__),
            "defaults": defaults(),
            "max_upload_mb": max_upload_mb,
            "max_styles": MAX_STYLES,
        }

    @api.post("/jobs", status_code=201)
    async def create_job(
        content: UploadFile = File(..., description="the content image"),
        style: list[UploadFile] = File(..., description="one or more style images"),
        settings_json: str | None = Form(None, alias="settings", description="config keys as JSON"),
    ) -> dict[str, str]:
        """Queues a job: the content image, one or more style images, and settings as config keys."""
        if len(style) > MAX_STYLES:
            raise ApiError(422, f"{len(style)} style images: send at most {MAX_STYLES}", "style")
        try:
            chosen = json.loads(settings_json) if settings_json else {}
        except ValueError as err:
            raise ApiError(
                422, f"settings is not valid JSON ({err}): send an object of config keys", "settings"
            ) from None
        try:
            arguments = settings.settings_arguments(chosen, weights)
        except settings.SettingsError as err:
            raise ApiError(422, str(err), err.key) from None
        job_id = jobs.new_job_id()
        folder = store.folder(job_id)
        folder.mkdir(parents=True)
        try:
            content_path = await save_upload(content, folder / "content", "content", limit)
            styles = []
            for index, upload in enumerate(style):
                label = f"style {index + 1} ({display_name(upload.filename)})"
                styles.append(await save_upload(upload, folder / f"style_{index}", label, limit))
            fit = settings.fit_arguments(folder, content_path, styles, arguments, preview_every)
            try:
                parsed = await run_in_threadpool(settings.validate, fit)
            except settings.SettingsError as err:
                raise ApiError(422, str(err).replace(str(folder) + os.sep, ""), err.key) from None
            names = {
                "content": display_name(content.filename),
                "styles": [display_name(upload.filename) for upload in style],
                "files": {"content": content_path.name, "styles": [path.name for path in styles]},
            }
            shown = {**settings.flatten(chosen), "data.image_size": parsed["data"]["image_size"],
                     "trainer.max_steps": parsed["max_steps"]}  # fmt: skip
            for key in ("style_weight", "preserve_color", "backbone", "weights"):
                shown.setdefault(f"model.{key}", parsed["model"][key])
            if shown["model.weights"] not in weights:  # a file of the server's: shown by its name
                shown["model.weights"] = Path(str(shown["model.weights"])).name
            store.add(job_id, fit, shown, names, parsed["max_steps"])
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return {"id": job_id}

    @api.get("/jobs")
    def list_jobs() -> list[dict[str, Any]]:
        """Every job, newest first."""
        everything = store.all()
        queued = [job.id for job in reversed(everything) if job.state == "queued"]  # oldest first
        positions = {job_id: index + 1 for index, job_id in enumerate(queued)}
        shown = []
        for job in everything:
            position = 0 if job.state == "running" else positions.get(job.id)
            eta = None
            if job.state == "running":
                eta = progress.eta_seconds(progress.read_progress(store.folder(job.id)))
            shown.append(job.public(position, eta))
        return shown

    @api.get("/jobs/{job_id}")
    def get_job(job_id: str) -> dict[str, Any]:
        """One job: state (queued, running, done, failed, cancelled), step, max_steps, loss, position, error."""
        return public(job_or_404(job_id))

    @api.get("/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events: ``state`` (the job, when it changes), ``progress`` (new steps and losses, the ETA),
        ``preview`` (a new preview image); the stream ends once the job has finished."""
        await run_in_threadpool(job_or_404, job_id)
        folder = store.folder(job_id)

        async def stream() -> AsyncIterator[str]:
            state, sent_steps, sent_previews = None, 0, 0
            while not await request.is_disconnected():
                job = await run_in_threadpool(store.get, job_id)
                if job is None:
                    yield _event("state", {"id": job_id, "state": "deleted"})
                    return
                records = await run_in_threadpool(progress.read_progress, folder)
                steps = [r for r in records if "step" in r]
                previews = [r for r in records if "preview" in r]
                if len(steps) > sent_steps:
                    last = steps[-1]
                    losses = [[r["step"], r.get("loss")] for r in steps[sent_steps:]]
                    yield _event("progress", {
                        "step": last["step"], "max_steps": last["max_steps"], "loss": last.get("loss"),
                        "eta_s": progress.eta_seconds(records), "losses": losses,
                    })  # fmt: skip
                    sent_steps = len(steps)
                if len(previews) > sent_previews:
                    sent_previews = len(previews)
                    yield _event("preview", {"step": previews[-1]["preview"]})
                if job.state != state:
                    state = job.state
                    yield _event("state", await run_in_threadpool(public, job))
                if job.state in jobs.FINISHED:
                    return
                await asyncio.sleep(EVENT_POLL_SECONDS)

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(progress.with_keepalive(stream()), media_type="text/event-stream", headers=headers)

    def image(job_id: str, names: tuple[str, ...], what: str, download: str | None = None) -> FileResponse:
        job = job_or_404(job_id)
        for name in names:
            path = store.folder(job_id) / name
            if path.is_file():
                return FileResponse(path, media_type="image/png", filename=download,
                                    headers={"Cache-Control": "no-store"})  # fmt: skip
        raise ApiError(404, f"no {what} yet: the job is {job.state}")

    @api.get("/jobs/{job_id}/preview", response_class=Response)
    def preview(job_id: str) -> Response:
        """The latest image of the run (PNG)."""
        job = job_or_404(job_id)
        try:  # read whole: the run replaces the file (atomically) while it goes on
            data = (store.folder(job_id) / PREVIEW_FILE).read_bytes()
        except OSError:
            raise ApiError(404, f"no preview yet: the job is {job.state}") from None
        return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})

    @api.get("/jobs/{job_id}/result", response_class=FileResponse)
    def result(job_id: str, partial: bool = False) -> FileResponse:
        """The finished image (PNG); ``?partial=true`` also gives a cancelled or failed run's last image."""
        names = (jobs.RESULT_FILE, jobs.PARTIAL_FILE) if partial else (jobs.RESULT_FILE,)
        return image(job_id, names, "result", download=f"nst-{job_id[:8]}.png")

    @api.get("/jobs/{job_id}/inputs/{name}", response_class=FileResponse)
    def job_input(job_id: str, name: str) -> FileResponse:
        """An input of the job as uploaded: ``content``, or ``style0``, ``style1``... (for "run again")."""
        job = job_or_404(job_id)
        files = job.names.get("files", {})
        found = re.fullmatch(r"style(\d+)", name)
        if name == "content":
            stored = files.get("content")
        elif found and int(found.group(1)) < len(files.get("styles", [])):
            stored = files["styles"][int(found.group(1))]
        else:
            raise ApiError(404, f"no input {name!r}: content, style0, style1...")
        return FileResponse(store.folder(job_id) / stored)

    @api.post("/jobs/{job_id}/cancel")
    def cancel(job_id: str) -> dict[str, Any]:
        """Cancels a queued job, or stops a running one (it keeps its last image as the preview)."""
        job_or_404(job_id)
        store.cancel(job_id)
        return public(job_or_404(job_id))

    @api.delete("/jobs/{job_id}")
    def delete(job_id: str) -> dict[str, str]:
        """Removes a job and its files (a running job is stopped first)."""
        job = job_or_404(job_id)
        if job.state in ("queued", "running"):
            store.cancel(job_id)
            deadline = time.monotonic() + jobs.STOP_WAIT_SECONDS
            while (now := store.get(job_id)) is not None and now.state not in jobs.FINISHED:
                if time.monotonic() > deadline:
                    raise ApiError(409, "the job's run did not stop in time: try again in a minute")
                time.sleep(jobs.POLL_SECONDS)
        store.remove(job_id)
        shutil.rmtree(store.folder(job_id), ignore_errors=True)
        return {"deleted": job_id}

    app.include_router(api)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
