"""The watch server of ``--watch``: the web app's page in its watch mode (one run, no form) and the routes it reads,
over a :class:`~nst_lightning.serve.watch.Hub`, under uvicorn in a thread of the command.

Read-only: every route answers GET and HEAD only (anything else is 405), takes no path or file from the client,
and answers only to this machine's names (a page of another site cannot read it through a rebound DNS name).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from nst_lightning.serve import progress
from nst_lightning.serve.guards import quiet_protocol_faults
from nst_lightning.serve.watch import JOB_ID, Hub, finished_state
from nst_lightning.serve.watch_feed import WatchFeed

STATIC = Path(__file__).parent / "static"
EVENT_POLL_SECONDS = 0.25
STREAMS_WAIT_SECONDS = 1.5
"""How long the end of the command waits for open pages to be told the run's last state."""
STOP_SECONDS = 3.0
"""The longest the end of the command waits for the server to stop."""
FINISHED = ("done", "failed", "cancelled")
GET = ["GET", "HEAD"]
NO_STORE = {"Cache-Control": "no-store"}


def shown(hub: Hub) -> dict[str, Any]:
    """The run as the page's job panel reads a job (``GET /api/jobs/run``): state, step, max_steps, loss, eta_s,
    elapsed_s, names, error."""
    records = hub.records()
    start = next((r for r in reversed(records) if "start" in r), {})
    last = next((r for r in reversed(records) if "step" in r), {})
    return {
        "id": JOB_ID,
        "state": hub.state,
        "step": last.get("step", start.get("start", 0)),
        "max_steps": last.get("max_steps", start.get("max_steps", 0)),
        "loss": last.get("loss"),
        "eta_s": progress.eta_seconds(records) if hub.state == "running" else None,
        "elapsed_s": progress.elapsed_seconds(records),
        "names": hub.names,
        "error": hub.error,
        "note": None,
    }


def _page() -> str:
    """The web app's page in watch mode: app.js reads ``data-watch`` and shows that one run."""
    html = (STATIC / "index.html").read_text(encoding="utf-8")
    return html.replace("<body>", f'<body data-watch="{JOB_ID}">', 1)


def create_watch_app(hub: Hub) -> FastAPI:
    """The watch server's routes over ``hub``."""
    app = FastAPI(title="nst-lightning --watch", openapi_url=None, docs_url=None, redoc_url=None)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=["127.0.0.1", "localhost"])
    page = _page()
    files = {name: (STATIC / name).read_bytes() for name in ("app.js", "style.css")}

    @app.api_route("/", methods=GET, response_class=HTMLResponse)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=NO_STORE)

    @app.api_route("/static/app.js", methods=GET)
    def app_js() -> Response:
        return Response(files["app.js"], media_type="text/javascript", headers=NO_STORE)

    @app.api_route("/static/style.css", methods=GET)
    def style_css() -> Response:
        return Response(files["style.css"], media_type="text/css", headers=NO_STORE)

    @app.api_route(f"/api/jobs/{JOB_ID}", methods=GET)
    def job() -> JSONResponse:
        return JSONResponse(shown(hub), headers=NO_STORE)

    @app.api_route(f"/api/jobs/{JOB_ID}/preview", methods=GET)
    def preview() -> Response:
        image = hub.image()
        if image is None:
            return JSONResponse({"detail": "no image yet"}, status_code=404, headers=NO_STORE)
        return Response(image, media_type="image/png", headers=NO_STORE)

    @app.api_route(f"/api/jobs/{JOB_ID}/events", methods=GET)
    async def events(request: Request) -> StreamingResponse:
        async def state_of() -> str:
            return hub.state

        async def state() -> dict[str, Any]:
            return await asyncio.to_thread(shown, hub)

        async def streamed() -> Any:
            with hub.stream():
                stream = progress.job_events(
                    JOB_ID, hub.records, state_of, state, FINISHED, request.is_disconnected, EVENT_POLL_SECONDS
                )
                async for event in progress.with_keepalive(stream):
                    yield event

        headers = {**NO_STORE, "X-Accel-Buffering": "no"}
        return StreamingResponse(streamed(), media_type="text/event-stream", headers=headers)

    return app


class WatchServer:
    """uvicorn serving :func:`create_watch_app` on ``listener`` in a daemon thread, until :meth:`stop`."""

    def __init__(self, hub: Hub, listener: socket.socket) -> None:
        app = create_watch_app(hub)
        # A client's misbehaviour (a body sent to a read-only route, a connection cut) is the client's business:
        # uvicorn would log it with a traceback on the user's terminal, amid the run's own lines.
        quiet = {"log_config": None, "log_level": "critical", "access_log": False}
        self.server = uvicorn.Server(uvicorn.Config(app, lifespan="off", timeout_graceful_shutdown=1, **quiet))
        quiet_protocol_faults(self.server, logging.getLogger("nst_lightning").debug)  # for --verbose only
        self.listener = listener
        self.thread = threading.Thread(target=self._serve, name="nst-watch", daemon=True)

    def _serve(self) -> None:
        self.server.run(sockets=[self.listener])

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(STOP_SECONDS)
        self.listener.close()


@contextlib.contextmanager
def watching(listener: socket.socket, names: dict[str, Any]) -> Iterator[WatchFeed]:
    """Serves the live page on ``listener`` while the block runs; gives the run's callback (a
    :class:`~nst_lightning.serve.watch_feed.WatchFeed`). The page is told how the command ended, then the server
    stops; the command's exit is unchanged."""
    hub = Hub(names)
    server = WatchServer(hub, listener)
    server.start()
    code: object = 1
    try:
        yield WatchFeed(hub)
        code = 0
    except SystemExit as exit_:
        code = exit_.code
        raise
    finally:
        hub.finish(*finished_state(code))
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C: the command ends at once all the same
            hub.wait_streams(STREAMS_WAIT_SECONDS)
        server.stop()
