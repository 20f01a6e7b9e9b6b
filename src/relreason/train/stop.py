"""Stopping a run cleanly: SIGTERM, Ctrl-C and the time limit, decided alike on every rank; DataLoader workers
that ignore the signals, so that they serve the last step."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

from relreason.distributed import DistributedContext, max_over_ranks
from relreason.launch import is_first_process
from relreason.train.run_folder import release_run_folders


class StopRequest:
    """SIGTERM (a scheduler's preemption notice) or a first Ctrl-C asks the loop to checkpoint and stop at the
    next step; a second Ctrl-C stops at once (KeyboardInterrupt), keeping the checkpoints written so far."""

    # The ranks' votes, the largest wins: a Ctrl-C outranks a SIGTERM, which outranks the clock.
    GO_ON, TIME_LIMIT, SIGTERM, CTRL_C = range(4)

    def __init__(self) -> None:
        self.requested = False  # set by the signal handler on this rank
        self.interrupted = False  # that signal was Ctrl-C (SIGINT)
        self.signal_name: str | None = None  # the agreed signal: 'SIGTERM' or 'Ctrl-C' (on any rank)
        self.previous: dict[int, Any] = {}

    @property
    def signalled(self) -> bool:
        """The ranks' agreed decision: stop because of a signal."""
        return self.signal_name is not None

    @classmethod
    def install(cls) -> StopRequest:
        request = cls()
        if threading.current_thread() is threading.main_thread():
            request.previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, request._handle)
            # Ctrl-C only where it would interrupt (not where it is ignored, as under nohup).
            if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                request.previous[signal.SIGINT] = signal.signal(signal.SIGINT, request._handle)
        return request

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if self.interrupted:  # the second Ctrl-C: no waiting for the step
                self.uninstall()
                raise KeyboardInterrupt
            self.interrupted = True
            if is_first_process():  # os.write: a print could land inside another write of stderr
                os.write(2, b"\nrelreason: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again to quit "
                            b"at once)\n")
        self.requested = True

    def uninstall(self) -> None:
        # SIGINT first: restoring SIGTERM may hand it to a handler that raises (the CLI's) at once, and Ctrl-C must
        # not be left with this request's handler then.
        for signum, previous in sorted(self.previous.items(), key=lambda item: item[0] != signal.SIGINT):
            # None: the handler before was not set from Python, so the default is the nearest to it.
            signal.signal(signum, signal.SIG_DFL if previous is None else previous)
        self.previous = {}

    def agreed(self, deadline: float, context: DistributedContext) -> bool:
        """Whether to stop after this step, decided alike on every rank (a SIGTERM on one counts for all).

        A rank that stopped alone, its own clock past the time limit or a SIGTERM reaching it first, would leave
        the others waiting in the next gradient all-reduce.
        """
        own = (self.CTRL_C if self.interrupted else self.SIGTERM if self.requested
               else self.TIME_LIMIT if time.monotonic() > deadline else self.GO_ON)
        vote = max_over_ranks(own, context)
        # The agreed reason, not this rank's flag (a SIGTERM may reach this rank after a time-limit vote):
        # every rank then reports the same reason and exits with the same status.
        self.signal_name = {self.SIGTERM: "SIGTERM", self.CTRL_C: "Ctrl-C"}.get(vote)
        return vote > self.GO_ON


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def ignore_stop_signals(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: the worker ignores Ctrl-C and SIGTERM, and keeps no run folder
    locked."""
    # Ctrl-C, and a SIGTERM sent to the whole process group (Slurm's scancel, `timeout`, kill -TERM -PGID), reach
    # the workers too: they must keep serving the step the main process finishes and checkpoints before it stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # held back since the worker started (stop_signals_held): ignored now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    release_run_folders()  # its copies: a worker outliving a killed main process must not hold the run folder


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM back while DataLoader workers start: a new worker inherits the hold and lets them in
    only once it ignores them (``ignore_stop_signals``), so a signal to the whole process group at that moment
    cannot kill it. This process gets a held-back signal as soon as the hold ends."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
