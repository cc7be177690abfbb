"""The server's jobs: a SQLite store in the data folder, and one worker per device that runs them one at a time.

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
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nst_lightning.serve.progress import LOG_FILE, last_error, latest_checkpoint, read_progress

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
    "id", "created", "state", "settings", "names", "step", "max_steps", "loss", "error", "note", "started", "finished",
)  # fmt: skip


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
            "id": self.id, "state": self.state, "step": self.step, "max_steps": self.max_steps, "loss": self.loss,
            "position": position, "error": self.error, "note": self.note, "eta_s": eta, "created": self.created,
            "started": self.started, "finished": self.finished, "settings": self.settings, "names": self.names,
        }  # fmt: skip


class JobStore:
    """The jobs, durably: a SQLite database in ``data``, each change one transaction; job folders beside it."""

    def __init__(self, data: Path) -> None:
        self.data = Path(data)
        self.jobs_dir = self.data / "jobs"
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.data / "jobs.sqlite3"
        with contextlib.closing(sqlite3.connect(self.path, timeout=30)) as db:
            db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the workers' writes
        with self._db() as db:
            db.execute(_SCHEMA)

    @contextlib.contextmanager
    def _db(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A connection whose ``with`` block is one transaction (committed, or rolled back on an error); a
        writing one takes the write lock at once, so that a read-then-write (a claim) cannot interleave."""
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        try:
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    def folder(self, job_id: str) -> Path:
        """The job's folder (``job_id`` must be an id: :func:`is_job_id`)."""
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs_dir / job_id

    def add(self, job_id: str, arguments: list[str], settings: dict, names: dict, max_steps: int) -> None:
        """Queues a job whose folder holds its uploads."""
        with self._db() as db:
            db.execute(
                "INSERT INTO jobs (id, created, state, arguments, settings, names, max_steps) VALUES (?,?,?,?,?,?,?)",
                (job_id, time.time(), "queued", json.dumps(arguments), json.dumps(settings), json.dumps(names),
                 max_steps),
            )  # fmt: skip

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


def stop_process(pid: int, job_id: str, wait: float = STOP_WAIT_SECONDS) -> None:
    """SIGTERM to a job's orphaned run (only if the process is that job's), then wait for it to save and exit."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return
    if job_id.encode() not in command:
        return  # the number now belongs to another process
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)


class Worker(threading.Thread):
    """Runs the store's queued jobs one at a time on one device, each in a process of its own.

    Args:
        store: the job store.
        device: the name shown for this worker (``cpu``, ``cuda:0``...).
        env: extra environment of the runs (``CUDA_VISIBLE_DEVICES`` of this worker's GPU).
    """

    def __init__(self, store: JobStore, device: str, env: dict[str, str] | None = None) -> None:
        super().__init__(name=f"nst-worker-{device}", daemon=True)
        self.store = store
        self.device = device
        self.env = dict(env or {})
        self.stopping = threading.Event()
        self.process: subprocess.Popen | None = None

    def stop(self) -> None:
        """Stops taking jobs; a running job gets SIGTERM (it saves its image and checkpoint) and is requeued."""
        self.stopping.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            claimed = self.store.claim(self.device)
            if claimed is None:
                self.stopping.wait(POLL_SECONDS)
                continue
            job_id, arguments, resume = claimed
            try:
                self._run(job_id, arguments, resume)
            except Exception as err:  # noqa: BLE001 - a job's failure must not stop the worker
                self.store.update(job_id, state="failed", error=f"the server could not run the job: {err}", pid=None,
                                  finished=time.time())  # fmt: skip

    def _run(self, job_id: str, arguments: list[str], resume: str | None) -> None:
        folder = self.store.folder(job_id)
        if resume is not None:
            arguments = [*arguments, f"--ckpt_path={resume}"]
        command = [sys.executable, "-m", "nst_lightning.serve.runner", job_id, *arguments]
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **self.env}
        with open(folder / LOG_FILE, "ab") as log:
            self.process = subprocess.Popen(
                command, cwd=folder, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # a Ctrl-C at the server's terminal is the server's: it stops the run itself
            )  # fmt: skip
        self.store.update(job_id, pid=self.process.pid)
        signalled = None  # why the run was sent SIGTERM: "cancel" or "stop"
        seen = (-1, None)
        while self.process.poll() is None:
            time.sleep(POLL_SECONDS)
            seen = self._record_progress(job_id, folder, seen)
            if signalled is None and self.stopping.is_set():
                signalled = "stop"
                self.process.send_signal(signal.SIGTERM)
            elif signalled is None and self.store.cancel_requested(job_id):
                signalled = "cancel"
                self.process.send_signal(signal.SIGTERM)
        code = self.process.returncode
        self.process = None
        self._record_progress(job_id, folder, seen)
        now = time.time()
        if signalled == "stop":  # the server stops: the next start resumes the job (JobStore.recover)
            return
        if code == 0 and (folder / RESULT_FILE).is_file():
            self.store.update(job_id, state="done", pid=None, finished=now, error=None)
        elif signalled == "cancel" or self.store.cancel_requested(job_id):
            self.store.update(job_id, state="cancelled", pid=None, finished=now)
        else:
            self.store.update(job_id, state="failed", pid=None, finished=now, error=last_error(folder))

    def _record_progress(self, job_id: str, folder: Path, seen: tuple[int, Any]) -> tuple[int, Any]:
        steps = [r for r in read_progress(folder) if "step" in r]
        if not steps:
            return seen
        last = steps[-1]
        if (last["step"], last.get("loss")) != seen:
            self.store.update(job_id, step=last["step"], max_steps=last["max_steps"], loss=last.get("loss"))
        return last["step"], last.get("loss")


def device_workers(store: JobStore) -> list[Worker]:
    """One worker per GPU that Lightning finds (each run sees only its own), else one for the CPU."""
    from lightning.pytorch.accelerators import CUDAAccelerator

    if CUDAAccelerator.is_available():
        count = CUDAAccelerator.auto_device_count()
        return [Worker(store, f"cuda:{index}", {"CUDA_VISIBLE_DEVICES": str(index)}) for index in range(count)]
    return [Worker(store, "cpu")]
