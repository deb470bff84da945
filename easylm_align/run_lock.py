"""One trainer per output directory: `OUT/trainer.lock`, held while a run trains.

The lock file is created exclusively (`O_CREAT | O_EXCL`, atomic on local file systems and NFS)
and records the holder's host, pid and process start time. A second trainer finds it and is
refused, naming the holder. A lock whose holder is gone does not block a rerun: on the same host
the holder is gone when its pid no longer runs, or runs another program (its start time differs,
so a reused pid is not mistaken for the holder). A holder's pid on another host cannot be checked
from here; instead the holder touches the file every `HEARTBEAT_S` seconds (a daemon thread), and
a lock from another host untouched for `STALE_AFTER_S` is taken as left by a dead run (a job
requeued on another node after SIGKILL starts without help). A fresher one is refused, naming it.

Several processes of one `jax.distributed` run share the directory: only process 0 takes the lock,
and every process learns from it whether the run may start.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from easylm_align import logger
from easylm_align.errors import UserError

LOCK_FILE = "trainer.lock"
HEARTBEAT_S = 30
STALE_AFTER_S = 600  # 20 missed heartbeats: a live holder, even under clock skew between hosts, is not this late


class DirectoryInUse(UserError):
    pass


def _start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc), to tell a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name may hold spaces


def _alive(pid: int, start_time: Optional[str]) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    return start_time is None or _start_time(pid) in (None, start_time)


class RunLock:
    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": _start_time(os.getpid()),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.held = False
        self._stop = threading.Event()

    def acquire(self) -> None:
        """Takes the lock or raises DirectoryInUse naming its holder; replaces a dead holder's lock."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None and not self.path.exists():
                    continue  # released this instant
                if holder is None or not self._stale(holder):
                    raise DirectoryInUse(self._in_use(holder)) from None
                logging.warning("%s: removing the lock of pid %s on host %s, which is no longer running",
                                self.path, holder.get("pid"), holder.get("host"))
                self.path.unlink(missing_ok=True)
                continue
            try:
                with logger.naming_failed_writes(self.path), os.fdopen(fd, "w") as f:
                    json.dump(self.record, f)
            except logger.LogWriteError:
                self.path.unlink(missing_ok=True)  # an empty lock would look held to the next run
                raise
            self.held = True
            threading.Thread(target=self._heartbeat, name="trainer.lock", daemon=True).start()
            return
        raise DirectoryInUse(self._in_use(self._holder()))

    def _holder(self) -> Optional[dict]:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # being written this instant, or unreadable: treated as held
        return holder if isinstance(holder, dict) else None

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # removed by hand, or the file system is gone: the run itself will say
                return

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") != self.record["host"]:
            try:
                return time.time() - self.path.stat().st_mtime > STALE_AFTER_S
            except OSError:
                return False
        return isinstance(holder.get("pid"), int) and not _alive(holder["pid"], holder.get("start_time"))

    def _in_use(self, holder: Optional[dict]) -> str:
        directory = self.path.parent
        if holder is None:
            return (f"--logger.output_dir={directory} is locked by another trainer ({self.path} is unreadable); "
                    f"if no trainer runs there, delete {self.path}")
        who = f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
        message = (f"--logger.output_dir={directory} is in use by another trainer ({who}); wait for it to "
                   "finish or stop it, or choose another --logger.output_dir")
        if holder.get("host") != self.record["host"]:
            message += (f"; if that run is no longer running, delete {self.path} (a lock from another host "
                        f"counts as left behind once untouched for {STALE_AFTER_S} s)")
        return message

    def release(self) -> None:
        self._stop.set()
        if self.held and self._holder() == self.record:
            self.path.unlink(missing_ok=True)
        self.held = False


def acquire_for_run(output_dir: Path) -> Optional[RunLock]:
    """Process 0 takes the lock; with several processes, all of them raise if it could not."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = RunLock(output_dir)
        try:
            lock.acquire()
        except DirectoryInUse as e:
            error = e
    if jax.process_count() > 1:
        refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if int(refused) and error is None:
            raise DirectoryInUse(f"--logger.output_dir={output_dir} is in use by another trainer "
                                 "(process 0 says which)")
    if error is not None:
        raise error
    return lock
