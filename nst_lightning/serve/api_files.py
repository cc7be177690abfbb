"""The API's routes to a job's images: the live preview, the result, and the inputs as uploaded."""

from __future__ import annotations

import re

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from nst_lightning.serve import jobs
from nst_lightning.serve.deps import ApiError, Server, check_token, job_or_404, server
from nst_lightning.serve.progress import PREVIEW_FILE

router = APIRouter(prefix="/api", dependencies=[Depends(check_token)])


def _image(state: Server, job_id: str, names: tuple[str, ...], what: str, download: str | None) -> FileResponse:
    job = job_or_404(state, job_id)
    for name in names:
        path = state.store.folder(job_id) / name
        if path.is_file():
            return FileResponse(path, media_type="image/png", filename=download, headers={"Cache-Control": "no-store"})
    raise ApiError(404, f"no {what} yet: the job is {job.state}")


@router.get("/jobs/{job_id}/preview", response_class=Response)
def preview(job_id: str, state: Server = Depends(server)) -> Response:
    """The latest image of the run (PNG)."""
    job = job_or_404(state, job_id)
    try:  # read whole: the run replaces the file (atomically) while it goes on
        data = (state.store.folder(job_id) / PREVIEW_FILE).read_bytes()
    except OSError:
        raise ApiError(404, f"no preview yet: the job is {job.state}") from None
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}/result", response_class=FileResponse)
def result(job_id: str, partial: bool = False, state: Server = Depends(server)) -> FileResponse:
    """The finished image (PNG); ``?partial=true`` also gives a cancelled or failed run's last image."""
    names = (jobs.RESULT_FILE, jobs.PARTIAL_FILE) if partial else (jobs.RESULT_FILE,)
    return _image(state, job_id, names, "result", download=f"nst-{job_id[:8]}.png")


@router.get("/jobs/{job_id}/inputs/{name}", response_class=FileResponse)
def job_input(job_id: str, name: str, state: Server = Depends(server)) -> FileResponse:
    """An input of the job as uploaded: ``content``, or ``style0``, ``style1``... (for "run again")."""
    job = job_or_404(state, job_id)
    files = job.names.get("files", {})
    found = re.fullmatch(r"style(\d+)", name)
    if name == "content":
        stored = files.get("content")
    elif found and int(found.group(1)) < len(files.get("styles", [])):
        stored = files["styles"][int(found.group(1))]
    else:
        raise ApiError(404, f"no input {name!r}: content, style0, style1...")
    return FileResponse(state.store.folder(job_id) / stored)
