"""A worker per device: it runs the store's queued jobs one at a time, each as ``nst-lightning fit`` in a process
of its own (:mod:`nst_lightning.serve.runner`), records their progress and how they ended, and carries on through
a job store that cannot be written for a while (it tries again, with a growing pause)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nst_lightning.serve.jobs import POLL_SECONDS, RESULT_FILE, JobStore
from nst_lightning.serve.progress import LOG_FILE, NO_REASON, last_error, read_progress
from nst_lightning.serve.runner import SERVER_PID_VARIABLE
from nst_lightning.serve.store import StoreUnavailable

RETRY_MAX_SECONDS = 5.0  # the longest pause of a worker between tries of a store that cannot be written


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
        self.store_trouble: str | None = None  # why the store cannot be written, while it cannot

    def stop(self) -> None:
        """Stops taking jobs; a running job gets SIGTERM (it saves its image and checkpoint) and is requeued."""
        self.stopping.set()

    def run(self) -> None:
        delay = POLL_SECONDS
        while not self.stopping.is_set():
            try:
                claimed = self.store.claim(self.device)
            except Exception as err:  # noqa: BLE001 - a lock held elsewhere, a read-only disk...: wait, try again
                self._trouble(err if isinstance(err, StoreUnavailable) else StoreUnavailable(f"the job store ({err})"))
                self.stopping.wait(delay)
                delay = min(2 * delay, RETRY_MAX_SECONDS)
                continue
            delay = POLL_SECONDS
            self._trouble(None)
            if claimed is None:
                self.stopping.wait(POLL_SECONDS)
                continue
            job_id, arguments, resume = claimed
            try:
                self._run(job_id, arguments, resume)
            except Exception as err:  # noqa: BLE001 - a job's failure must not stop the worker
                self._settle(
                    job_id,
                    state="failed",
                    error=f"the server could not run the job: {err}",
                    pid=None,
                    finished=time.time(),
                )

    def _trouble(self, err: StoreUnavailable | None) -> None:
        """Says once on the server's stderr that the store cannot be used (and once that it can again)."""
        if err is not None and self.store_trouble is None:
            sys.stderr.write(f"nst-lightning: warning: worker {self.device}: {err}: trying again until it can\n")
        elif err is None and self.store_trouble is not None:
            sys.stderr.write(f"nst-lightning: worker {self.device}: the job store can be written again\n")
        self.store_trouble = None if err is None else str(err)

    def _try(self, change: Callable[[], Any]) -> bool:
        """``change()`` of the store; False (and the trouble said) where the store cannot be written just now."""
        try:
            change()
        except StoreUnavailable as err:
            self._trouble(err)
            return False
        self._trouble(None)
        return True

    def _settle(self, job_id: str, **values: Any) -> None:
        """Records how a job ended, trying again (with a growing pause) while the store cannot be written; a server
        that stops meanwhile leaves it to the next start's recovery."""
        delay = POLL_SECONDS
        while not self._try(lambda: self.store.update(job_id, **values)) and not self.stopping.wait(delay):
            delay = min(2 * delay, RETRY_MAX_SECONDS)

    def _run(self, job_id: str, arguments: list[str], resume: str | None) -> None:
        folder = self.store.folder(job_id)
        if resume is not None:
            arguments = [*arguments, f"--ckpt_path={resume}"]
        command = [sys.executable, "-m", "nst_lightning.serve.runner", job_id, *arguments]
        env = {
            **os.environ,
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            **self.env,
            SERVER_PID_VARIABLE: str(os.getpid()),
        }
        with open(folder / LOG_FILE, "ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=folder,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # a Ctrl-C at the server's terminal is the server's: it stops the run itself
            )
        pid = self.process.pid
        pid_kept = self._try(lambda: self.store.update(job_id, pid=pid))
        signalled = None  # why the run was sent SIGTERM: "cancel" or "stop"
        seen = (-1, None)
        while self.process.poll() is None:
            time.sleep(POLL_SECONDS)
            pid_kept = pid_kept or self._try(lambda: self.store.update(job_id, pid=pid))
            try:
                seen = self._record_progress(job_id, folder, seen)
                cancelled = signalled is None and self.store.cancel_requested(job_id)
            except StoreUnavailable as err:  # the run goes on; its progress is recorded once the store can be
                self._trouble(err)
                cancelled = False
            if signalled is None and self.stopping.is_set():
                signalled = "stop"
                self.process.send_signal(signal.SIGTERM)
            elif cancelled:
                signalled = "cancel"
                self.process.send_signal(signal.SIGTERM)
        code = self.process.returncode
        self.process = None
        if signalled == "stop":  # the server stops: the next start resumes the job (JobStore.recover)
            self._try(lambda: self._record_progress(job_id, folder, seen))
            return
        self._settle(job_id, **self._outcome(job_id, folder, code, signalled))

    def _outcome(self, job_id: str, folder: Path, code: int | None, signalled: str | None) -> dict[str, Any]:
        """The store's values for a run that ended with ``code``: done, cancelled or failed, its last step."""
        values: dict[str, Any] = {"pid": None, "finished": time.time()}
        steps = [r for r in read_progress(folder) if "step" in r]
        if steps:
            values.update(step=steps[-1]["step"], max_steps=steps[-1]["max_steps"], loss=steps[-1].get("loss"))
        if code == 0 and (folder / RESULT_FILE).is_file():
            return {**values, "state": "done", "error": None}
        cancelled = signalled == "cancel"
        if not cancelled:
            with contextlib.suppress(StoreUnavailable):
                cancelled = self.store.cancel_requested(job_id)
        if cancelled:
            return {**values, "state": "cancelled"}
        error = last_error(folder)
        if error == NO_REASON and code is not None and code < 0:  # SIGKILL: the out-of-memory killer, a kill -9
            name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
            error = f"the run was killed ({name}: out of memory, or another program): see run.log in the job's folder"
        return {**values, "state": "failed", "error": error}

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
