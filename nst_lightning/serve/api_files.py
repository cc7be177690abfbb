"""The API's routes to a job's images: the live preview, the result, and the inputs as uploaded."""

from __future__ import annotations

import re
import unicodedata

from fastapi import APIRouter, Depends
from fastapi.responses import FileResponse, Response

from nst_lightning.serve import jobs
from nst_lightning.serve.deps import ApiError, Server, check_token, job_or_404, server
from nst_lightning.serve.progress import PREVIEW_FILE

router = APIRouter(prefix="/api", dependencies=[Depends(check_token)])


def _stem(name: str) -> str:
    """A user's file name as a safe part of a download's name: the stem of its last part, in ASCII letters,
    digits, ``_`` and ``-`` (anything else a ``-``), at most 60 characters; ``image`` if nothing is left."""
    last = name.replace("\\", "/").rsplit("/", 1)[-1]
    stem = last.rsplit(".", 1)[0] if "." in last.strip(".") else last
    ascii_ = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    return re.sub(r"-+", "-", re.sub(r"[^A-Za-z0-9_-]", "-", ascii_)).strip("-_")[:60].strip("-_") or "image"


def download_name(job: jobs.Job, partial: bool = False) -> str:
    """``photo-x-painting.png`` (several paintings joined by ``+``), ``-partial`` before the suffix for a
    stopped run's image: named after the job's uploads as the user named them, sanitised."""
    names = job.names or {}
    styles = "+".join(_stem(str(name)) for name in names.get("styles", [])[:3]) or "style"
    return f"{_stem(str(names.get('content', 'photo')))}-x-{styles}{'-partial' if partial else ''}.png"


def _image(state: Server, job_id: str, names: tuple[str, ...], what: str, download: str | None) -> FileResponse:
    job = job_or_404(state, job_id)
    for name in names:
        path = state.store.folder(job_id) / name
        if path.is_file():
            return FileResponse(path, media_type="image/png", filename=download, headers={"Cache-Control": "no-store"})
    raise ApiError(404, f"no {what} yet: the job is {job.state}")


# Each image route answers HEAD too: the headers alone (type, size).
@router.get("/jobs/{job_id}/preview", response_class=Response)
@router.head("/jobs/{job_id}/preview", response_class=Response, include_in_schema=False)
def preview(job_id: str, state: Server = Depends(server)) -> Response:
    """The latest image of the run (PNG)."""
    job = job_or_404(state, job_id)
    try:  # read whole: the run replaces the file (atomically) while it goes on
        data = (state.store.folder(job_id) / PREVIEW_FILE).read_bytes()
    except OSError:
        raise ApiError(404, f"no preview yet: the job is {job.state}") from None
    return Response(data, media_type="image/png", headers={"Cache-Control": "no-store"})


@router.get("/jobs/{job_id}/result", response_class=FileResponse)
@router.head("/jobs/{job_id}/result", response_class=FileResponse, include_in_schema=False)
def result(job_id: str, partial: bool = False, state: Server = Depends(server)) -> FileResponse:
    """The finished image (PNG); ``?partial=true`` also gives a cancelled or failed run's last image."""
    job = job_or_404(state, job_id)
    finished = (state.store.folder(job_id) / jobs.RESULT_FILE).is_file()
    names = (jobs.RESULT_FILE, jobs.PARTIAL_FILE) if partial else (jobs.RESULT_FILE,)
    return _image(state, job_id, names, "result", download=download_name(job, partial and not finished))


@router.get("/jobs/{job_id}/inputs/{name}", response_class=FileResponse)
@router.head("/jobs/{job_id}/inputs/{name}", response_class=FileResponse, include_in_schema=False)
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
