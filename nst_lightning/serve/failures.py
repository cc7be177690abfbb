"""The API's answers when the server's own storage fails: 503 while the job store cannot be written (locked by
another program, a read-only disk), 507 when the disk is full. One JSON error, never a server path."""

from __future__ import annotations

import errno

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException  # what FastAPI raises for a body it cannot parse

from nst_lightning.serve.store import StoreUnavailable

DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # EFBIG: a file-size limit, which fills like a disk
READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)
RETRY_AFTER_SECONDS = 5


def install(app: FastAPI) -> None:
    """Adds the handlers of :class:`~nst_lightning.serve.store.StoreUnavailable` and ``OSError`` to ``app``, and
    one for FastAPI's 400 "error parsing the body" where the cause is an upload's spool file meeting a full disk."""

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, err: StoreUnavailable) -> JSONResponse:
        detail = f"{err}: try again in a moment"
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        return JSONResponse({"detail": detail, "key": None}, status_code=503, headers=headers)

    @app.exception_handler(OSError)
    async def storage_failed(request: Request, err: OSError) -> JSONResponse:
        reason = err.strerror or type(err).__name__  # never str(err): it names the server's file
        if err.errno in DISK_FULL:
            detail = f"the server's disk has no room for this ({reason}): nothing was kept; try again once it has"
            return JSONResponse({"detail": detail, "key": None}, status_code=507)
        if err.errno in READ_ONLY:
            detail = f"the server cannot write its data folder ({reason}): nothing was kept; try again later"
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)}
            return JSONResponse({"detail": detail, "key": None}, status_code=503, headers=headers)
        detail = f"the server could not read or write its files ({reason})"
        return JSONResponse({"detail": detail, "key": None}, status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        if isinstance(err.__cause__, OSError):  # the form's files are spooled to the temporary folder: it was full
            return await storage_failed(request, err.__cause__)
        return await http_exception_handler(request, err)
