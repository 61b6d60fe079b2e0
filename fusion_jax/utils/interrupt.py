"""SIGINT and SIGTERM end a command the same way: cleanly, with nothing half-written left behind.

``kill``, ``timeout``, SLURM and ``docker stop`` send SIGTERM, whose default action kills Python without
running a single ``finally`` block, so temporary outputs would stay on disk. :func:`signals_as_interrupts`
(installed by the command-line entry points) makes both signals raise :class:`Interrupted`, a
``KeyboardInterrupt``: every ``finally`` / ``except BaseException`` cleanup runs, and the entry point
exits with the shell's conventional status for "terminated by signal N", ``128 + N`` (130 for SIGINT,
143 for SIGTERM). An interruption is not a user error, so it does not share exit status 2.

Work that must not be cut in half (handing arrays to Orbax's background writer, waiting for that writer
before its temporary files are removed) runs under :func:`deferred`: a signal arriving there is held and
raised as soon as the section ends. A second signal while cleanup runs is reported and ignored; a third
exits at once (``os._exit``), for a user who really wants out.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from typing import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when SIGINT or SIGTERM arrives under :func:`signals_as_interrupts`."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def signame(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(e: BaseException) -> int:
    """The exit status for an interruption: 128 + signal number (a bare KeyboardInterrupt is SIGINT)."""
    return e.exit_code if isinstance(e, Interrupted) else 128 + signal.SIGINT


def describe(e: BaseException) -> str:
    """``"interrupted by SIGTERM"`` plus the notes the layers it passed through added (what was kept)."""
    name = e.signame if isinstance(e, Interrupted) else "SIGINT"
    notes = [n for n in getattr(e, "__notes__", ()) if n]
    return f"interrupted by {name}" + (f": {'; '.join(notes)}" if notes else "")


class _State:
    installed = 0          # nesting depth of signals_as_interrupts
    raised = False         # an Interrupted is on its way up: later signals are cleanup-time signals
    deferring = 0          # nesting depth of deferred()
    pending: int | None = None
    extra = 0              # signals after the first one
    notice: threading.Timer | None = None


_state = _State()
_lock = threading.Lock()


def _handler(signum, frame):
    s = _state
    if (s.installed and s.raised) or s.pending is not None:
        s.extra += 1
        name = signal.Signals(signum).name
        if s.extra >= 2:
            print(f"\n{name} again: exiting without cleaning up", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        print(f"\n{name}: finishing up (waiting for writers, removing temporary files); send it again to "
              "exit at once", file=sys.stderr, flush=True)
        return
    if s.deferring:
        s.pending = signum  # raised when the critical section ends
        # say why nothing happens yet, unless the section ends within a second (the usual case)
        s.notice = threading.Timer(1.0, print, (f"\n{signal.Signals(signum).name}: stopping once the write "
                                                "in progress is complete",), {"file": sys.stderr, "flush": True})
        s.notice.daemon = True
        s.notice.start()
        return
    s.raised = bool(s.installed)
    raise Interrupted(signum)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_as_interrupts() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread while the block runs; the previous
    handlers are restored afterwards. Outside the main thread it does nothing (Python only lets the main
    thread set handlers)."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    with _lock:
        if _state.installed == 0:
            _state.raised, _state.pending, _state.extra = False, None, 0
        _state.installed += 1
    for sig in HANDLED:
        signal.signal(sig, _handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        with _lock:
            _state.installed -= 1


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while the block runs; raise :class:`Interrupted` when it ends if one came.

    Only our own handler defers (installed by :func:`signals_as_interrupts`, or here for the duration of
    the block when the main thread still has Python's default SIGINT handler). Library code calls it
    around work that must finish once started; it is a no-op outside the main thread.
    """
    if not _in_main_thread():
        yield
        return
    own = {sig: signal.getsignal(sig) for sig in HANDLED}
    # install ours only where Python's default (or nothing of ours) is in place; a handler someone else
    # installed on purpose is left alone
    swap = [sig for sig, h in own.items()
            if h is not _handler and h in (signal.default_int_handler, signal.SIG_DFL)
            and not (sig == signal.SIGTERM and h == signal.SIG_DFL and _state.installed == 0)]
    for sig in swap:
        signal.signal(sig, _handler)
    _state.deferring += 1
    try:
        yield
    finally:
        _state.deferring -= 1
        for sig in swap:
            signal.signal(sig, own[sig])
        if _state.deferring == 0 and _state.pending is not None:
            signum, _state.pending = _state.pending, None
            if _state.notice is not None:
                _state.notice.cancel()
                _state.notice = None
            _state.extra = 0
            if not (_state.installed and _state.raised):
                _state.raised = bool(_state.installed)
                raise Interrupted(signum)
