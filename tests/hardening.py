"""Shared machinery of the hardening suite (tests/test_hardening_*.py): how inputs are damaged, what a
clean failure is, how a command is interrupted at a chosen point, and small filesystems.

The contract every damaged input, full disk and bad output path must meet (README, "Every user
error"): exit status 2; stderr is ONE line ``error: <message>`` naming the file / field / option at
fault; no traceback; nothing at or beside the output path; the inputs byte-for-byte untouched. An
interruption (SIGINT / SIGTERM) exits 130 / 143 with one line ``interrupted by SIG...``, under the
same litter and input rules, and the same command then runs to completion.

Damage is generated, not listed: every file is truncated at several points, garbled at several
offsets and deleted; every JSON document has every value at every key path replaced by each JSON
value of another kind (null, a boolean, 0, -1, 2.5, a numeric string, a list, an object).
"""
from __future__ import annotations

import contextlib
import copy
import errno
import functools
import hashlib
import importlib
import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]

# -- JSON damage -------------------------------------------------------------------------------------
#: one value of every JSON kind (ints twice: zero and negative are range damage for counts)
JSON_VALUES: dict[str, Any] = {"null": None, "true": True, "zero": 0, "neg": -1, "float": 2.5,
                               "numstr": "64", "list": [1, 2], "object": {"a": 1}}


def kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, int):
        return "int"
    if isinstance(v, float):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        return "list"
    return "object"


def replacements(v: Any) -> dict[str, Any]:
    """The JSON values of another kind than ``v`` (for an int also 0 and -1, unless ``v`` is one)."""
    out = {}
    for name, new in JSON_VALUES.items():
        if kind(new) != kind(v) or (kind(v) == "int" and new != v and name in ("zero", "neg")):
            out[name] = new
    return out


def json_paths(doc: Any, max_keys: int | None = None, _prefix: tuple = ()) -> Iterator[tuple]:
    """Every key path of a JSON document: each object key (at most ``max_keys`` per object, first ones)
    and the first element of each list, recursively."""
    if isinstance(doc, dict):
        for k in list(doc)[:max_keys]:
            yield _prefix + (k,)
            yield from json_paths(doc[k], max_keys, _prefix + (k,))
    elif isinstance(doc, list) and doc:
        yield _prefix + (0,)
        yield from json_paths(doc[0], max_keys, _prefix + (0,))


def get_path(doc: Any, path: tuple) -> Any:
    return functools.reduce(lambda d, k: d[k], path, doc)


def with_value(doc: Any, path: tuple, value: Any) -> Any:
    doc = copy.deepcopy(doc)
    get_path(doc, path[:-1])[path[-1]] = value
    return doc


def path_str(path: tuple) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else (f".{k}" if i else str(k)) for i, k in enumerate(path))


def json_type_cases(doc: dict, max_keys: int | None = None, skip=()) -> list[tuple[str, tuple, Any]]:
    """``(case id, key path, new value)`` for every path of ``doc`` and every replacement value."""
    cases = []
    for path in json_paths(doc, max_keys):
        if path[0] in skip:
            continue
        for name, new in replacements(get_path(doc, path)).items():
            cases.append((f"{path_str(path)}={name}", path, new))
    return cases


# -- byte damage -------------------------------------------------------------------------------------
def truncation_points(size: int | Path, header_end: int | None = None) -> list[int]:
    """Where to cut a file: empty, inside any length prefix, inside the header, at its end, mid-data, one
    byte short. Given a path, cuts that only drop trailing whitespace (a text file's final newline,
    which is no damage) are left out."""
    data = None
    if isinstance(size, Path):
        data = size.read_bytes()
        size = len(data)
    pts = {0, 1, 4, 8, size // 3, size // 2, size - 1}
    if header_end is not None:
        pts |= {header_end // 2, header_end, header_end + 1}
    return sorted(p for p in pts if 0 <= p < size and (data is None or data[p:].strip()))


def garble(path: Path, offset: int, n: int = 16, seed: int = 0) -> None:
    """Overwrite ``n`` bytes at ``offset`` with deterministic random bytes that all differ from the old."""
    b = bytearray(path.read_bytes())
    rng = random.Random(seed * 1_000_003 + offset)
    for i in range(offset, min(offset + n, len(b))):
        b[i] = (b[i] + rng.randrange(1, 256)) % 256
    path.write_bytes(bytes(b))


def damage_file(path: Path, how: str, arg: Any = None) -> None:
    """``how``: truncate (arg = size), garble (arg = offset), delete, utf16, json (arg = new document)."""
    if how == "truncate":
        os.truncate(path, arg)
    elif how == "garble":
        garble(path, arg)
    elif how == "delete":
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    elif how == "utf16":
        path.write_bytes(path.read_text().encode("utf-16"))
    elif how == "json":
        path.write_text(json.dumps(arg))
    else:
        raise ValueError(how)


# -- inputs and outputs -----------------------------------------------------------------------------
def digest(*roots: Path) -> dict[str, str]:
    """Content hash (and mode) of every file, directory and link under ``roots``."""
    out = {}
    for root in roots:
        root = Path(root)
        items = [root] + (sorted(root.rglob("*")) if root.is_dir() and not root.is_symlink() else [])
        for p in items:
            st = os.lstat(p)
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_dir():
                out[str(p)] = f"dir:{st.st_mode:o}"
            else:
                out[str(p)] = f"{st.st_mode:o}:" + hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def litter(out: Path) -> list[str]:
    """What is at or beside ``out`` (and beside its resolved target): the output itself and any of our
    temporaries (``.<name>.tmp-*``, ``.<name>.old-*``)."""
    found = []
    for o in {Path(out), Path(os.path.realpath(out))}:
        if not o.parent.is_dir():
            continue
        for name in os.listdir(o.parent):
            if name == o.name and not Path(o).is_symlink() or name.startswith(f".{o.name}."):
                found.append(str(o.parent / name))
    return sorted(set(found))


class Outcome:
    def __init__(self, rc: int, out: str, err: str):
        self.rc, self.out, self.err = rc, out, err

    @property
    def lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]

    def __repr__(self):
        return f"Outcome(rc={self.rc}, err={self.err[-2000:]!r})"


def run_main(main: Callable[[list[str]], int], argv: list[str], capfd) -> Outcome:
    """Call an entry point's ``main(argv)`` in-process; an exception escaping it fails the test."""
    capfd.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except BaseException as e:  # noqa: BLE001 - whatever escapes is the bug being looked for
        err = capfd.readouterr().err
        pytest.fail(f"{argv} raised {type(e).__name__}: {e}\n{traceback.format_exc()}\nstderr: {err[-3000:]}")
    c = capfd.readouterr()
    return Outcome(rc, c.out, c.err)


def cli(argv, capfd) -> Outcome:
    from fusion_jax.cli import main
    return run_main(main, argv, capfd)


def train(argv, capfd) -> Outcome:
    from fusion_jax.train.cli import main
    return run_main(main, argv, capfd)


def assert_clean_error(o: Outcome, out: Path | None, *, names=(), inputs: dict | None = None,
                       status: int = 2, prefix: str = "error: ") -> str:
    """The contract (module docstring); returns the message."""
    assert "Traceback" not in o.err, o.err[-4000:]
    assert o.rc == status, o
    assert len(o.lines) == 1 and o.lines[0].startswith(prefix), o
    msg = o.lines[0]
    for n in names:
        assert str(n) in msg, (n, msg)
    if out is not None:
        assert litter(out) == [], litter(out)
    if inputs is not None:
        assert digest(*map(Path, inputs)) == inputs, "an input was modified"
    return msg


def snapshot(*roots) -> dict:
    """``digest`` keyed for ``assert_clean_error(inputs=...)``."""
    return digest(*map(Path, roots))


# -- interrupting at a chosen point ------------------------------------------------------------------
def _resolve(target: str):
    module, qual = target.split(":")
    owner = importlib.import_module(module)
    parts = qual.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    return owner, parts[-1]


@contextlib.contextmanager
def signal_at(target: str, n: int, sig: int, when: str = "before") -> Iterator[list]:
    """Make the ``n``-th call of ``target`` ("module:Class.method" or "module:function") send ``sig`` to
    this process, before the call runs or after it returns (``when``). Yields a list that records the
    call count when the signal was sent (empty: the point was never reached)."""
    owner, name = _resolve(target)
    own = isinstance(owner, type) and name in owner.__dict__
    raw = owner.__dict__[name] if own else getattr(owner, name)
    func = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
    counter = itertools.count(1)
    lock = threading.Lock()
    fired: list[int] = []

    @functools.wraps(func)
    def wrapper(*a, **k):
        with lock:
            i = next(counter)
        if when == "before" and i == n:
            fired.append(i)
            os.kill(os.getpid(), sig)
        r = func(*a, **k)
        if when == "after" and i == n:
            fired.append(i)
            os.kill(os.getpid(), sig)
        return r

    new = type(raw)(wrapper) if isinstance(raw, (staticmethod, classmethod)) else wrapper
    setattr(owner, name, new)
    try:
        yield fired
    finally:
        if isinstance(owner, type) and not own:
            delattr(owner, name)  # an inherited method: uncover it again
        else:
            setattr(owner, name, raw)


def subprocess_env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


def run_paused(argv: list[str], pause: str, sig: int, tmp: Path, *, train_py: bool = False,
               timeout: float = 240) -> Outcome:
    """Run a real subprocess (``fusion-jax ARGV`` or ``train.py ARGV``) that pauses at ``pause``
    ("module:qual:N", main thread), then send it ``sig`` from outside, as ``kill`` / SLURM would."""
    flag = tmp / f"paused-{time.monotonic_ns()}"
    cmd = [sys.executable, str(REPO / "tests" / "signal_runner.py"), "--pause", f"{pause}:{flag}"]
    cmd += ["--train"] if train_py else []
    cmd += ["--", *map(str, argv)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env=subprocess_env())
    t0 = time.monotonic()
    while not flag.exists():
        if p.poll() is not None or time.monotonic() - t0 > timeout:
            p.kill()
            out, err = p.communicate()
            pytest.fail(f"never reached {pause} (rc={p.returncode}): {err[-3000:]}")
        time.sleep(0.05)
    p.send_signal(sig)
    out, err = p.communicate(timeout=timeout)
    return Outcome(p.returncode, out, err)


# -- small filesystems ------------------------------------------------------------------------------
_MOUNT_OK: list[bool] = []


def can_mount() -> bool:
    """Whether this process may mount a tmpfs (root on Linux, outside most CI sandboxes)."""
    if not _MOUNT_OK:
        ok = False
        if sys.platform.startswith("linux") and os.geteuid() == 0 and shutil.which("mount"):
            import tempfile
            d = tempfile.mkdtemp(prefix="fj-mount-probe-")
            r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d], capture_output=True)
            if r.returncode == 0:
                subprocess.run(["umount", d], capture_output=True)
                ok = True
            os.rmdir(d)
        _MOUNT_OK.append(ok)
    return _MOUNT_OK[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (created) for the block."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def simulated_enospc(after_bytes: int = 20_000) -> Iterator[None]:
    """Where no tmpfs can be mounted: ``os.write`` / ``os.pwrite`` fail with ENOSPC once ``after_bytes``
    have been written, and Orbax's save fails as TensorStore reports a full disk."""
    written = [0]
    real_write, real_pwrite = os.write, os.pwrite

    def check(n):
        written[0] += n
        if written[0] > after_bytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def write(fd, data):
        if fd > 2:
            check(len(data))
        return real_write(fd, data)

    def pwrite(fd, data, offset):
        check(len(data))
        return real_pwrite(fd, data, offset)

    import orbax.checkpoint as ocp

    def ts_full(self, *a, **k):
        raise ValueError("RESOURCE_EXHAUSTED: Error writing local file: Failed to write: No space left on "
                         "device [os_error_code='28']")

    saves = [(ocp.StandardCheckpointer, "save"), (ocp.CheckpointManager, "save")]
    old = [getattr(c, n) for c, n in saves]
    os.write, os.pwrite = write, pwrite
    for c, n in saves:
        setattr(c, n, ts_full)
    try:
        yield
    finally:
        os.write, os.pwrite = real_write, real_pwrite
        for (c, n), f in zip(saves, old):
            setattr(c, n, f)


def umask(mask: int):
    """Context manager setting the process umask."""
    @contextlib.contextmanager
    def cm():
        old = os.umask(mask)
        try:
            yield
        finally:
            os.umask(old)
    return cm()

