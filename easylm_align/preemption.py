"""Stopping cleanly when the run is preempted (SIGTERM) or interrupted (SIGINT, Ctrl-C).

The train loop asks `StopRequest.reached(step)` after every step. When it answers True, the loop
saves a checkpoint of that step (with its data position), waits for Orbax to finish writing and
exits with `EXIT_PREEMPTED`; rerunning the same command resumes from that step, so no step is lost.

* One process: a signal handler only sets a flag; the step that is running finishes first.
* Several processes (`jax.distributed`): every host must stop at the same step, or the collective
  save would hang. JAX's preemption sync manager (started by `jax.distributed.initialize`) catches
  SIGTERM on whichever host receives it and agrees with all hosts on a step to stop at;
  `multihost_utils.reached_preemption_sync_point` says when it is reached. SIGINT is forwarded to
  it as SIGTERM.

A second signal of the same kind stops at once, as if no handler were installed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from types import FrameType
from typing import Any, Optional

import jax
from jax.experimental import multihost_utils

# sysexits.h EX_TEMPFAIL ("temporary failure; the user is invited to retry"): a checkpoint was saved
# and rerunning the same command resumes from it.
EXIT_PREEMPTED = 75

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """Raised by the train loop after the preemption checkpoint of `step` is written."""

    def __init__(self, step: int, path: Any, signal_name: str):
        super().__init__(f"{signal_name} received: stopped after step {step}; checkpoint saved in {path}; "
                         f"rerun the same command to resume (exit code {EXIT_PREEMPTED})")
        self.step, self.path = step, path


def _sync_service_running() -> bool:
    """True when jax.distributed runs with its preemption sync manager (it owns SIGTERM then)."""
    return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


class StopRequest:
    """`install` the handlers when the loop starts and `restore` the previous ones when it ends."""

    def __init__(self) -> None:
        self.synced = _sync_service_running()
        self.received: Optional[str] = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logging.warning("training outside the main thread: SIGTERM/SIGINT will not save a checkpoint")
            return
        if not self.synced and jax.process_count() > 1:
            logging.warning("jax_enable_preemption_service is off: hosts cannot agree on a step to stop at, "
                            "so SIGTERM/SIGINT stop the run without saving")
            return
        # With the sync service, SIGTERM belongs to JAX's own handler; SIGINT is passed on to it.
        for sig in (signal.SIGINT,) if self.synced else SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle) or signal.SIG_DFL  # None: set outside Python

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.received == name:  # asked twice: stop now, as the previous handler would
            signal.signal(signum, self._previous.pop(signum))
            signal.raise_signal(signum)
            return
        self.received = name
        logging.warning("%s received: finishing the current step, then saving a checkpoint", name)
        if self.synced:
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Called once per step on every host, with the number of steps done."""
        if self.synced:
            if multihost_utils.reached_preemption_sync_point(step):
                self.received = self.received or "SIGTERM (on some host)"
                return True
            return False
        return self.received is not None
