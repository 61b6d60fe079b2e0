"""Operating-system errors a user can cause or fix (full disk, read-only filesystem, a file where a
directory belongs, no permission), turned into one line that names the path.

Both Python's ``OSError`` and the errors TensorStore (under Orbax) reports as text, such as
``RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']``, are recognised.
"""
from __future__ import annotations

import errno
import os
import re

#: errnos that describe the user's environment rather than a bug: they become exit 2 with a message
ENVIRONMENT_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.EISDIR,
    errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.EFBIG, errno.EIO, errno.EXDEV, errno.EMFILE,
    errno.ENFILE,
})
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})

_TS_CODE = re.compile(r"\[os_error_code='?(\d+)'?\]")
_TEXT = {os.strerror(n): n for n in ENVIRONMENT_ERRNOS}


def errno_of(e: BaseException) -> int | None:
    """The errno behind ``e`` or any exception in its cause/context chain (also TensorStore's text)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno is not None:
            return e.errno
        text = str(e)
        m = _TS_CODE.search(text)
        if m:
            return int(m.group(1))
        for msg, n in _TEXT.items():
            if msg in text:
                return n
        e = e.__cause__ or e.__context__
    return None


def is_environment_error(e: BaseException) -> bool:
    return errno_of(e) in ENVIRONMENT_ERRNOS


def describe(e: BaseException, path=None) -> str:
    """``"<path>: No space left on device"`` (the path from ``path``, else the exception's filename)."""
    n = errno_of(e)
    what = os.strerror(n) if n is not None else str(e)
    where = path if path is not None else getattr(e, "filename", None)
    msg = f"{where}: {what}" if where else what
    if n in NO_SPACE:
        msg += " (free some space, or write the output elsewhere)"
    elif n == errno.EROFS:
        msg += " (choose an output on a writable filesystem)"
    return msg
