"""Stop a run cleanly on a signal: SLURM sends SIGTERM at a time limit or preemption (or the signal
asked for with `sbatch --signal`, SIGUSR1 in tools/slurm/train.sbatch), a user presses Ctrl-C.

The handler only records the signal; the loop asks before the first step and after each step, every
rank agrees (a signal may reach one rank first), and the run writes a checkpoint and exits with
RESUMABLE. A second Ctrl-C stops at once, as Python does without this. concept-train holds the
handlers from start-up to exit (nested StopSignals pass what they received on): a signal while the
run starts stops it before its first step, and one after its last step, while the final checkpoint
is written or the process exits, loses nothing (the run finished; exit 0).
"""

from __future__ import annotations

import signal
import threading

import torch

from ..data.deliver.workers import STOP_SIGNALS  # the loader's workers ignore them

# the exit status of a run stopped by a signal after writing its checkpoint: EX_TEMPFAIL (sysexits.h,
# "try again later"); tools/slurm/train.sbatch requeues the job on it
RESUMABLE = 75


class StopSignals:
    """A context that turns STOP_SIGNALS into a request to stop after the current step."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            outer = self._outer()
            if outer is not None and self.received is None:  # received while the run started up
                self.received = outer.received
        return self

    def __exit__(self, *exc) -> None:
        outer = self._outer()
        if outer is not None and outer.received is None:
            outer.received = self.received
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _outer(self) -> StopSignals | None:
        """The StopSignals this one is nested in (concept-train's, around start-up and exit)."""
        outer = getattr(self._previous.get(signal.SIGTERM), "__self__", None)
        return outer if isinstance(outer, StopSignals) else None

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: do not wait for the checkpoint
        if self.received is None:
            self.received = signum

    def agreed(self, d) -> str | None:
        """The name of the signal any rank received, the same on every rank (one collective per
        step when several processes run); None if none did."""
        received = self.received or 0
        if d.world_size > 1:
            flag = torch.tensor([received], dtype=torch.int64, device=d.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            received = int(flag.item())
        return signal.Signals(received).name if received else None
