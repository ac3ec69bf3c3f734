"""Stopping a run cleanly on a signal: Ctrl-C (SIGINT), SIGTERM (what preemption, ``docker stop``,
Kubernetes and SLURM at the time limit send) and SIGUSR1 (SLURM's ``--signal=USR1@SECONDS`` warning).

The first signal asks the loop to stop after the current step, so the checkpoint holds a whole
step; the run then saves and exits with 128 + the signal's number (130, 143, 138: the code a shell
reports for a process the signal ended). A second signal aborts at once (exit 130), without saving.
Under torchrun every rank gets the signal (torchrun forwards SIGINT and SIGTERM to its workers) and
the ranks agree on the step to stop at (Trainer.stop_agreed).
"""
from __future__ import annotations

import signal
import sys

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGUSR1")
                     if hasattr(signal, name))  # Windows has no SIGUSR1


class StopFlag:
    """``with StopFlag() as stop:`` installs the handlers; ``stop.requested`` turns True at the first
    signal, ``stop.signum`` says which; the previous handlers come back on exit."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handler(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.signum = signum
        again = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"({again} again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}
