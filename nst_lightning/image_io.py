"""All Pillow and filesystem code: read images as RGB tensors, write files atomically."""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import io
import os
import re
import shutil
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from nst_lightning.errors import ImageError

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# What a folder or a glob pattern contributes to a batch (a file named directly is taken as it is).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
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


# What a path that is not a regular file is, by ``stat`` file type (for the messages).
_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO), which would block a reader until something writes to it"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(path: str | os.PathLike) -> str:
    """What ``path`` is, from ``os.stat`` alone (nothing is opened, so a FIFO cannot block):
    ``"file"`` (a regular file, or a link to one), ``"folder"``, ``"missing"`` (also a dangling
    link), or a description such as ``"a named pipe (FIFO), ..."``, ``"a character device"`` or
    ``"a symbolic link loop"``. Only a ``"file"`` is ever read or replaced."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, ValueError):  # ValueError: a NUL byte, which no file name has
        return "missing"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a symbolic link loop (a link that points back to itself)"
        if err.errno == errno.ENOTDIR:
            return "missing"
        return f"not accessible ({err.strerror or err})"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "folder"
    for test, kind in _SPECIAL_KINDS:
        if test(mode):
            return kind
    return "a special file"


@contextlib.contextmanager
def _opened(path: Path) -> Iterator[Image.Image]:
    """``Image.open(path)``, lazily (the header only), for a regular file within the pixel limit; any
    problem, inside the block too, is an :class:`ImageError` of one line."""
    kind = file_kind(path)
    if kind == "missing":
        raise ImageError(f"image not found: {path} (check the path in data.content / data.style)")
    if kind == "folder":
        raise ImageError(f"{path} is a folder, not an image file: give the path of an image file")
    if kind != "file":
        raise ImageError(f"{path} is {kind}, not an image file: give the path of a regular image file")
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


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an upright 8-bit sRGB Pillow image.

    EXIF orientation is applied; an embedded ICC profile is converted to sRGB; greyscale, palette,
    alpha, CMYK and 16-bit images are converted; for an animated file the first frame is used (with a
    warning). Only regular files are opened (a FIFO or a device is refused before it can block).
    Images over :func:`max_image_pixels` are refused before they are decoded (decompression bombs).
    Any file Pillow cannot decode gives an :class:`ImageError`.
    """
    path = Path(path)
    with _opened(path) as img:
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            warnings.warn(f"{path} is animated ({frames} frames): using the first frame", stacklevel=2)
            img.seek(0)
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


def find_images(entry: str | os.PathLike, key: str = "images") -> list[Path]:
    """The image files that one entry of a list stands for, sorted.

    A file is taken as it is; a folder gives the files in it (not in its subfolders) whose extension
    is in :data:`IMAGE_EXTENSIONS`; a glob pattern (``*``, ``?``, ``[...]``; ``**`` spans folders)
    gives the matching files with such an extension. Nothing found is an :class:`ImageError` whose
    message names ``key``, the configuration key the entry came from.
    """
    text = str(entry)
    path = Path(text)
    kind = file_kind(path)
    if kind == "file":
        return [path]
    if kind not in ("folder", "missing"):
        raise ImageError(f"{key}: {path} is {kind}, not an image file: give image files, folders or glob patterns")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not found:
            raise ImageError(
                f"{key}: the folder {path} holds no image files ({' '.join(IMAGE_EXTENSIONS)}): "
                "check the folder or give the files themselves"
            )
        return found
    if any(char in text for char in "*?["):
        matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
        found = [p for p in matches if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
        if not found:
            if matches:
                raise ImageError(
                    f"{key}: {len(matches)} paths match {text} but none is an image file "
                    f"({' '.join(IMAGE_EXTENSIONS)}): check the pattern"
                )
            raise ImageError(f"{key}: nothing matches {text}: check the pattern (and quote it in a shell)")
        return found
    raise ImageError(f"{key}: {path} not found: give an image file, a folder or a glob pattern such as photos/*.jpg")


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


def image_format(path: str | os.PathLike) -> str:
    """Pillow's format name for a file name's extension; an :class:`ImageError` for an unknown one."""
    suffix = Path(path).suffix.lower()
    fmt = Image.registered_extensions().get(suffix)
    if fmt is None or fmt not in Image.SAVE:
        raise ImageError(f"cannot tell the image format of {path}: end the file name in .png, .jpg, .webp or .tif")
    return fmt


def check_writable_dir(folder: str | os.PathLike, what: str = "folder") -> Path:
    """Make sure files can be created in ``folder`` (created if missing); an :class:`ImageError` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".nst-check-", delete=True):
            pass
    except OSError as err:
        raise ImageError(f"cannot write to {what} {folder} ({err.strerror or err}): choose a writable folder") from None
    return folder


def check_writable(path: str | os.PathLike) -> Path:
    """Make sure an image can be written at ``path`` before any work starts.

    Creates missing parent folders and tries a throw-away file beside the target; raises
    :class:`ImageError` with the reason otherwise. Returns the path.
    """
    path = Path(path)
    image_format(path)
    check_replaceable(path, "output")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".nst-check-", delete=True):
            pass
    except OSError as err:
        raise ImageError(
            f"cannot write to {path.parent} ({err.strerror or err}): choose a writable output path"
        ) from None
    return path


def check_replaceable(path: str | os.PathLike, what: str = "output") -> Path:
    """Refuse an output path that exists and is not a regular file: writing would replace a folder,
    a device node, a FIFO or a socket (the atomic write renames over whatever is there)."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "folder":
        raise ImageError(f"{what} {path} is a folder: give a file name such as {path / 'stylised.png'}")
    if kind not in ("file", "missing"):
        raise ImageError(f"{what} {path} exists and is {kind}, not a regular file: choose another {what} path")
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same resolved path (through links, ``..``), or where both
    exist the same file on disk (``os.path.samefile``: hard links, bind mounts, case-insensitive names)."""
    try:
        if Path(a).resolve() == Path(b).resolve():
            return True
    except (OSError, RuntimeError):  # a symbolic link loop
        pass
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def _file_key(path: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _resolved(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symbolic link loop: compare it as written
        return path.absolute()


def check_outputs_apart(outputs: Iterable[tuple[str, Path, str]], inputs: Iterable[tuple[str, Path]]) -> None:
    """Refuse, with an :class:`ImageError` naming both, any output that is the same file as an input
    (see :func:`same_file`), so that a run never replaces what it reads.

    ``outputs`` are ``(what, path, setting to change)``, ``inputs`` ``(setting, path)``. An output
    whose file name is a glob pattern (``snapshots/step_*.png``) stands for every file of that name
    in its folder.
    """
    by_path: dict[Path, tuple[str, Path]] = {}
    by_key: dict[tuple[int, int], tuple[str, Path]] = {}
    for setting, path in inputs:
        path = Path(path)
        by_path.setdefault(_resolved(path), (setting, path))
        key = _file_key(path)
        if key is not None:
            by_key.setdefault(key, (setting, path))
    for label, output, setting in outputs:
        output = Path(output)
        if glob.has_magic(output.name):
            folder = _resolved(output.parent)
            folder_key = _file_key(output.parent)
            clash = next(
                (
                    found
                    for resolved, found in by_path.items()
                    if fnmatch.fnmatch(resolved.name, output.name)
                    and (resolved.parent == folder or (folder_key and _file_key(resolved.parent) == folder_key))
                ),
                None,
            )
        else:
            key = _file_key(output)
            clash = by_path.get(_resolved(output)) or (by_key.get(key) if key else None)
        if clash is not None:
            what, path = clash
            raise ImageError(
                f"{label} {output} would be the same file as {what} {path}, which the run would replace: "
                f"choose another {setting} (nothing was written)"
            )


def estimate_image_bytes(width: int, height: int, path: str | os.PathLike = "image.png") -> int:
    """An upper bound on the size of an 8-bit RGB image file: the raw pixels (what PNG's deflate
    gives for noise, and TIFF stores uncompressed), plus headers; JPEG and WebP come out smaller."""
    image_format(path)
    return height * (3 * width + 1) * 101 // 100 + 4096


def check_room(needs: Mapping[Path, int], what: str = "the run's files") -> None:
    """Refuse a run whose files will not fit: ``needs`` maps folders to the bytes to be written there;
    folders on one filesystem add up. An :class:`ImageError` says where, how much and how much is free."""
    by_device: dict[int, tuple[Path, int, int]] = {}
    for folder, size in needs.items():
        existing = Path(folder)
        while not existing.exists() and existing != existing.parent:  # a folder still to be made
            existing = existing.parent
        try:
            device = os.stat(existing).st_dev
            free = shutil.disk_usage(existing).free
        except OSError:
            continue  # cannot be told: the write itself will say
        first, total, _ = by_device.get(device, (Path(folder), 0, free))
        by_device[device] = (first, total + size, free)
    for folder, total, free in by_device.values():
        if total > free:
            raise ImageError(
                f"{what} need about {_megabytes(total)} in {folder} but only {_megabytes(free)} is free there: "
                "free some disk space, or choose another output.path / trainer.default_root_dir"
            )


def _megabytes(size: int) -> str:
    if size < 2**20:
        return f"{size / 2**10:,.1f} kB"
    return f"{size / 2**20:,.1f} MB" if size < 2**30 else f"{size / 2**30:,.1f} GB"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tensor_to_pil(image: torch.Tensor) -> Image.Image:
    """A (1, 3, H, W) or (3, H, W) tensor, clamped to [0, 1], as an 8-bit RGB Pillow image."""
    if image.dim() == 4:
        image = image[0]
    pixels = image.detach().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu()
    return to_pil_image(pixels, mode="RGB")


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Create or replace the file ``path`` atomically with the bytes that ``write(handle)`` writes.

    The bytes go to a temporary file in the same folder, which is flushed to disk and then renamed
    over ``path``; the folder is synced too. A crash, a signal or a full disk at any point leaves
    either the old file or the complete new one, never a truncated file, and no temporary file.
    Missing folders are created. A path that exists and is not a regular file is refused with an
    ``OSError`` (``EEXIST``). ``OSError`` is raised as it comes (callers word it).
    """
    path = Path(path)
    kind = file_kind(path)
    if kind not in ("file", "missing"):  # never rename over a folder, a device node, a FIFO...
        raise OSError(errno.EEXIST, f"{path} exists and is {kind}, not a regular file")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible everywhere
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write an image tensor to ``path`` atomically (format from the extension; see :func:`atomic_write`).

    The pixels are clamped to the valid range. A failed write (full disk, lost permission) raises an
    :class:`ImageError` and leaves any previous file at ``path`` as it was.
    """
    path = Path(path)
    fmt = image_format(path)
    pil = tensor_to_pil(image)
    options = {"quality": 95} if fmt == "JPEG" else {}
    try:
        return atomic_write(path, lambda handle: pil.save(handle, format=fmt, **options))
    except OSError as err:
        raise ImageError(
            f"cannot write image {path}: {err.strerror or err} (free some disk space or choose another "
            "output.path; any previous file there is unchanged)"
        ) from None
