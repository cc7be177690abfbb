"""The API's routes over the jobs there are: list, one job, its event stream, cancel, delete."""

from __future__ import annotations

import functools
import shutil
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from nst_lightning.serve import jobs, progress
from nst_lightning.serve.deps import ApiError, Server, check_token, job_or_404, public, server

EVENT_POLL_SECONDS = 0.25

router = APIRouter(prefix="/api", dependencies=[Depends(check_token)])


@router.get("/jobs")
def list_jobs(state: Server = Depends(server)) -> list[dict[str, Any]]:
    """Every job, newest first."""
    everything = state.store.all()
    queued = [job.id for job in reversed(everything) if job.state == "queued"]  # oldest first
    positions = {job_id: index + 1 for index, job_id in enumerate(queued)}
    shown = []
    for job in everything:
        position = 0 if job.state == "running" else positions.get(job.id)
        eta = None
        if job.state == "running":
            eta = progress.eta_seconds(progress.read_progress(state.store.folder(job.id)))
        shown.append(state.public(job, position, eta))
    return shown


@router.get("/jobs/{job_id}")
def get_job(job_id: str, state: Server = Depends(server)) -> dict[str, Any]:
    """One job: state (queued, running, done, failed, cancelled), step, max_steps, loss, position, error."""
    return public(state, job_or_404(state, job_id))


@router.get("/jobs/{job_id}/events")
async def job_events(job_id: str, request: Request, state: Server = Depends(server)) -> StreamingResponse:
    """Server-Sent Events: ``state`` (the job, when it changes), ``progress`` (new steps and losses, the ETA),
    ``preview`` (a new preview image); the stream ends once the job has finished."""
    await run_in_threadpool(job_or_404, state, job_id)
    store = state.store

    latest: list[jobs.Job] = []  # the job as last read

    async def state_of() -> str | None:
        job = await run_in_threadpool(store.get, job_id)
        latest[:] = [job] if job is not None else []
        return None if job is None else job.state

    async def shown() -> dict[str, Any]:
        return await run_in_threadpool(public, state, latest[0])

    read = functools.partial(progress.read_progress, store.folder(job_id))
    stream = progress.job_events(
        job_id, read, state_of, shown, jobs.FINISHED, request.is_disconnected, EVENT_POLL_SECONDS
    )
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(progress.with_keepalive(stream), media_type="text/event-stream", headers=headers)


@router.post("/jobs/{job_id}/cancel")
def cancel(job_id: str, state: Server = Depends(server)) -> dict[str, Any]:
    """Cancels a queued job, or stops a running one (it keeps its last image as the preview)."""
    job_or_404(state, job_id)
    state.store.cancel(job_id)
    return public(state, job_or_404(state, job_id))


@router.delete("/jobs/{job_id}")
def delete(job_id: str, state: Server = Depends(server)) -> dict[str, str]:
    """Removes a job and its files (a running job is stopped first)."""
    store = state.store
    job = job_or_404(state, job_id)
    if job.state in ("queued", "running"):
        store.cancel(job_id)
        deadline = time.monotonic() + jobs.STOP_WAIT_SECONDS
        while (now := store.get(job_id)) is not None and now.state not in jobs.FINISHED:
            if time.monotonic() > deadline:
                raise ApiError(409, "the job's run did not stop in time: try again in a minute")
            time.sleep(jobs.POLL_SECONDS)
    try:  # the files first: a job whose files could not go is kept (and named), not left behind unlisted
        shutil.rmtree(store.folder(job_id))
    except FileNotFoundError:
        pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        detail = f"the job's files could not be deleted ({reason}): the job is kept; try again later"
        raise ApiError(503, detail) from None
    store.remove(job_id)
    return {"deleted": job_id}
