import os

import numpy as np
import pytest
import torch
from PIL import Image

from nst_lightning.errors import ImageError
from nst_lightning.image_io import check_writable, fit_size, load_image, open_rgb, save_image
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
    with pytest.raises(OSError):
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
