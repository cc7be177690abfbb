import io
import os
import struct
import warnings
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from nst_lightning.errors import ImageError
from nst_lightning.io.image_io import check_writable, fit_size, load_image, open_rgb, save_image
from tests.conftest import make_image


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    img.save(path, exif=exif)
    assert open_rgb(path).size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "LA", "1"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = make_image(tmp_path / f"img{suffix}", 12, 10, mode=mode)
    tensor = load_image(path)
    assert tensor.shape == (1, 3, 10, 12)
    assert tensor.dtype == torch.float32 and 0 <= tensor.min() and tensor.max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 0)).save(path)
    assert torch.all(load_image(path) == 1.0)


def test_sixteen_bit_png_keeps_its_range(tmp_path):
    path = tmp_path / "deep.png"
    values = np.array([[0, 32768], [65535, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")
    tensor = load_image(path)
    assert tensor[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert tensor[0, 0, 1, 0].item() == 1.0
    assert tensor[0, 0, 0, 1].item() == pytest.approx(0.5, abs=0.01)


def test_resize_keeps_aspect_ratio(tmp_path):
    path = make_image(tmp_path / "wide.png", 200, 100)
    assert load_image(path, 64).shape == (1, 3, 32, 64)
    assert fit_size(100, 200, 64) == (32, 64)
    assert fit_size(1, 1000, 10) == (1, 10)


def test_missing_and_non_images_are_clear_errors(tmp_path):
    with pytest.raises(ImageError, match="image not found"):
        open_rgb(tmp_path / "nope.png")
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image at all")
    with pytest.raises(ImageError, match="not an image"):
        open_rgb(fake)
    with pytest.raises(ImageError, match="folder"):
        open_rgb(tmp_path)


def test_truncated_image_is_a_clear_error(tmp_path):
    path = make_image(tmp_path / "full.png", 64, 64)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cannot read image"):
        open_rgb(path)


def test_save_clamps_and_roundtrips(tmp_path):
    image = torch.tensor([-1.0, 0.5, 2.0]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    path = save_image(image, tmp_path / "sub" / "out.png")
    pixels = np.asarray(Image.open(path))
    assert pixels[0, 0].tolist() == [0, 128, 255]


def test_save_is_atomic_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "out.png"
    save_image(torch.zeros(1, 3, 4, 4), target)
    before = target.read_bytes()

    def broken_save(self, fp, *args, **kwargs):
        fp.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with pytest.raises(ImageError, match="No space left on device"):
        save_image(torch.ones(1, 3, 4, 4), target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["out.png"], "no temporary file may be left behind"


def test_check_writable(tmp_path):
    assert check_writable(tmp_path / "new" / "dir" / "x.png").parent.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ImageError, match="cannot write"):
        check_writable(blocker / "x.png")
    with pytest.raises(ImageError, match="image format"):
        check_writable(tmp_path / "x.unknown")
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(ImageError, match="is a folder"):
        check_writable(folder)


# ---------------------------------------------------------------- hostile and odd files


def png_header(path, width: int, height: int):
    """A PNG that only declares its size (no pixel data): what a decompression bomb looks like to open()."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("side", [10_000, 100_000])  # 1-2x Pillow's limit (a warning in Pillow), and far over it
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side, monkeypatch):
    monkeypatch.delenv("NST_MAX_IMAGE_PIXELS", raising=False)
    with pytest.raises(ImageError, match="decompression bombs.*NST_MAX_IMAGE_PIXELS"):
        open_rgb(png_header(tmp_path / "bomb.png", side, side))
    assert Image.MAX_IMAGE_PIXELS == 89_478_485, "Pillow's own limit is left as it was"


def test_the_pixel_limit_can_be_raised_or_lowered(tmp_path, monkeypatch):
    path = make_image(tmp_path / "img.png", 20, 20)
    monkeypatch.setenv("NST_MAX_IMAGE_PIXELS", "100")
    with pytest.raises(ImageError, match="NST_MAX_IMAGE_PIXELS=400"):
        open_rgb(path)
    monkeypatch.setenv("NST_MAX_IMAGE_PIXELS", "400")
    assert open_rgb(path).size == (20, 20)
    monkeypatch.setenv("NST_MAX_IMAGE_PIXELS", "lots")
    with pytest.raises(ImageError, match="not a number of pixels"):
        open_rgb(path)


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_animated_images_give_their_first_frame(tmp_path, fmt):
    frames = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 0, 255), (0, 255, 0))]
    path = tmp_path / f"anim.{fmt}"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with pytest.warns(UserWarning, match="animated \\(3 frames\\): using the first frame"):
        image = open_rgb(path)
    assert image.size == (8, 6) and image.getpixel((3, 3)) == (255, 0, 0)


def _icc_with_swapped_primaries() -> bytes:
    """sRGB's ICC profile with the red and blue primaries swapped: red pixels mean sRGB blue."""
    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    count = struct.unpack(">I", icc[128:132])[0]
    entries = {bytes(icc[132 + 12 * i : 136 + 12 * i]): 132 + 12 * i for i in range(count)}
    red, blue = entries[b"rXYZ"], entries[b"bXYZ"]
    icc[red + 4 : red + 12], icc[blue + 4 : blue + 12] = icc[blue + 4 : blue + 12], icc[red + 4 : red + 12]
    return bytes(icc)


@pytest.mark.parametrize("mode, suffix", [("RGB", ".png"), ("RGB", ".jpg"), ("RGBA", ".png")])
def test_icc_profiles_are_converted_to_srgb(tmp_path, mode, suffix):
    path = tmp_path / f"profiled{suffix}"
    Image.new(mode, (6, 4), (255, 0, 0, 255)[: len(mode)]).save(path, icc_profile=_icc_with_swapped_primaries())
    red, green, blue = open_rgb(path).getpixel((2, 2))
    assert blue > 240 and red < 15 and green < 15


def test_srgb_and_unusable_profiles(tmp_path):
    path = tmp_path / "srgb.png"
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.new("RGB", (4, 4), (200, 100, 50)).save(path, icc_profile=srgb)
    assert open_rgb(path).getpixel((0, 0)) == (200, 100, 50)
    Image.new("RGB", (4, 4), (200, 100, 50)).save(path, icc_profile=b"not a profile")
    with pytest.warns(UserWarning, match="ignoring its ICC colour profile"):
        assert open_rgb(path).getpixel((0, 0)) == (200, 100, 50)


def test_one_pixel_and_very_thin_images_load(tmp_path):
    dot = make_image(tmp_path / "dot.png", 1, 1)
    assert load_image(dot, 32).shape == (1, 3, 32, 32)
    thin = make_image(tmp_path / "thin.png", 1000, 1)
    assert load_image(thin, 32).shape == (1, 3, 1, 32)  # too thin for deep layers: refused by the model


def _corrupt_files(tmp_path):
    png = make_image(tmp_path / "good.png", 32, 32).read_bytes()
    jpeg = make_image(tmp_path / "good.jpg", 32, 32).read_bytes()
    damaged = bytearray(png)
    damaged[len(png) // 2 : len(png) // 2 + 40] = bytes(40)  # zeroes in the middle of the pixel data
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x.txt", "hello")
    return {
        "empty.png": b"",
        "random.png": bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8)),
        "archive.jpg": archive.getvalue(),
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "damaged.png": bytes(damaged),
        "header-only.gif": b"GIF89a\x10\x00\x10\x00",
    }


def test_corrupt_and_fake_files_are_clear_errors(tmp_path):
    for name, data in _corrupt_files(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(ImageError, match="not an image|cannot read image"):
            open_rgb(path)


def test_mangled_files_never_escape_as_anything_but_image_error(tmp_path):
    """Seeded random damage to small files of every format: they load, or give an ImageError."""
    rng = np.random.default_rng(1)
    sources = [make_image(tmp_path / f"src.{ext}", 24, 16).read_bytes() for ext in ("png", "jpg", "gif", "webp", "tif")]
    for i in range(150):
        data = bytearray(sources[i % len(sources)])
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[position] = int(rng.integers(0, 256))
        if i % 3 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        path = tmp_path / f"mangled{i}{('.png', '.jpg', '.gif', '.webp', '.tif')[i % 5]}"
        path.write_bytes(bytes(data))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                open_rgb(path)
            except ImageError:
                pass


# ---------------------------------------------------------------- what a path is, outputs apart from inputs, room
