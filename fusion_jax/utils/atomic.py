"""Write outputs to a temporary place and move them into place only when complete.

Nothing half-written is ever left at a user's output path: on any exception (a full disk, Ctrl-C, SIGTERM
under the command-line entry points) the temporary directory is removed and the original path is
untouched.

* The temporary directory sits beside the RESOLVED target: when the output path is a symlink (even one to
  a directory not created yet, perhaps on another filesystem) the data is written next to where it will
  live, so the final ``rename`` is atomic and cannot fail with "cross-device link" after hours of work.
* Outputs get the modes any new file would get (``0777`` / ``0666`` less the umask), not ``mkdtemp``'s
  private ``0700``.
* A full disk, a read-only filesystem or a file where a directory belongs becomes an
  :class:`~fusion_jax.errors.OutputError` naming the output, with the temporary data removed.
* A temporary directory holds a marker file (process id, host, process start time). A run that was
  killed outright (SIGKILL, power loss) cannot clean up, so the next write of the same output removes
  such directories whose process is gone. Directories without our marker are never touched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from fusion_jax.errors import ConfigError, FusionError, OutputError
from fusion_jax.utils import interrupt, oserrors

MARKER = ".fusion_jax-tmp.json"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``os.umask`` sets it, which is
    not thread-safe, so it is only the fallback)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def resolve_output(path: str | os.PathLike) -> Path:
    """The real location an output path names: absolute, every symlink followed (also a dangling one at
    the end: its target is where the user wants the data)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def check_writable_dir(path: str | os.PathLike, option: str) -> None:
    """Raise :class:`OutputError` naming ``option`` unless ``path`` is (or can be made) a directory we
    can write: not a file, under no file, not on a read-only filesystem, not without permission."""
    p = resolve_output(path)
    if p.exists() and not p.is_dir():
        raise OutputError(f"{option}: {path} is a file, not a directory")
    a = p
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise OutputError(f"{option}: cannot create {path}: {a} is a file, not a directory")
    if not os.access(a, os.W_OK | os.X_OK):
        try:
            readonly = bool(os.statvfs(a).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):
            readonly = False
        why = "is on a read-only filesystem" if readonly else "is not writable (permission denied)"
        raise OutputError(f"{option}: cannot write {path}: {a} {why}")


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` (Linux ``/proc``), to tell a live process from a later one with the same id."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _write_marker(d: Path) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
    (d / MARKER).write_text(json.dumps(info))


def _owner_alive(marker: Path) -> bool:
    """Whether the process that made this temporary directory may still be using it (True when unsure)."""
    try:
        info = json.loads(marker.read_text())
        pid, host = int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    if host != socket.gethostname():
        return True  # another host on a shared filesystem: we cannot tell
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    start = _process_start(pid)
    return start is None or info.get("start") is None or start == info.get("start")


def remove_stale_temporaries(out: str | os.PathLike) -> list[Path]:
    """Remove our temporary directories beside ``out`` left by runs that no longer exist; returns them.

    ``.<name>.old-*`` (the previous output, moved aside while an ``overwrite`` swaps in the new one) is
    removed only once ``out`` exists again, so a crash in the middle of the swap never loses both.
    """
    out = resolve_output(out)
    removed = []
    try:
        candidates = list(out.parent.glob(f".{out.name}.tmp-*")) + (
            list(out.parent.glob(f".{out.name}.old-*")) if out.exists() else [])
    except OSError:
        return removed
    for d in candidates:
        marker = d / MARKER
        if d.is_dir() and not d.is_symlink() and marker.is_file() and not _owner_alive(marker):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


def _chmod_new(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _check_inputs(out: Path, shown, inputs: Iterable) -> None:
    for inp in inputs:
        if inp is None:
            continue
        r = resolve_output(inp)
        if r == out or out in r.parents:
            raise ConfigError(f"output {shown} holds the input {inp}: replacing it would delete the input "
                              "(choose another output directory)")


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, overwrite: bool = False, *,
                     inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``out_dir``'s real location; rename it there on success.

    With ``overwrite`` an existing output is replaced only after the new one is complete, and never when
    it holds one of ``inputs`` (that would delete an input). See the module docstring for symlinks,
    modes, full disks and stale temporaries.
    """
    shown = Path(out_dir)
    out = resolve_output(out_dir)
    if out.exists():
        if not overwrite:
            raise FusionError(f"output path {shown} already exists (pass overwrite to replace it)")
        if not out.is_dir():
            raise OutputError(f"output path {shown} exists and is not a directory")
        _check_inputs(out, shown, inputs)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write output directory {shown}: {oserrors.describe(e)}") from e
    try:
        with interrupt.deferred():  # a marker-less temporary directory could never be cleaned up
            _write_marker(tmp)
            _chmod_new(tmp, True)
        yield tmp
        with interrupt.deferred():  # the swap is two renames: do not stop between them
            # (missing when the block replaced tmp itself, e.g. a nested atomic_directory(tmp, overwrite))
            (tmp / MARKER).unlink(missing_ok=True)
            if out.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
                _write_marker(old)
                os.rename(out, old / "x")
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
    except BaseException as e:
        with interrupt.deferred():
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, KeyboardInterrupt):
            e.add_note(f"{shown} was not written")
        elif isinstance(e, OSError) and oserrors.is_environment_error(e):
            raise OutputError(f"cannot write {shown}: {oserrors.describe(e, path='')}; nothing was "
                              "written") from e
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator:
    """Open a temporary file beside ``path``'s real location for writing; rename it there on success.

    The file gets the mode of the file it replaces, else ``0666`` less the umask. A full disk or a
    read-only filesystem is an :class:`~fusion_jax.errors.OutputError` naming ``path``.
    """
    shown = Path(path)
    dst = resolve_output(path)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.tmp-", dir=dst.parent)
    except OSError as e:
        raise OutputError(f"cannot write {shown}: {oserrors.describe(e)}") from e
    try:
        with os.fdopen(fd, mode) as f:
            if dst.is_file():
                os.chmod(tmp, dst.stat().st_mode & 0o7777)
            else:
                _chmod_new(Path(tmp), False)
            yield f
        os.replace(tmp, dst)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and oserrors.is_environment_error(e):
            raise OutputError(f"cannot write {shown}: {oserrors.describe(e, path='')}; nothing was "
                              "written") from e
        raise
