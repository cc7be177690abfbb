"""The server's jobs: a SQLite store in the data folder (:mod:`.store`); one worker per device runs them one at a
time (:mod:`.worker`).

Each job is a folder ``<data>/jobs/<id>/`` with its uploads, ``result.png`` (``result.partial.png`` when it
stopped early), ``preview.png``, ``progress.jsonl``, ``run.log`` and the run's ``lightning_logs`` (TensorBoard,
checkpoints). A worker runs a job as ``nst-lightning fit`` in a process of its own
(:mod:`nst_lightning.serve.runner`), so a cancel is the command line's SIGTERM (a partial image and
``interrupted.ckpt``) and a server that stops leaves a run that the next start resumes from that checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nst_lightning.serve.progress import latest_checkpoint, read_progress
from nst_lightning.serve.store import STORE_FILE, DataLock, open_store, transaction

FINISHED = ("done", "failed", "cancelled")
RESULT_FILE = "result.png"
PARTIAL_FILE = "result.partial.png"
JOB_ID_LENGTH = 32
POLL_SECONDS = 0.2
STOP_WAIT_SECONDS = 120.0  # how long a run gets to write its partial image and checkpoint after SIGTERM

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    created REAL NOT NULL,
    state TEXT NOT NULL,
    arguments TEXT NOT NULL,
    settings TEXT NOT NULL,
    names TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    max_steps INTEGER NOT NULL,
    loss REAL,
    error TEXT,
    note TEXT,
    resume TEXT,
    cancel INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    device TEXT,
    started REAL,
    finished REAL
)
"""
_COLUMNS = (
    "id",
    "created",
    "state",
    "settings",
    "names",
    "step",
    "max_steps",
    "loss",
    "error",
    "note",
    "started",
    "finished",
)


def new_job_id() -> str:
    """A fresh job id: 32 hex digits, which is also the job folder's name."""
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    """Whether ``value`` has the form of a job id (so it can name a folder)."""
    return len(value) == JOB_ID_LENGTH and all(c in "0123456789abcdef" for c in value)


@dataclass
class Job:
    """One row of the store, as the API shows it."""

    id: str
    created: float
    state: str
    settings: dict[str, Any]
    names: dict[str, Any]
    step: int
    max_steps: int
    loss: float | None
    error: str | None
    note: str | None
    started: float | None
    finished: float | None

    def public(self, position: int | None = None, eta: float | None = None) -> dict[str, Any]:
        """The job as the API's JSON."""
        return {
            "id": self.id,
            "state": self.state,
            "step": self.step,
            "max_steps": self.max_steps,
            "loss": self.loss,
            "position": position,
            "error": self.error,
            "note": self.note,
            "eta_s": eta,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "settings": self.settings,
            "names": self.names,
        }


class JobStore:
    """The jobs, durably: a SQLite database in ``data``, each change one transaction; job folders beside it."""

    def __init__(self, data: Path) -> None:
        self.data = Path(data)
        self.jobs_dir = self.data / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data / STORE_FILE
        self.lock = DataLock(self.data)  # before anything is read: a second server is refused, not let in
        try:
            open_store(self.path, _SCHEMA, (*_COLUMNS, "arguments", "resume", "cancel", "pid", "device"))
        except BaseException:
            self.lock.release()
            raise

    def close(self) -> None:
        """At a stop, once the workers have stopped: :meth:`recover`, then the data folder is let go (for another
        server; a process that dies lets it go too)."""
        try:
            self.recover()
        finally:
            self.lock.release()

    def _db(self, write: bool = True) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One transaction (:func:`~nst_lightning.serve.store.transaction`); raises :class:`StoreUnavailable`."""
        return transaction(self.path, write)

    def folder(self, job_id: str) -> Path:
        """The job's folder (``job_id`` must be an id: :func:`is_job_id`)."""
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs_dir / job_id

    def add(
        self, job_id: str, arguments: list[str], settings: dict, names: dict, max_steps: int, note: str | None = None
    ) -> None:
        """Queues a job whose folder holds its uploads (``note``: what the page says of it beside its state)."""
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, created, state, arguments, settings, names, max_steps, note) "
                "VALUES (?,?,?,?,?,?,?,?)",
                (
                    job_id,
                    time.time(),
                    "queued",
                    json.dumps(arguments),
                    json.dumps(settings),
                    json.dumps(names),
                    max_steps,
                    note,
                ),
            )

    @staticmethod
    def _job(row: sqlite3.Row | tuple) -> Job:
        values = dict(zip(_COLUMNS, row, strict=True))
        values["settings"] = json.loads(values["settings"])
        values["names"] = json.loads(values["names"])
        return Job(**values)

    def get(self, job_id: str) -> Job | None:
        with self._db(write=False) as db:
            row = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return self._job(row) if row else None

    def all(self) -> list[Job]:
        """Every job, newest first."""
        with self._db(write=False) as db:
            rows = db.execute(f"SELECT {', '.join(_COLUMNS)} FROM jobs ORDER BY seq DESC").fetchall()
        return [self._job(row) for row in rows]

    def position(self, job_id: str) -> int | None:
        """1 for the next job to start, 2 for the one after...; 0 while it runs; None once finished."""
        with self._db(write=False) as db:
            row = db.execute("SELECT seq, state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or row[1] in FINISHED:
                return None
            if row[1] == "running":
                return 0
            (ahead,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = 'queued' AND seq < ?", (row[0],)).fetchone()
        return int(ahead) + 1

    def update(self, job_id: str, **values: Any) -> None:
        columns = ", ".join(f"{key} = ?" for key in values)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*values.values(), job_id))

    def claim(self, device: str) -> tuple[str, list[str], str | None] | None:
        """Takes the oldest queued job for ``device`` (it becomes running): (id, arguments, checkpoint to resume)."""
        with self._db() as db:
            row = db.execute(
                "SELECT id, arguments, resume FROM jobs WHERE state = 'queued' ORDER BY seq LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute(
                "UPDATE jobs SET state = 'running', device = ?, started = COALESCE(started, ?) WHERE id = ?",
                (device, time.time(), row[0]),
            )
        return row[0], json.loads(row[1]), row[2]

    def cancel(self, job_id: str) -> str | None:
        """Cancels a queued job at once, asks a running one's worker to stop it; returns the state after."""
        with self._db() as db:
            row = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return None
            if row[0] == "queued":
                db.execute("UPDATE jobs SET state = 'cancelled', finished = ? WHERE id = ?", (time.time(), job_id))
                return "cancelled"
            if row[0] == "running":
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
            return row[0]

    def cancel_requested(self, job_id: str) -> bool:
        with self._db(write=False) as db:
            row = db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def remove(self, job_id: str) -> None:
        with self._db() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self) -> None:
        """After a stop: each job left running (its process gone, or stopped here) resumes from its checkpoint,
        or from the start where it wrote none; one that had finished its steps is done."""
        with self._db() as db:
            rows = db.execute("SELECT id, pid FROM jobs WHERE state = 'running'").fetchall()
        for job_id, pid in rows:
            if pid:
                stop_process(pid, job_id)
            folder = self.folder(job_id)
            records = [r for r in read_progress(folder) if "step" in r]
            if (folder / RESULT_FILE).is_file() and records and records[-1]["step"] >= records[-1]["max_steps"]:
                self.update(job_id, state="done", pid=None, finished=time.time())
                continue
            checkpoint = latest_checkpoint(folder)
            if checkpoint is not None:
                note = "the server stopped during the run: it went on from its checkpoint"
            else:
                note = "the server stopped before the run wrote a checkpoint: restarted from the start"
            self.update(job_id, state="queued", pid=None, resume=str(checkpoint) if checkpoint else None, note=note)


def _is_run(pid: int, job_id: str) -> bool:
    """Whether process ``pid`` is still ``job_id``'s run (a number used again, or a zombie, is not)."""
    try:
        return job_id.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _gone(pid: int, job_id: str, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while _is_run(pid, job_id):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


def stop_process(pid: int, job_id: str, wait: float = STOP_WAIT_SECONDS) -> None:
    """Waits for a job's run left by a server that stopped (only if the process is that job's run): once its server
    is gone the run stops by itself with its image and checkpoint (:mod:`nst_lightning.serve.runner`), and a
    SIGTERM meanwhile would be a second one, which quits at once without them; only a run still there after
    ``wait`` seconds gets SIGTERM (then as long again to save)."""
    if _gone(pid, job_id, wait):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    _gone(pid, job_id, wait)


def __getattr__(name: str) -> Any:
    """``jobs.Worker`` and ``jobs.device_workers``: the worker has a module of its own (:mod:`.worker`)."""
    if name in ("Worker", "device_workers"):
        from nst_lightning.serve import worker

        return getattr(worker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
