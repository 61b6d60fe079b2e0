"""Write outputs to a temporary place and move them into place only when complete.

Nothing half-written is ever left at a user's output path: on any exception the temporary directory is
removed and the original path is untouched.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from fusion_jax.errors import FusionError


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``; rename it to ``out_dir`` on success.

    The temporary directory lives in the same parent so that the final ``rename`` is atomic on POSIX.
    With ``overwrite`` an existing ``out_dir`` is replaced only after the new one is complete.
    """
    out = Path(out_dir).absolute()
    if out.exists() and not overwrite:
        raise FusionError(f"output path {out} already exists (pass overwrite to replace it)")
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise FusionError(f"cannot write output directory {out}: {e.strerror or e}") from e
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``path`` for writing; rename it over ``path`` on success."""
    dst = Path(path).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
