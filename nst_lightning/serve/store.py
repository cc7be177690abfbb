"""The data folder's own files: its lock (one server at a time) and the SQLite job store, checked at start (ours,
whole, writable) and opened for each transaction with its failures worded (:class:`StoreUnavailable`)."""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from nst_lightning.errors import NSTError

STORE_FILE = "jobs.sqlite3"
LOCK_FILE = "server.lock"
# How long one transaction waits for another connection's lock before it gives up (the API then answers 503 and
# the worker retries): long enough for any transaction of ours, short enough that a request does not hang.
STORE_TIMEOUT_SECONDS = 5.0
# Written into the store's header (PRAGMA application_id) when it is made: "NSTL".
APPLICATION_ID = 0x4E53544C
TABLES = {"jobs", "sqlite_sequence"}


class StoreUnavailable(NSTError):
    """The job store cannot be read or written just now (locked by another connection, a read-only or full disk):
    the API answers 503 with this reason, the worker tries again."""


class StoreRefused(NSTError):
    """At start: a store file that is damaged, another program's, or cannot be opened; or a data folder that
    another server holds. The server does not start."""


def _reason(err: BaseException) -> str:
    return str(err.args[0] if isinstance(err, sqlite3.Error) and err.args else (getattr(err, "strerror", None) or err))


@contextlib.contextmanager
def transaction(path: Path, write: bool = True) -> Iterator[sqlite3.Connection]:
    """A connection whose ``with`` block is one transaction (committed, or rolled back on an error); a writing one
    takes the write lock at once, so that a read-then-write (a claim) cannot interleave. A store that cannot be
    reached or written raises :class:`StoreUnavailable` naming why (never the file's path: the API shows it)."""
    try:
        db = sqlite3.connect(path, timeout=STORE_TIMEOUT_SECONDS, isolation_level=None)
    except sqlite3.Error as err:
        raise StoreUnavailable(f"the job store cannot be opened ({_reason(err)})") from None
    try:
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as err:
            what = "written" if write else "read"
            raise StoreUnavailable(f"the job store cannot be {what} ({_reason(err)})") from None
        try:
            yield db
        except BaseException as err:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(err, sqlite3.Error):
                raise StoreUnavailable(f"the job store cannot be written ({_reason(err)})") from None
            raise
        try:
            db.execute("COMMIT")
        except sqlite3.Error as err:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise StoreUnavailable(f"the job store cannot be written ({_reason(err)})") from None
    finally:
        db.close()


def open_store(path: Path, schema: str, columns: tuple[str, ...]) -> None:
    """Checks the store file at ``path`` before a server uses it (a new one is made with ``schema``): one that is
    not a SQLite database, is damaged, holds another program's tables (or a ``jobs`` table without ``columns``),
    or cannot be opened or written raises :class:`StoreRefused` with one line naming the file and what to do; such
    a file is left as it was."""
    fix_other = "move it away (a new, empty store is made) or give another --data folder"
    try:
        with contextlib.closing(sqlite3.connect(path, timeout=STORE_TIMEOUT_SECONDS, isolation_level=None)) as db:
            check = db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                found = "; ".join(str(row[0]) for row in check[:2])
                raise StoreRefused(f"the job store {path} is damaged ({found}): {fix_other}")
            tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            (app_id,) = db.execute("PRAGMA application_id").fetchone()
            if app_id not in (0, APPLICATION_ID) or not tables <= TABLES:
                what = f"application id {app_id:#x}" if app_id not in (0, APPLICATION_ID) else "tables "
                what += ", ".join(sorted(tables - TABLES)) if tables - TABLES else ""
                raise StoreRefused(f"{path} is not a job store of nst-lightning ({what}): {fix_other}")
            found = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            missing = [column for column in columns if column not in found]
            if found and missing:
                raise StoreRefused(
                    f"{path} is not a job store of this nst-lightning (its jobs table has no {', '.join(missing)}): "
                    f"{fix_other}"
                )
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the workers' writes
            db.execute("BEGIN IMMEDIATE")
            db.execute(schema)
            db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            db.execute("COMMIT")
    except StoreRefused:
        raise
    except sqlite3.DatabaseError as err:
        reason = _reason(err)
        if "not a database" in reason or "malformed" in reason or "corrupt" in reason:
            raise StoreRefused(f"the job store {path} is damaged or not a database ({reason}): {fix_other}") from None
        raise StoreRefused(
            f"cannot open the job store {path} ({reason}): make the --data folder and the file writable, stop the "
            "program that holds it, or give another --data folder"
        ) from None


class DataLock:
    """An exclusive lock on the data folder (``flock`` on ``<data>/server.lock``) held while a server uses it, so
    that a second server on the same folder is refused instead of stopping the first one's runs. The lock goes
    with the process (also after ``kill -9``); the file keeps the holder's process id and address."""

    def __init__(self, data: Path) -> None:
        self.path = Path(data) / LOCK_FILE
        self.fd: int | None = None
        self.folder_fd: int | None = None
        try:
            import fcntl
        except ImportError:  # no flock here (Windows): nothing is locked
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StoreRefused(
                f"cannot open {self.path} ({err.strerror or err}): make the --data folder writable "
                "or give another --data folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = self._holder(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                reason = err.strerror or err
                raise StoreRefused(f"cannot lock {self.path} ({reason}): give another --data folder") from None
            raise self._in_use(data, holder) from None
        self.fd = fd
        self.folder_fd = self._lock_folder(data)
        self.announce("")

    @staticmethod
    def _in_use(data: Path, holder: str) -> StoreRefused:
        return StoreRefused(
            f"the --data folder {Path(data)} is in use by another nst-lightning server ({holder}): stop that "
            "one first, or give this one another --data folder"
        )

    def _lock_folder(self, data: Path) -> int | None:
        """The data folder itself locked too: a ``server.lock`` that someone deleted (taking it for a stale lock)
        would otherwise let a second server in, as its new file is not the one the first server holds."""
        import fcntl

        try:
            fd = os.open(data, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None  # a file system that cannot lock a folder: the file's lock alone
            self.release()
            raise self._in_use(data, f"its {LOCK_FILE} was removed, so its address is unknown") from None
        return fd

    @staticmethod
    def _holder(fd: int) -> str:
        with contextlib.suppress(OSError):
            text = os.pread(fd, 1000, 0).decode(errors="replace").strip()
            if text:
                return text
        return "its address is unknown"

    def announce(self, address: str) -> None:
        """Writes this process's id and ``address`` into the lock file, for a second server's message."""
        if self.fd is None:
            return
        text = f"process {os.getpid()}" + (f", {address}" if address else "")
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, text.encode(), 0)

    def release(self) -> None:
        for fd in (self.fd, self.folder_fd):
            if fd is not None:
                os.close(fd)  # closing the only descriptor releases the lock
        self.fd = self.folder_fd = None
