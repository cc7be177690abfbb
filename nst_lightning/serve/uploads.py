"""Uploads: each image checked by its content with the command line's image checks, stored under a name of the
server's (a user's file name is only ever shown)."""

from __future__ import annotations

import os
from pathlib import Path

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from nst_lightning.errors import ImageError, NSTError
from nst_lightning.files import atomic_write

# What Pillow calls the formats kept as uploaded; any other readable image is stored as PNG.
KEPT_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}


class UploadError(NSTError):
    """An upload refused: the API answers ``status`` with the message and the form field (``key``)."""

    def __init__(self, status: int, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.key = key


def display_name(name: str | None) -> str:
    """A user's file name as text to show (never used as a path)."""
    text = "".join(ch for ch in (name or "") if ch.isprintable())[:200]
    return text or "image"


def check_image(path: Path, label: str) -> str:
    """Decodes an upload with the command line's checks (type, size, decompression bombs); returns the
    extension it is stored with. Raises :class:`UploadError` (422) with the check's message."""
    from PIL import Image

    from nst_lightning.image_io import open_rgb

    try:
        image = open_rgb(path)
        with Image.open(path) as opened:
            kind = opened.format
    except ImageError as err:
        raise UploadError(422, str(err).replace(str(path), label), label.split(" ")[0]) from None
    if kind in KEPT_FORMATS:
        return KEPT_FORMATS[kind]
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))
    return ".png"


async def save_upload(upload: UploadFile, stem: Path, label: str, limit: int) -> Path:
    """The upload, checked, as ``stem`` plus the extension of its format (by content, never by its name)."""
    partial = stem.with_suffix(".upload")
    size = 0
    with open(partial, "wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise UploadError(413, f"{label} is over the upload limit of {limit / 1e6:g} MB: send a smaller image")
            out.write(chunk)
    if size == 0:
        raise UploadError(422, f"{label} is empty: send an image file", label.split(" ")[0])
    suffix = await run_in_threadpool(check_image, partial, label)
    path = stem.with_suffix(suffix)
    os.replace(partial, path)
    return path
