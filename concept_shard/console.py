"""The programs' console lines through Python's `logging`: the logger "concept", one message per line
as the programs have always printed them ("[train] step=...", "[data] ...").

Levels: progress and notices at INFO; lines that say WARNING at WARNING; detail at DEBUG (every
metric of every logged step). `concept-train -q` shows warnings and errors only, `-v` adds the
detail; CONCEPT_LOG_LEVEL (DEBUG, INFO, WARNING, ...) does the same for processes started by
torchrun, srun or sbatch. Library callers configure the "concept" logger as any other.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import logging
import os
import sys

LOGGER = logging.getLogger("concept")
LEVEL_ENV = "CONCEPT_LOG_LEVEL"


def say(line: str) -> None:
    """One console line at the level its text says: WARNING when it says so, else INFO."""
    LOGGER.log(logging.WARNING if "WARNING" in line[:60] else logging.INFO, line)


def detail(line: str) -> None:
    LOGGER.debug(line)


def stdout_gone() -> None:
    """The reader of our stdout has left (`concept-shard build ... | head -1`): point stdout at
    /dev/null, so that what is still printed goes nowhere and no later write, nor the
    interpreter's last flush, raises BrokenPipeError again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


class _ProgramStdout(io.TextIOBase):
    """A program's sys.stdout: its text stream, except that a closed pipe silences it instead of
    raising BrokenPipeError from whichever print or log line meets it first, which would stop
    the work half-way (a build before its merge) for want of a reader of its report."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            stdout_gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            stdout_gone()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()

    @property
    def encoding(self) -> str:
        return self._stream.encoding

    @property
    def errors(self) -> str | None:
        return self._stream.errors

    def __getattr__(self, name: str):  # buffer, reconfigure, line_buffering, mode, ...: the stream's
        return getattr(self._stream, name)


def setup(quiet: bool = False, verbose: bool = False) -> int:
    """Lines of the "concept" logger to stdout, bare, at the level the flags (else CONCEPT_LOG_LEVEL,
    else INFO) ask for; returns that level. Called once by a program's main()."""
    if quiet or verbose:
        level = logging.WARNING if quiet else logging.DEBUG
    else:
        name = os.environ.get(LEVEL_ENV, "INFO").strip().upper()
        level = logging.getLevelName(name) if isinstance(logging.getLevelName(name), int) else logging.INFO
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for old in [h for h in LOGGER.handlers if getattr(h, "_concept", False)]:
        LOGGER.removeHandler(old)
    handler._concept = True  # ours: a second setup() replaces it
    LOGGER.addHandler(handler)
    LOGGER.setLevel(level)
    LOGGER.propagate = False
    return level


# The collector's youngest generation is collected every 700 allocations by default. A program's
# imports (torch, pandas, scipy, numba, ...) make about a million objects that live as long as the
# process, and training makes many short-lived ones: the default walks the young ones thousands of
# times for nothing (a 20-step concept-train: 7.8 s -> 6.3 s at 50,000). Objects without cycles
# are freed by reference counting either way; cyclic garbage waits a little longer.
PROGRAM_GEN0 = 50_000


def collect_rarely() -> tuple[int, ...]:
    """Raise the youngest generation's threshold to PROGRAM_GEN0 (a threshold of 0, collection
    switched off, stays off); returns the thresholds before."""
    before = gc.get_threshold()
    if before[0]:
        gc.set_threshold(max(before[0], PROGRAM_GEN0), *before[1:])
    return before


@contextlib.contextmanager
def few_collections():
    """The collector's youngest generation collected every PROGRAM_GEN0 allocations for the block
    (a program module's top-level imports, which run before `program` takes over), then as before,
    also when the block raises: a library caller importing the module keeps its own settings."""
    before = collect_rarely()
    try:
        yield
    finally:
        gc.set_threshold(*before)


def program(main):
    """For a program's `main(argv=None)`. Run as a program (no argv: the console script, `python -m`,
    torchrun, srun), its collector runs every PROGRAM_GEN0 allocations, and the process leaves
    without the interpreter's last garbage collections, which walk every object torch and the other
    libraries made, to free memory the process gives back anyway (~0.8 s of each exit, measured on
    concept-train). Everything is written and closed by then; atexit handlers and finalizers still
    run. Its stdout goes quiet when its reader leaves (_ProgramStdout) and the work goes on. A
    caller passing argv keeps its collector and its stdout as they are."""

    @functools.wraps(main)
    def run(argv=None):
        if argv is None:
            collect_rarely()
            if sys.stdout is not None and not isinstance(sys.stdout, _ProgramStdout):
                sys.stdout = _ProgramStdout(sys.stdout)
        code = main(argv)
        if argv is None:
            sys.stdout.flush()
            gc.freeze()
        return code

    return run
