"""The filesystem: what a path is without opening it, atomic writes, outputs kept apart from inputs, room on disk."""

import os
import shutil
import stat

import pytest

from nst_lightning.errors import ImageError
from nst_lightning.io.files import atomic_write, check_outputs_apart, check_room, check_writable_dir, file_kind
from nst_lightning.io.image_io import estimate_image_bytes, open_rgb
from tests.conftest import make_image


def test_atomic_write_leaves_no_trace_when_interrupted(tmp_path):
    target = tmp_path / "data.bin"
    atomic_write(target, lambda handle: handle.write(b"good"))

    def interrupted(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, interrupted)
    assert target.read_bytes() == b"good"
    assert os.listdir(tmp_path) == ["data.bin"]


def test_check_writable_dir(tmp_path):
    assert check_writable_dir(tmp_path / "a" / "b").is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ImageError, match="cannot write to trainer.default_root_dir"):
        check_writable_dir(blocker / "runs", "trainer.default_root_dir")


@pytest.mark.skipif(os.name != "posix", reason="FIFOs and symbolic links")
def test_file_kind_never_opens_the_path(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # opening it would block: file_kind only stats it
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    make_image(tmp_path / "a.png", 4, 4)
    assert file_kind(tmp_path / "a.png") == "file" and file_kind(tmp_path) == "folder"
    assert file_kind(tmp_path / "nowhere") == "missing" and file_kind(tmp_path / "dangling") == "missing"
    assert file_kind(fifo).startswith("a named pipe (FIFO)") and file_kind("/dev/null") == "a character device"
    assert file_kind(loop).startswith("a symbolic link loop")
    with pytest.raises(ImageError, match="is a named pipe"):
        open_rgb(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        atomic_write(fifo, lambda handle: handle.write(b"x"))
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the FIFO was not replaced"


@pytest.mark.skipif(os.name != "posix", reason="symbolic and hard links")
def test_outputs_that_are_inputs_are_found_through_links_and_patterns(tmp_path):
    photo = make_image(tmp_path / "photo.png", 4, 4)
    (tmp_path / "link.png").symlink_to(photo)
    os.link(photo, tmp_path / "hard.png")
    inputs = [("data.content", photo)]
    for output in (photo, tmp_path / "link.png", tmp_path / "hard.png", tmp_path / "sub" / ".." / "photo.png"):
        with pytest.raises(ImageError, match="would be the same file as data.content"):
            check_outputs_apart([("output.path", output, "output.path")], inputs)
    with pytest.raises(ImageError, match="the run's snapshots"):
        check_outputs_apart([("the run's snapshots", tmp_path / "*.png", "x")], inputs)
    check_outputs_apart([("output.path", tmp_path / "other.png", "output.path")], inputs)
    check_outputs_apart([("the run's snapshots", tmp_path / "step_*.png", "x")], inputs)


def test_room_adds_up_the_files_of_one_disk(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=10 * 2**20))
    check_room({tmp_path / "a": 6 * 2**20})
    with pytest.raises(ImageError, match=r"need about 12.0 MB in .* but only 10.0 MB is free there"):
        check_room({tmp_path / "a": 6 * 2**20, tmp_path / "b" / "c": 6 * 2**20})
    assert not (tmp_path / "a").exists(), "checking makes no folder"
    assert estimate_image_bytes(512, 384) >= 512 * 384 * 3
