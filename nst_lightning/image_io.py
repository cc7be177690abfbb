"""All Pillow and filesystem code: read images as RGB tensors, write them atomically."""

from __future__ import annotations

import glob
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision.transforms.functional import pil_to_tensor, to_pil_image

from nst_lightning.errors import ImageError

_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

# What a folder or a glob pattern contributes to a batch (a file named directly is taken as it is).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


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


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an upright 8-bit RGB Pillow image.

    EXIF orientation is applied; greyscale, palette, alpha, CMYK and 16-bit images are converted;
    for an animated file the first frame is used. Pillow's decompression-bomb limit stays on.
    """
    path = Path(path)
    if not path.exists():
        raise ImageError(f"image not found: {path} (check the path in data.content / data.style)")
    if path.is_dir():
        raise ImageError(f"{path} is a folder, not an image file: give the path of an image file")
    try:
        with Image.open(path) as img:
            if getattr(img, "n_frames", 1) > 1:
                warnings.warn(f"{path} has {img.n_frames} frames: using the first one", stacklevel=2)
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except Image.DecompressionBombError as err:
        raise ImageError(
            f"{path} is too large to open safely ({err}); downscale it first or raise Pillow's limit"
        ) from None
    except UnidentifiedImageError:
        raise ImageError(f"{path} is not an image Pillow can read: give a PNG, JPEG or other image file") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"cannot read image {path}: {err} (is the file complete and readable?)") from None


def find_images(entry: str | os.PathLike, key: str = "images") -> list[Path]:
    """The image files that one entry of a list stands for, sorted.

    A file is taken as it is; a folder gives the files in it (not in its subfolders) whose extension
    is in :data:`IMAGE_EXTENSIONS`; a glob pattern (``*``, ``?``, ``[...]``; ``**`` spans folders)
    gives the matching files with such an extension. Nothing found is an :class:`ImageError` whose
    message names ``key``, the configuration key the entry came from.
    """
    text = str(entry)
    path = Path(text)
    if path.is_file():
        return [path]
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


def check_writable(path: str | os.PathLike) -> Path:
    """Make sure an image can be written at ``path`` before any work starts.

    Creates missing parent folders and tries a throw-away file beside the target; raises
    :class:`ImageError` with the reason otherwise. Returns the path.
    """
    path = Path(path)
    image_format(path)
    if path.is_dir():
        raise ImageError(f"output {path} is a folder: give a file name such as {path / 'stylised.png'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".nst-check-", delete=True):
            pass
    except OSError as err:
        raise ImageError(
            f"cannot write to {path.parent} ({err.strerror or err}): choose a writable output path"
        ) from None
    return path


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


def save_image(image: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write an image tensor to ``path`` atomically (format from the extension).

    The pixels are clamped to the valid range. The file is written under a temporary name in the
    same folder, flushed to disk and then renamed over the target, so a crash or a full disk never
    leaves a truncated file where a good one was.
    """
    path = Path(path)
    fmt = image_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pil = tensor_to_pil(image)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            pil.save(handle, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
