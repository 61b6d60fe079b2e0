"""Orbax / TensorStore failures as one readable line, without the noise they make around it.

* :func:`summarize`: TensorStore errors carry the whole TensorStore spec as JSON (kilobytes) and Orbax
  wraps them in exceptions whose text is a bound-method repr; keep the status and the first sentence,
  e.g. ``OUT_OF_RANGE: Error reading "embed.embedding/0.0" ...: Requested byte range [0, 37889) is not
  valid for value of size 100``.
* :func:`quiet_orbax_noise`: after a failed read Orbax closes its private event loop while other
  TensorStore reads are still in flight; when they finish, their done-callbacks hit the closed loop and
  Python prints ``RuntimeError: Event loop is closed`` tracebacks (as "unraisable" exceptions) after the
  real error, sometimes at interpreter exit, and the abandoned Orbax coroutines, when finalized, print
  "Exception ignored in: <coroutine ...>" with the TensorStore spec (kilobytes) or, never started,
  "RuntimeWarning: coroutine '...' was never awaited". Orbax also logs every
  exception its threads hand back to the caller, with its traceback, at ERROR through absl, and asyncio
  logs "Task/Future exception was never retrieved" for the abandoned Orbax tasks and TensorStore reads.
  All of these are dropped (the caller reports the error once); everything else passes through
  unchanged. (This module imports neither Orbax nor TensorStore.)
"""
from __future__ import annotations

import logging
import re
import sys
import traceback
import warnings

_STATUS = re.compile(r"\b(NOT_FOUND|OUT_OF_RANGE|DATA_LOSS|FAILED_PRECONDITION|INVALID_ARGUMENT|"
                     r"RESOURCE_EXHAUSTED|PERMISSION_DENIED|UNKNOWN|INTERNAL|ABORTED|ALREADY_EXISTS|"
                     r"UNAVAILABLE|CANCELLED|DEADLINE_EXCEEDED|UNIMPLEMENTED): ")
_CUTS = (" [tensorstore_spec", "; tensorstore_spec", " [source locations=", " See full TensorStore details",
         "tensorstore_spec=")


def _chain(e: BaseException):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def summarize(e: BaseException, limit: int = 400) -> str:
    """One line for ``e``: the innermost TensorStore status message in its chain, else its first line."""
    best = None
    for x in _chain(e):
        text = str(x)
        m = _STATUS.search(text)
        if m:
            best = text[m.start():]
    if best is None:
        first = (str(e).strip().splitlines() or [""])[0]
        best = f"{type(e).__name__}: {first}" if first else type(e).__name__
    for cut in _CUTS:
        i = best.find(cut)
        if i > 0:
            best = best[:i]
    best = best.strip().splitlines()[0] if best.strip() else best
    return best if len(best) <= limit else best[:limit - 3] + "..."


def _is_closed_loop_callback(exc: BaseException | None) -> bool:
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
            return True
        tb = tb.tb_next
    return False


def _is_orbax_coroutine(obj) -> bool:
    """An Orbax coroutine finalized after its gather was abandoned: the error it raises on the way out is
    a consequence of the failure already reported to the caller (or of interpreter shutdown)."""
    code = getattr(obj, "cr_code", None)
    return code is not None and "/orbax/" in code.co_filename.replace("\\", "/")


def _unraisable_hook(unraisable, _next=None):
    if _is_closed_loop_callback(unraisable.exc_value) or _is_orbax_coroutine(unraisable.object):
        return
    (_unraisable_hook.previous or sys.__unraisablehook__)(unraisable)


_unraisable_hook.previous = None


def _show_warning(msg):
    # "RuntimeWarning: coroutine '...' was never awaited": the warning's source is the coroutine, an Orbax
    # one abandoned after a failure the caller reports (warnings.warn(..., source=coro) reaches this hook)
    if _is_orbax_coroutine(getattr(msg, "source", None)):
        return
    _show_warning.previous(msg)


_show_warning.previous = None


class _OrbaxReRaisedFilter(logging.Filter):
    """Drops the logs of exceptions that Orbax hands back to its caller (who reports them): Orbax's own
    ERROR records with a traceback, and asyncio's "Task exception was never retrieved" for an Orbax
    coroutine abandoned after the first failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR:
            return True
        if record.name == "asyncio":
            # "Task/Future exception was never retrieved": the Orbax frames are in the message for a task,
            # in the attached traceback for a gathering future; a TensorStore read's own future has no
            # Python frames, only its error, which starts with a TensorStore status ("OUT_OF_RANGE: ...")
            try:
                text = record.getMessage()
                exc = record.exc_info[1] if record.exc_info else None
                if exc is not None:
                    if _STATUS.match(str(exc)):
                        return False
                    text += "".join(traceback.format_exception(*record.exc_info))
            except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
                return True
            return "/orbax/" not in text.replace("\\", "/")
        path = (record.pathname or "").replace("\\", "/")
        return not ("/orbax/" in path and (record.exc_info or "raised an exception" in str(record.msg)))


_FILTER = _OrbaxReRaisedFilter()


def quiet_orbax_noise() -> None:
    """Install the filters of the module docstring (idempotent; call before using Orbax)."""
    if sys.unraisablehook is not _unraisable_hook:
        _unraisable_hook.previous = sys.unraisablehook
        sys.unraisablehook = _unraisable_hook
    if getattr(warnings, "_showwarnmsg", _show_warning) is not _show_warning:
        _show_warning.previous = warnings._showwarnmsg
        warnings._showwarnmsg = _show_warning
    for name in ("absl", "orbax", "asyncio"):
        lg = logging.getLogger(name)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)
