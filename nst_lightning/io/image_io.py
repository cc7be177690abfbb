"""Images in and out: the only Pillow code. Reads (pixel limit, orientation, colour profile, mode) to
float tensors, resizes, and writes images atomically (through :mod:`nst_lightning.io.files`)."""

from __future__ import annotations

import contextlib
import io
import os
import re
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from nst_lightning.errors import ImageError, NSTError
from nst_lightning.io.files import (
    atomic_write,
    check_image_file,
    check_replaceable,
    check_writable_dir,
    find_images,
    new_folder_in,
)

RGBImage = Image.Image
"""A decoded image (Pillow's), as :func:`open_rgb` returns it: what the data module keeps between sizes."""

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


# Environment variable that raises (or lowers) the largest image, in pixels, that is opened.
MAX_PIXELS_ENV = "NST_MAX_IMAGE_PIXELS"


# Pillow's own decompression-bomb limit (89,478,485 pixels), read once at import, before anyone changes it.
_PILLOW_MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited over white."""
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img, dtype=np.float64)
        # 16-bit greyscale PNGs open as I;16 or I; plain 8-bit data stored as I stays as it is.
        peak = 65535.0 if (img.mode != "I" or values.max(initial=0) > 255) else 255.0
        img = Image.fromarray(np.clip(values / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(values * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB") if img.mode != "RGB" else img


# ICC colour spaces and the Pillow modes an image in that space has.
_ICC_MODES = {"RGB": ("RGB", "RGBA"), "GRAY": ("L", "LA"), "CMYK": ("CMYK",)}


def _to_srgb(img: Image.Image, icc: bytes | None, path: Path) -> Image.Image:
    """Convert an image with an embedded ICC profile (Display P3, Adobe RGB, a CMYK press profile...)
    to sRGB, the colour space that the written images and the network's ImageNet statistics assume.

    Alpha is kept aside and put back. A profile for another colour space than the image's (say a grey
    profile on a 16-bit image) is left alone; one that cannot be parsed is ignored with a warning.
    """
    if not icc:
        return img
    try:
        from PIL import ImageCms  # Pillow's LittleCMS binding; present in Pillow's wheels

        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        if img.mode not in _ICC_MODES.get(profile.profile.xcolor_space.strip(), ()):
            return img
        alpha = img.getchannel("A") if img.mode in ("RGBA", "LA") else None
        colour = img.convert(img.mode[:-1]) if alpha is not None else img
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        converted = ImageCms.profileToProfile(colour, profile, srgb, outputMode="RGB")
        if alpha is not None:
            converted.putalpha(alpha)
        return converted
    except (ImportError, OSError, ValueError, TypeError) as err:  # ImageCms.PyCMSError is an OSError
        warnings.warn(f"{path}: ignoring its ICC colour profile, which cannot be used ({err})", stacklevel=3)
        return img


def max_image_pixels() -> int | None:
    """The largest image (width x height) that is opened: ``$NST_MAX_IMAGE_PIXELS`` or Pillow's limit."""
    value = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not value:
        return _PILLOW_MAX_IMAGE_PIXELS
    try:
        limit = int(float(value))
    except ValueError:
        limit = 0
    if limit < 1:
        raise ImageError(
            f"{MAX_PIXELS_ENV}={value!r} is not a number of pixels: set it to an integer such as 200000000"
        )
    return limit


@contextlib.contextmanager
def _pixel_limit(limit: int | None) -> Iterator[None]:
    """Pillow's decompression-bomb check, at ``limit`` pixels, for the duration of one read."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below instead
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _too_large(path: Path, width: int, height: int, limit: int) -> ImageError:
    return ImageError(
        f"{path} is {width}x{height} = {width * height:,} pixels, over the limit of {limit:,} that guards against "
        f"decompression bombs: downscale the image, or if you trust the file set the environment variable "
        f"{MAX_PIXELS_ENV}={width * height} (or more)"
    )


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)``, lazily (the header only), for a regular file within the pixel limit; any
    problem, inside the block too, is an :class:`ImageError` of one line."""
    check_image_file(path)
    limit = max_image_pixels()
    try:
        with _pixel_limit(limit), Image.open(path) as img:
            width, height = img.size
            if limit is not None and width * height > limit:
                raise _too_large(path, width, height, limit)
            if width < 1 or height < 1:
                raise ImageError(f"{path} is {width}x{height} pixels: an image needs at least one pixel")
            yield img
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        # Pillow's own check, at twice the limit, fires inside open() before the size check above.
        found = re.search(r"\((\d+) pixels\)", str(err))
        pixels = int(found.group(1)) if found else None
        size = f"{pixels:,} pixels, " if pixels else ""
        raise ImageError(
            f"{path} is {size}over the limit of {limit or 0:,} that guards against decompression bombs: downscale "
            f"the image, or if you trust the file set the environment variable {MAX_PIXELS_ENV}={pixels or 'N'} "
            "(or more)"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read: give a PNG, JPEG or other image file") from None
    except MemoryError:
        raise ImageError(f"not enough memory to decode {path}: downscale the image first") from None
    except Exception as err:  # noqa: BLE001 - corrupt files raise anything from OSError to struct.error
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ImageError(f"cannot read image {path}: {detail} (is the file complete and a valid image?)") from None


def open_rgb(path: str | os.PathLike, draft: int | None = None) -> Image.Image:
    """Read an image file as an upright 8-bit sRGB Pillow image.

    EXIF orientation is applied; an embedded ICC profile is converted to sRGB; greyscale, palette,
    alpha, CMYK and 16-bit images are converted; for an animated file the first frame is used (with a
    warning). Only regular files are opened (a FIFO or a device is refused before it can block).
    Images over :func:`max_image_pixels` are refused before they are decoded (decompression bombs).
    Any file Pillow cannot decode gives an :class:`ImageError`. With ``draft``, a format that can decode at a
    reduced scale (JPEG) does, keeping at least ``draft`` pixels on each side (less memory for a large file).
    """
    path = Path(path)
    with _opened(path) as img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            warnings.warn(f"{path} is animated ({frames} frames): using the first frame", stacklevel=2)
            img.seek(0)
        if draft is not None:
            img.draft(img.mode, (draft, draft))
        img.load()
        icc = img.info.get("icc_profile")
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return _to_rgb(_to_srgb(img, icc, path))


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it (a quick look before
    anything is allocated); as stored, so an EXIF rotation may swap the two, which changes neither
    the pixel count nor the longest side. Errors as :func:`open_rgb`."""
    with _opened(Path(path)) as img:
        return img.size


def fit_size(width: int, height: int, longest_side: int) -> tuple[int, int]:
    """(width, height) scaled so that the longest side is ``longest_side``, keeping the aspect ratio."""
    scale = longest_side / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def open_mask(path: str | os.PathLike) -> Image.Image:
    """Read a mask image as 8-bit greyscale (white: 1, black: 0); colour masks use their luminance."""
    return open_rgb(path).convert("L")


def pil_to_float(img: Image.Image) -> torch.Tensor:
    """A Pillow image as a contiguous float tensor (1, C, H, W) in [0, 1]."""
    return pil_to_tensor(img).unsqueeze(0).float().div_(255.0).contiguous()


def load_image(path: str | os.PathLike, longest_side: int | None = None) -> torch.Tensor:
    """Read an image as a float tensor of shape (1, 3, H, W) in [0, 1].

    With ``longest_side``, the image is resized (Lanczos) so its longest side has that many pixels.
    """
    img = open_rgb(path)
    if longest_side is not None and max(img.size) != longest_side:
        img = img.resize(fit_size(*img.size, longest_side), Image.Resampling.LANCZOS)
    return pil_to_float(img)


def load_images(pattern: str | os.PathLike, longest_side: int) -> list[torch.Tensor]:
    """Every image file matching a glob ``pattern`` (sorted by path), each as :func:`load_image` gives it."""
    return [load_image(path, longest_side) for path in find_images(pattern)]


def resized(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """A decoded image at (width, height) ``size`` (Lanczos; as it is when it has that size), as a float tensor."""
    return pil_to_float(img if img.size == size else img.resize(size, Image.Resampling.LANCZOS))


def image_format(path: str | os.PathLike) -> str:
    """Pillow's format name for a file name's extension; an :class:`ImageError` for an unknown one."""
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ImageError(f"cannot tell the image format of {path}: end the file name in .png, .jpg, .webp or .tif")
    return fmt


def check_writable(path: str | os.PathLike) -> Path:
    """Make sure an image can be written at ``path`` before any work starts: a known image format, not
    a folder or special file, and a folder (created if missing) where files can be made. Raises
    :class:`ImageError` with the reason otherwise. Returns the path."""
    path = Path(path)
    image_format(path)
    check_replaceable(path, "output")
    check_writable_dir(path.parent, "", "choose a writable output path")
    return path


def estimate_image_bytes(width: int, height: int, path: str | os.PathLike = "image.png") -> int:
    """An upper bound on the size of an 8-bit RGB image file: the raw pixels (what PNG's deflate
    gives for noise, and TIFF stores uncompressed), plus headers; JPEG and WebP come out smaller."""
    image_format(path)
    return height * (3 * width + 1) * 101 // 100 + 4096


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A (1, 3, H, W) or (3, H, W) tensor, clamped to [0, 1], as an 8-bit RGB Pillow image."""
    if image.dim() == 4:
        image = image[0]
    pixels = image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()
    return to_pil_image(pixels, mode="RGB")


def save_image(image: torch.Tensor, path: str | os.PathLike, bit_depth: int = 8) -> Path:
    """Write an image tensor to ``path`` atomically (format from the extension; see :func:`atomic_write`), with 8
    bits per channel, or 16 in a PNG or TIFF (:mod:`nst_lightning.io.image16`).

    The pixels are clamped to the valid range. A failed write (full disk, lost permission) raises an
    :class:`ImageError` and leaves any previous file at ``path`` as it was.
    """
    path = Path(path)
    if bit_depth == 16:
        from nst_lightning.io.image16 import encode16

        data = encode16(image, path)

        def write(handle: typing.BinaryIO) -> None:
            handle.write(data)
    else:
        fmt = image_format(path)
        pil = tensor_to_pil(image)
        options = {"quality": 95} if fmt == "JPEG" else {}

        def write(handle: typing.BinaryIO) -> None:
            pil.save(handle, format=fmt, **options)

    try:
        return atomic_write(path, write)
    except OSError as err:
        raise ImageError(
            f"cannot write image {path}: {err.strerror or err} (free some disk space or choose another "
            "output.path; any previous file there is unchanged)"
        ) from None


def save_image_elsewhere(
    image: torch.Tensor, name: str, folders: Sequence[str | os.PathLike | None], bit_depth: int = 8
) -> Path | None:
    """Write an image that could not go where it should: as ``name`` in a new folder of its own (nothing
    there can be replaced) inside the first of ``folders`` that takes it (None: the system's temporary
    folder). Returns where it went, or None when no folder took it."""
    for folder in folders:
        own = new_folder_in(folder)
        if own is None:
            continue
        try:
            return save_image(image, own / name, bit_depth)
        except NSTError:
            own.rmdir()  # the write left nothing in it (atomic_write removes its temporary file)
    return None
