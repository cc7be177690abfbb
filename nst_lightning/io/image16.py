"""16-bit RGB images for print work (``output.bit_depth: 16``): PNG and TIFF, written here with zlib and NumPy.

Pillow writes 16 bits per sample only for one-channel images (``I;16``): its RGB images are 8-bit. The two
formats are simple enough to write directly: a PNG of colour type 2 at bit depth 16 (big-endian samples, each
row behind filter byte 0, deflated), and a baseline TIFF, RGB, 16 bits per sample, little-endian, one strip
with Adobe Deflate compression (tag 8, which libtiff, Pillow, tifffile, GIMP and Photoshop read).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

FORMATS = {".png": "PNG", ".tif": "TIFF", ".tiff": "TIFF"}
"""The extensions a 16-bit image can have (``nst_lightning.run.checks.SIXTEEN_BIT_SUFFIXES``, without torch)."""


def to_uint16(image: torch.Tensor) -> np.ndarray:
    """A (1, 3, H, W) or (3, H, W) tensor, clamped to [0, 1], as (H, W, 3) 16-bit samples."""
    if image.dim() == 4:
        image = image[0]
    pixels = image.detach().float().clamp(0.0, 1.0).mul(65535.0).round().to(torch.int32).cpu()
    return np.ascontiguousarray(pixels.permute(1, 2, 0).numpy().astype(np.uint16))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB PNG of (H, W, 3) uint16 ``pixels``."""
    height, width, _ = pixels.shape
    rows = pixels.astype(">u2", order="C").view(np.uint8).reshape(height, width * 6)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()  # filter 0 (none) per row
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)  # bit depth 16, colour type 2 (RGB)
    data = zlib.compress(raw, 6)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def tiff16(pixels: np.ndarray) -> bytes:
    """A 16-bit RGB TIFF (little-endian, one deflated strip) of (H, W, 3) uint16 ``pixels``."""
    height, width, _ = pixels.shape
    strip = zlib.compress(pixels.astype("<u2", order="C").tobytes(), 6)
    entries = [  # (tag, type, count, value or offset): 3 SHORT, 4 LONG
        (256, 4, 1, width),
        (257, 4, 1, height),
        (258, 3, 3, None),
        (259, 3, 1, 8),
        (262, 3, 1, 2),
        (273, 4, 1, None),
        (277, 3, 1, 3),
        (278, 4, 1, height),
        (279, 4, 1, len(strip)),
        (284, 3, 1, 1),
    ]
    ifd_size = 2 + 12 * len(entries) + 4
    bits_at = 8 + ifd_size  # the three BitsPerSample values follow the directory
    strip_at = bits_at + 6
    directory = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = {258: bits_at, 273: strip_at}.get(tag, value)
        field = struct.pack("<HH", value, 0) if kind == 3 and count == 1 else struct.pack("<I", value)
        directory += struct.pack("<HHI", tag, kind, count) + field
    directory += struct.pack("<I", 0)  # no further directory
    return b"II*\x00" + struct.pack("<I", 8) + directory + struct.pack("<HHH", 16, 16, 16) + strip


def encode16(image: torch.Tensor, path: str | Path) -> bytes:
    """The bytes of ``image`` as a 16-bit file in the format of ``path``'s extension (PNG or TIFF)."""
    pixels = to_uint16(image)
    return (png16 if FORMATS[Path(path).suffix.lower()] == "PNG" else tiff16)(pixels)
