"""What the API's routes share: the one error class the API answers with, the server's settings (on
``app.state.server``), and the dependencies that check the token and find a job."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from nst_lightning.errors import NSTError
from nst_lightning.serve import jobs, progress
from nst_lightning.serve.guards import Scrubber
from nst_lightning.serve.weights import Offer

MAX_STYLES = 8
PREVIEW_EVERY = 5


class ApiError(NSTError):
    """An error the API answers with ``status`` and ``{"detail": message, "key": key}`` (``key``: the setting or
    form field at fault, or None). The message never names a server path (see :class:`Scrubber`)."""

    def __init__(self, status: int, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.key = key


@dataclass
class Server:
    """The settings of one app, shared by its routes as ``request.app.state.server``."""

    store: jobs.JobStore
    weights: dict[str, str]
    """The ``model.weights`` a job may pick, by name, mapped to what the run gets."""
    token: str | None = None
    max_upload_mb: float = 25.0
    preview_every: int = PREVIEW_EVERY
    scrubber: Scrubber = field(default_factory=Scrubber)
    offer: Offer = field(default_factory=Offer)
    """The weights offered, with the backbones each loads with."""
    workers: list[jobs.Worker] = field(default_factory=list)

    @property
    def limit(self) -> int:
        """The largest upload, in bytes."""
        return int(self.max_upload_mb * 1e6)

    def public(self, job: jobs.Job, position: int | None = None, eta: float | None = None) -> dict[str, Any]:
        """The job as the API's JSON: its error and note without server paths."""
        shown = job.public(position, eta)
        for key in ("error", "note"):
            if shown[key]:
                shown[key] = self.scrubber.scrub(shown[key], self.store.folder(job.id))
        return shown


def server(request: Request) -> Server:
    """The app's :class:`Server` (a FastAPI dependency)."""
    return request.app.state.server


def check_token(request: Request) -> None:
    """Refuses an API call without the server's token (when it has one), whatever the method."""
    token = server(request).token
    if token is None:
        return
    given = request.headers.get("x-token") or request.query_params.get("token") or ""
    auth = request.headers.get("authorization", "")
    if auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ApiError(401, "this server needs its token: send it as 'Authorization: Bearer TOKEN' or ?token=")


def job_or_404(state: Server, job_id: str) -> jobs.Job:
    job = state.store.get(job_id) if jobs.is_job_id(job_id) else None
    if job is None:
        raise ApiError(404, f"no job {job_id!r}: GET /api/jobs lists them")
    return job


def public(state: Server, job: jobs.Job) -> dict[str, Any]:
    """One job as the API shows it, with its place in the queue and, while it runs, its ETA."""
    store = state.store
    eta = progress.eta_seconds(progress.read_progress(store.folder(job.id))) if job.state == "running" else None
    return state.public(job, store.position(job.id), eta)
