"""The web app: the page at ``/`` and the JSON API under ``/api`` (FastAPI; OpenAPI page at ``/docs``), put
together from the routers of :mod:`~nst_lightning.serve.api_submit`, :mod:`~nst_lightning.serve.api_jobs` and
:mod:`~nst_lightning.serve.api_files`, behind the walls of :mod:`~nst_lightning.serve.guards`."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from nst_lightning.serve import api_files, api_jobs, api_submit, failures, jobs, settings
from nst_lightning.serve.deps import MAX_STYLES, PREVIEW_EVERY, ApiError, Server
from nst_lightning.serve.guards import BodyLimit, BodyTooLarge, HostOriginGuard, Scrubber
from nst_lightning.serve.uploads import decode_slots
from nst_lightning.serve.weights import offered_weights, warnings_of

STATIC = Path(__file__).resolve().parent / "static"
UPLOAD_LIMIT_MB = 25.0
FORM_BYTES = 1_000_000
"""What a job's form may hold besides its images (the settings, the multipart framing)."""


def create_app(
    data: str | os.PathLike,
    token: str | None = None,
    max_upload_mb: float = UPLOAD_LIMIT_MB,
    weights_dir: str | os.PathLike | None = None,
    preview_every: int = PREVIEW_EVERY,
    allowed_hosts: Iterable[str] | None = None,
) -> FastAPI:
    """The app over the data folder ``data`` (jobs, their files and the SQLite store).

    Args:
        data: the folder of the job store and the jobs' files (made if missing).
        token: when set, every API call must carry it (``Authorization: Bearer``, ``X-Token`` or ``?token=``).
        max_upload_mb: the largest image file taken, in MB.
        weights_dir: a folder of weight files offered for ``model.weights`` (default ``<data>/weights``).
        preview_every: steps between live preview images.
        allowed_hosts: the names the server answers to besides IP addresses and ``localhost`` (``*``: any);
            None (for an app embedded in a server of one's own) checks no ``Host``. ``serve`` always sets it.
    """
    store = jobs.JobStore(Path(data))
    weights_dir = Path(weights_dir) if weights_dir else store.data / "weights"
    offer = offered_weights(weights_dir)
    state = Server(store, offer.paths, token, max_upload_mb, preview_every, Scrubber(store.data, offer.paths), offer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.decodes = asyncio.Semaphore(await run_in_threadpool(decode_slots))
        await run_in_threadpool(settings.known_keys)  # the parser's keys, read once (not in a request)
        await run_in_threadpool(store.recover)
        state.workers.extend(jobs.device_workers(store))
        for worker in state.workers:
            worker.start()
        yield
        for worker in state.workers:
            worker.stop()
        for worker in state.workers:
            await run_in_threadpool(worker.join, jobs.STOP_WAIT_SECONDS + 10)
        await run_in_threadpool(store.close)  # the runs stopped here resume at the next start; the folder is let go

    app = FastAPI(title="nst-lightning", summary="Neural style transfer jobs: upload, watch, keep.", lifespan=lifespan)
    app.state.server = state
    app.state.decodes = asyncio.Semaphore(1)  # until the lifespan sizes it from the memory free
    app.state.weights_warnings = warnings_of(offer, weights_dir)  # serve prints them at its start
    app.state.store = store
    app.state.workers = state.workers

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse({"detail": state.scrubber.scrub(str(err)), "key": err.key}, status_code=err.status)

    failures.install(app)  # 503 while the job store cannot be written, 507 for a full disk

    @app.exception_handler(BodyTooLarge)
    async def too_large(request: Request, err: BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": err.detail, "key": None}, status_code=413)

    @app.exception_handler(RequestValidationError)
    async def request_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path"))
        message = f"{where}: {first.get('msg', 'invalid request')}" if where else str(first.get("msg", err))
        return JSONResponse({"detail": message, "key": where or None}, status_code=422)

    limit = state.limit * (1 + MAX_STYLES) + FORM_BYTES
    app.add_middleware(BodyLimit, limit=limit, what=f"{1 + MAX_STYLES} images of {max_upload_mb:g} MB")
    app.add_middleware(HostOriginGuard, allowed_hosts=allowed_hosts)  # added last: the outermost
    for router in (api_submit.router, api_jobs.router, api_files.router):
        app.include_router(router)

    @app.get("/", include_in_schema=False)
    @app.head("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
