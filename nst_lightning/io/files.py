"""The filesystem: what a path is (from ``stat`` alone), outputs kept apart from inputs, room on disk, atomic writes.

Every file the tool reads or writes is looked at here first, so that a FIFO, a device or a link loop is
named rather than opened, and nothing a run reads is ever replaced. (Image decoding and encoding, the
Pillow side, is :mod:`nst_lightning.io.image_io`, which writes through :func:`atomic_write`.)
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fnmatch
import glob
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

from nst_lightning.errors import ConfigError, ImageError

# What a folder or a glob pattern contributes to a batch (a file named directly is taken as it is).
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")


# What a path that is not a regular file is, by ``stat`` file type (for the messages).
_SPECIAL_KINDS = (
    (stat.S_ISFIFO, "a named pipe (FIFO), which would block a reader until something writes to it"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL (``s3://...``: fsspec's, for checkpoints and logs), which the local checks skip."""
    return "://" in str(path)


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


def check_image_file(path: str | os.PathLike) -> None:
    """An :class:`ImageError` unless ``path`` is a regular file (not missing, a folder or a special file);
    what is inside is Pillow's to judge (:mod:`nst_lightning.io.image_io`)."""
    kind = file_kind(path)
    if kind == "missing":
        raise ImageError(f"image not found: {path} (check the path in data.content / data.style)")
    if kind == "folder":
        raise ImageError(f"{path} is a folder, not an image file: give the path of an image file")
    if kind != "file":
        raise ImageError(f"{path} is {kind}, not an image file: give the path of a regular image file")


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


def check_writable_dir(folder: str | os.PathLike, what: str = "folder", fix: str = "choose a writable folder") -> Path:
    """Make sure files can be created in ``folder`` (created if missing); an :class:`ImageError` otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".nst-check-", delete=True):
            pass
    except OSError as err:
        where = f"{what} {folder}" if what else str(folder)
        raise ImageError(f"cannot write to {where} ({err.strerror or err}): {fix}") from None
    return folder


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


def check_new_output(path: str | os.PathLike, overwrite: bool, setting: str = "output.path") -> None:
    """Refuse an output file that exists unless ``overwrite``: a finished image never silently replaces one.
    (The run's own partial image, ``<name>.partial.png``, is not this: it is replaced and removed freely.)"""
    if not overwrite and file_kind(path) == "file":
        raise ImageError(
            f"{setting} {path} exists: pass --overwrite to replace it, or choose another {setting} "
            "(nothing was written)"
        )


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


def new_mode(folder: bool = False) -> int:
    """The permissions a new file (0666) or folder (0777) gets under the process's umask: 0644 and 0755 under the
    usual 022. For what a temporary name (``mkstemp``: 0600, ``mkdtemp``: 0700) becomes once renamed."""
    return (0o777 if folder else 0o666) & ~_umask()


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
        os.chmod(tmp_name, new_mode())
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


def file_bytes(path: str | os.PathLike) -> int:
    """The size of a regular file in bytes; 0 for anything else (missing, a folder, a FIFO)."""
    return os.stat(path).st_size if file_kind(path) == "file" else 0


def file_stamp(path: str | os.PathLike) -> tuple[int, int] | None:
    """(size, modification time in ns) of a file, to tell a changed file from the same one; None if missing."""
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return st.st_size, st.st_mtime_ns


def remove_file(path: str | os.PathLike) -> None:
    """Remove ``path`` if it is a regular file; anything else (a folder, a FIFO) is left alone."""
    if file_kind(path) == "file":
        Path(path).unlink(missing_ok=True)


def new_folder_in(parent: str | os.PathLike | None) -> Path | None:
    """A new, empty folder of our own inside ``parent`` (None: the system's temporary folder), where nothing
    can be replaced; None if it cannot be made."""
    try:
        return Path(tempfile.mkdtemp(prefix="nst-lightning-", dir=parent))
    except OSError:
        return None


def check_text_file(path: str | os.PathLike, option: str) -> None:
    """A config file must be UTF-8 text: a binary file would end in a UnicodeDecodeError traceback
    inside jsonargparse. Read in chunks, so a huge file costs no memory."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raise ConfigError(f"{option} {path} is not a text file (it is not UTF-8): give a YAML config file") from None
    except OSError as err:
        raise ConfigError(f"cannot read {option} {path}: {err.strerror or err}") from None
