"""Uploads: each image checked by its content with the command line's image checks, stored under a name of the
server's (a user's file name is only ever shown). Decoding is bounded: a few uploads at a time (as many as the
memory holds at the largest image allowed), a JPEG at the scale the job needs, and the memory handed back after."""

from __future__ import annotations

import asyncio
import ctypes
import os
import sys
from pathlib import Path

from fastapi import UploadFile
from starlette.concurrency import run_in_threadpool

from nst_lightning.errors import ImageError
from nst_lightning.io.files import atomic_write
from nst_lightning.serve.deps import ApiError

# What Pillow calls the formats kept as uploaded; any other readable image is stored as PNG.
KEPT_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "BMP": ".bmp", "TIFF": ".tif", "GIF": ".gif"}
MAX_DECODES = 4
DECODE_BYTES_PER_PIXEL = 8  # the decoded image (up to 4 bytes a pixel) and its RGB copy


def display_name(name: str | None) -> str:
    """A user's file name as text to show (never used as a path)."""
    text = "".join(ch for ch in (name or "") if ch.isprintable())[:200]
    return text or "image"


def decode_slots(available: int | None = None) -> int:
    """How many uploads may be decoded at once: half the memory available over what the largest image allowed
    (``NST_MAX_IMAGE_PIXELS``) takes decoded; at least 1, at most :data:`MAX_DECODES`."""
    from nst_lightning.io.image_io import max_image_pixels
    from nst_lightning.run.runtime import available_bytes

    available = available if available is not None else available_bytes("cpu")
    try:
        pixels = max_image_pixels() or 10**9
    except ImageError:
        pixels = 10**9
    if available is None:
        return 1
    return max(1, min(MAX_DECODES, available // 2 // (pixels * DECODE_BYTES_PER_PIXEL)))


def _release_memory() -> None:
    """Hands the freed memory of a decode back to the system (glibc keeps large freed blocks otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None).malloc_trim(0)
        except (OSError, AttributeError):
            pass


def check_image(path: Path, label: str, draft: int | None = None) -> str:
    """Decodes an upload with the command line's checks (type, size, decompression bombs); returns the
    extension it is stored with. Raises :class:`ApiError` (422) with the check's message. With ``draft``
    (the longest side the job uses), a format kept as uploaded is decoded at the smallest scale that keeps it."""
    from PIL import Image

    from nst_lightning.io.image_io import open_rgb

    image = None
    try:
        with Image.open(path) as opened:
            kind = opened.format
    except Exception:  # noqa: BLE001 - whatever Pillow raises on a file it cannot read: open_rgb says it below
        kind = None
    try:
        image = open_rgb(path, draft=draft if kind in KEPT_FORMATS else None)
        if kind in KEPT_FORMATS:
            return KEPT_FORMATS[kind]
        atomic_write(path, lambda handle: image.save(handle, format="PNG"))
        return ".png"
    except ImageError as err:
        raise ApiError(422, str(err).replace(str(path), label), label.split(" ")[0]) from None
    finally:
        image = None  # before the memory is handed back
        _release_memory()


async def save_upload(
    upload: UploadFile, stem: Path, label: str, limit: int, decodes: asyncio.Semaphore, draft: int | None = None
) -> Path:
    """The upload, checked, as ``stem`` plus the extension of its format (by content, never by its name); its
    decode waits for one of ``decodes``."""
    partial = stem.with_suffix(".upload")
    size = 0
    with open(partial, "wb") as out:
        while chunk := await upload.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"{label} is over the upload limit of {limit / 1e6:g} MB: send a smaller image")
            out.write(chunk)
    if size == 0:
        raise ApiError(422, f"{label} is empty: send an image file", label.split(" ")[0])
    async with decodes:
        suffix = await run_in_threadpool(check_image, partial, label, draft)
    path = stem.with_suffix(suffix)
    os.replace(partial, path)
    return path
