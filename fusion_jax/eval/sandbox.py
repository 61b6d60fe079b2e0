"""Run generated programs in a sandboxed subprocess: time, CPU, memory, process, file and disk limits, a
private temporary directory, no network, a minimal environment. A program that misbehaves is stopped
and reported (``Result.status`` with a ``reason``); the caller never sees an exception from it.

Layers, from the real boundary inwards (``Result.isolation`` names the ones a run actually had):

1. **Kernel limits (the real boundary).** ``setrlimit`` in the child before any generated code runs:
   RLIMIT_CPU (CPU seconds; SIGXCPU, then SIGKILL), RLIMIT_AS (address space: a memory hog gets
   MemoryError or dies), RLIMIT_FSIZE (bytes per file, also caps stdout/stderr, which go to files),
   RLIMIT_NOFILE, RLIMIT_CORE = 0, RLIMIT_NPROC (processes of the user: the kernel ignores it for root,
   so as root a per-run **pids cgroup** with ``pids.max`` bounds the process count where the cgroup
   filesystem is writable, e.g. ``/sys/fs/cgroup/pids``). The wall-time limit and the disk quota of the
   private directory are enforced from the parent, which SIGKILLs the child's whole **process group**
   (the child leads a new session) and every process left in its cgroup. **No network**: the child
   unshares a new network namespace (as root ``unshare(CLONE_NEWNET)``; otherwise with a new user
   namespace, where the kernel allows unprivileged ones): only a down loopback exists, so every
   connection fails in the kernel.
2. **Isolation of the interpreter.** ``python -I -B`` (no user site, no PYTHON* variables, no script
   directory on ``sys.path``, no bytecode writes), an environment of PATH/HOME/TMPDIR/locale only
   (HOME and TMPDIR are the private directory), cwd = a fresh private directory removed afterwards.
3. **An audit hook (defense in depth, NOT a security guarantee).** Installed by the bootstrap before
   the program is compiled into a fresh namespace: it refuses (``SandboxViolation``, a PermissionError)
   opening files for reading outside the private directory, the interpreter's stdlib and
   site-packages and ``/dev/null``/``/dev/urandom``; any write, removal, rename, link or chmod outside
   the private directory; listing other directories; every ``socket.*`` event; process creation and
   signals (``os.fork``/``os.exec*``/``os.system``/``os.posix_spawn``/``subprocess.Popen``/
   ``os.kill``...); ``ctypes``; changing rlimits. Python audit hooks can be
   evaded by a determined adversary (they only see what the interpreter reports), so they stop the
   accidents and ordinary misbehaviour of generated code (reading ``~/.ssh``, writing ``/tmp/x``, a
   fork bomb through ``os.fork``), not an attacker. Root callers have no uid boundary for files (the
   child runs as the caller's user, so it can read what the caller can unless the hook stops it).
   **For untrusted, adversarial code run the whole evaluation inside a container or VM** (gVisor,
   Firecracker, a throwaway CI job): that is where the real boundary for file access belongs.

Statuses: ``ok`` (exit 0), ``error`` (non-zero exit, e.g. an exception or failed assertion),
``timeout`` (wall or CPU time), ``memory``, ``disk`` (file size or directory quota), ``processes``
(the process limit refused a fork), ``blocked`` (the audit hook refused something, or the network is
absent), ``killed`` (another signal), ``sandbox_error`` (the sandbox itself failed to run the program;
never the program's fault). Overhead per program: see BENCHMARKS.md ("Sandbox").
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import os
import select
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from typing import Mapping, Sequence

from fusion_jax.errors import ConfigError

STATUSES = ("ok", "error", "timeout", "memory", "disk", "processes", "blocked", "killed", "sandbox_error")
VIOLATION = "SandboxViolation"


@dataclasses.dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0          # wall time
    cpu_s: float | None = None       # CPU time (default: the wall timeout, rounded up)
    memory_mb: int = 1024            # address space
    max_processes: int = 16          # processes (and threads) the program may have at once
    file_size_mb: int = 16           # largest file the program may write (stdout/stderr included)
    disk_mb: int = 64                # total size of the private directory
    max_open_files: int = 64
    max_output_bytes: int = 1 << 20  # stdout/stderr kept per stream (the rest is dropped)
    site_packages: bool = True       # allow importing installed packages (numpy, sympy); False: stdlib only
    audit_hook: bool = True          # False only to test the kernel layer on its own

    def __post_init__(self):
        for name in ("timeout_s", "memory_mb", "max_processes", "file_size_mb", "disk_mb", "max_open_files",
                     "max_output_bytes"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"sandbox {name}={getattr(self, name)}: must be > 0")
        if self.cpu_s is not None and not self.cpu_s > 0:
            raise ConfigError(f"sandbox cpu_s={self.cpu_s}: must be > 0")


@dataclasses.dataclass
class Result:
    status: str
    stdout: str
    stderr: str
    returncode: int | None
    wall_s: float
    reason: str = ""
    cpu_s: float = 0.0
    isolation: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# -- the child's bootstrap: limits, namespaces, audit hook, then the program --------------------------
_BOOTSTRAP = r'''
import os, sys, resource
cfg = CONFIG
box = cfg["box"]
os.chdir(box)
sys.argv = ["main.py"]
sys.dont_write_bytecode = True
iso = ["rlimits"]
if cfg["cgroup"]:
    try:
        with open(os.path.join(cfg["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        iso.append("pids_cgroup")
    except OSError:
        pass
NEWNET, NEWUSER = 0x40000000, 0x10000000
try:
    if hasattr(os, "unshare"):                        # Python >= 3.12
        unshare = lambda flags: os.unshare(flags) or 0  # noqa: E731
    else:
        import ctypes
        unshare = ctypes.CDLL(None, use_errno=True).unshare
    for flags in (NEWNET, NEWUSER | NEWNET):          # root; else an unprivileged user namespace
        try:
            if unshare(flags) == 0:
                iso.append("netns")
                break
        except OSError:
            pass
    del unshare
except Exception:
    pass
for name, soft, hard in cfg["rlimits"]:
    try:
        resource.setrlimit(getattr(resource, name), (soft, hard))
    except (ValueError, OSError):
        if name != "RLIMIT_NPROC":
            raise
if cfg["audit"]:
    iso.append("audit_hook")
with open(cfg["report"], "w") as f:
    f.write(" ".join(iso))
with open("main.py", encoding="utf-8") as f:
    code = compile(f.read(), "main.py", "exec")
import builtins, posixpath


class SandboxViolation(PermissionError):
    pass


def _install(box, read_dirs):
    realpath, fspath, sep = posixpath.realpath, os.fsdecode, os.sep
    box = realpath(box)
    reads = tuple(realpath(d) for d in read_dirs) + (box,)
    read_files = ("/dev/null", "/dev/urandom", "/dev/zero")
    deny_import = frozenset({"ctypes", "_ctypes", "cffi", "_cffi_backend"})
    proc = frozenset({"os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn",
                      "subprocess.Popen", "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill",
                      "resource.setrlimit", "resource.prlimit", "sys.remote_exec"})
    write1 = frozenset({"os.remove", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.truncate",
                        "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
                        "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.chown"})
    write2 = frozenset({"os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.copymode",
                        "shutil.copystat", "shutil.copytree", "shutil.move"})
    listing = frozenset({"os.listdir", "os.scandir", "glob.glob", "os.listxattr", "os.getxattr"})
    W = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def inside(path, roots, extra=()):
        if isinstance(path, int):
            return True                    # an fd the program already holds
        p = realpath(fspath(path))
        return p in extra or any(p == r or p.startswith(r + sep) for r in roots)

    def deny(event, args):
        raise SandboxViolation(f"sandbox: {event}{tuple(args)!r} is not allowed")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & W)
            if not (inside(path, (box,), ("/dev/null",)) if writing else inside(path, reads, read_files)):
                deny(event, args)
        elif event in proc or event.startswith("socket.") or event.startswith("ctypes."):
            deny(event, args)
        elif event == "import":
            if args[0] in deny_import:
                deny(event, args[:1])
        elif event in write1:
            if args and not inside(args[0], (box,)):
                deny(event, args)
        elif event in write2:
            if not (inside(args[0], (box,)) and inside(args[1], (box,))):
                deny(event, args)
        elif event in listing:
            if args and args[0] is not None and not inside(args[0], reads):
                deny(event, args)

    sys.addaudithook(hook)


if cfg["audit"]:
    _install(box, cfg["read_dirs"])
del _install, cfg, f, iso, resource
_g = {"__name__": "__main__", "__builtins__": builtins, "__file__": "main.py"}
try:
    exec(code, _g)
except SystemExit:
    raise
except BaseException as e:
    import traceback
    traceback.print_exception(type(e), e, e.__traceback__.tb_next)
    sys.exit(1)
'''


# -- process-count cgroup (root) -----------------------------------------------------------------------
_CG_LOCK = threading.Lock()
_CG_ROOT: list = []            # [path or None] once probed
_COUNTER = itertools.count()


def _pids_cgroup_root() -> str | None:
    """A directory where this process may create pids cgroups (cgroup v1 ``pids`` or a delegated v2
    subtree with the pids controller), or None."""
    with _CG_LOCK:
        if _CG_ROOT:
            return _CG_ROOT[0]
        found = None
        candidates = ["/sys/fs/cgroup/pids"]
        try:
            for line in open("/proc/self/cgroup").read().splitlines():
                if line.startswith("0::"):
                    candidates.append("/sys/fs/cgroup" + line[3:].rstrip("/"))
        except OSError:
            pass
        for c in candidates:
            probe = os.path.join(c, f"fusion-sandbox-probe-{os.getpid()}")
            try:
                os.mkdir(probe)
            except OSError:
                continue
            ok = os.path.exists(os.path.join(probe, "pids.max"))
            try:
                os.rmdir(probe)
            except OSError:
                pass
            if ok:
                found = c
                break
        _CG_ROOT.append(found)
        return found


def _make_cgroup(max_processes: int) -> str | None:
    if os.geteuid() != 0:
        return None                    # RLIMIT_NPROC does the job for other users
    root = _pids_cgroup_root()
    if root is None:
        return None
    path = os.path.join(root, f"fusion-sandbox-{os.getpid()}-{next(_COUNTER)}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_processes))
        return path
    except OSError:
        _remove_cgroup(path)
        return None


def _remove_cgroup(path: str | None) -> None:
    if not path:
        return
    for _ in range(100):
        try:
            pids = open(os.path.join(path, "cgroup.procs")).read().split()
        except OSError:
            pids = []
        for p in pids:
            try:
                os.kill(int(p), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.005)


def _user_process_count() -> int:
    """Processes (threads count too for RLIMIT_NPROC, roughly) the real user has now."""
    uid, n = os.getuid(), 0
    try:
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    if os.stat(f"/proc/{d}").st_uid == uid:
                        n += int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[17])
                except (OSError, ValueError, IndexError):
                    pass
    except OSError:
        return 0
    return n


# -- the parent side -----------------------------------------------------------------------------------
def _work_root() -> str | None:
    """Where private directories go: ``$FUSION_JAX_SANDBOX_DIR``, else ``/dev/shm`` when it is a
    writable tmpfs with >= 1 GiB free (creating and removing a directory there costs ~0.05 ms, on an ext4
    /tmp ~10 ms: a fifth of the overhead budget), else the system temp dir."""
    env = os.environ.get("FUSION_JAX_SANDBOX_DIR")
    if env:
        return env
    try:
        st = os.statvfs("/dev/shm")
        if os.access("/dev/shm", os.W_OK) and st.f_bavail * st.f_frsize >= 1 << 30:
            return "/dev/shm"
    except OSError:
        pass
    return None


def _read_dirs(site_packages: bool) -> list[str]:
    paths = sysconfig.get_paths()
    keys = ("stdlib", "platstdlib") + (("purelib", "platlib") if site_packages else ())
    out = []
    for k in keys:
        p = paths.get(k)
        if p and p not in out:
            out.append(p)
    dyn = os.path.join(paths["stdlib"], "lib-dynload")
    if dyn not in out:
        out.append(dyn)
    return out


def _env(box: str) -> dict:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": box, "TMPDIR": box, "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _dir_size(path: str) -> int:
    total = 0
    for root, dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def _read_head(path: str, limit: int) -> tuple[str, bool]:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return "", False
    return data[:limit].decode("utf-8", errors="replace"), len(data) > limit


def _rmtree(path: str) -> None:
    def fix(func, p, exc):
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=fix)


def _wait(proc, deadline: float, box: str, disk_bytes: int):
    """Wait for the child; returns (wait status, rusage, why it was killed or None)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    check_disk = 0.1
    next_disk = time.monotonic() + check_disk
    delay = 0.0005
    try:
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                return status, ru, None
            now = time.monotonic()
            why = None
            if now >= deadline:
                why = "timeout"
            elif now >= next_disk:
                next_disk = now + check_disk
                if _dir_size(box) > disk_bytes:
                    why = "disk"
            if why:
                _kill_group(proc.pid)
                _, status, ru = os.wait4(proc.pid, 0)
                return status, ru, why
            wait_s = max(0.0, min(deadline, next_disk) - now)
            if pidfd is not None:
                select.select([pidfd], [], [], wait_s)
            else:
                time.sleep(min(delay, wait_s))
                delay = min(delay * 2, 0.01)
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _classify(rc: int, stderr: str, killed_for: str | None, cpu: float, lim: Limits, cpu_limit: int):
    if killed_for == "timeout":
        return "timeout", f"wall time limit ({lim.timeout_s:g} s)"
    if killed_for == "disk":
        return "disk", f"the private directory grew past {lim.disk_mb} MB"
    if rc == 0:
        return "ok", ""
    if VIOLATION in stderr:
        line = next((ln for ln in reversed(stderr.splitlines()) if VIOLATION in ln), VIOLATION)
        return "blocked", line.strip()
    if rc < 0:
        sig = -rc
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu >= cpu_limit - 0.05):
            return "timeout", f"CPU time limit ({cpu_limit} s)"
        if sig == signal.SIGXFSZ:
            return "disk", f"file size limit ({lim.file_size_mb} MB)"
        return "killed", f"killed by {name}" + (" (possibly out of memory)" if sig in (signal.SIGSEGV,
                                                                                      signal.SIGABRT) else "")
    if "Network is unreachable" in stderr:
        return "blocked", "no network (the sandbox runs in its own network namespace)"
    if "BlockingIOError" in stderr and "Resource temporarily unavailable" in stderr:
        return "processes", f"process limit ({lim.max_processes})"
    if "MemoryError" in stderr or "Cannot allocate memory" in stderr:
        return "memory", f"memory limit ({lim.memory_mb} MB)"
    if "File too large" in stderr or "[Errno 27]" in stderr:
        return "disk", f"file size limit ({lim.file_size_mb} MB)"
    last = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {rc}"
    return "error", last


def run_program(code: str, *, stdin: str = "", limits: Limits | None = None, **limit_kw) -> Result:
    """Run ``code`` as ``main.py`` in a fresh sandbox; see the module docstring. Limits come from
    ``limits`` or keywords of :class:`Limits` (``timeout_s``, ``memory_mb``, ``cpu_s``, ...)."""
    lim = limits if limits is not None else Limits(**limit_kw)
    if limits is not None and limit_kw:
        lim = dataclasses.replace(limits, **limit_kw)
    t0 = time.perf_counter()
    work = None
    cgroup = None
    try:
        work = tempfile.mkdtemp(prefix="fusion-sandbox-", dir=_work_root())
        os.chmod(work, 0o700)
        box, io_dir = os.path.join(work, "box"), os.path.join(work, "io")
        os.mkdir(box, 0o700)
        os.mkdir(io_dir, 0o700)
        with open(os.path.join(box, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        paths = {k: os.path.join(io_dir, k) for k in ("stdin", "stdout", "stderr", "isolation")}
        with open(paths["stdin"], "w", encoding="utf-8") as f:
            f.write(stdin)
        cpu_limit = int(-(-(lim.cpu_s if lim.cpu_s is not None else lim.timeout_s) // 1))
        mb = 1 << 20
        nproc = lim.max_processes + (_user_process_count() if os.geteuid() != 0 else 0)
        rlimits = [("RLIMIT_CPU", cpu_limit, cpu_limit + 1), ("RLIMIT_AS", lim.memory_mb * mb, lim.memory_mb * mb),
                   ("RLIMIT_FSIZE", lim.file_size_mb * mb, lim.file_size_mb * mb), ("RLIMIT_CORE", 0, 0),
                   ("RLIMIT_NOFILE", lim.max_open_files, lim.max_open_files), ("RLIMIT_NPROC", nproc, nproc)]
        cgroup = _make_cgroup(lim.max_processes)
        cfg = {"box": box, "report": paths["isolation"], "cgroup": cgroup, "rlimits": rlimits,
               "read_dirs": _read_dirs(lim.site_packages),
               "audit": bool(lim.audit_hook)}
        argv = [sys.executable, "-I", "-B"] + ([] if lim.site_packages else ["-S"])
        argv += ["-c", _BOOTSTRAP.replace("CONFIG", repr(cfg), 1)]
        with open(paths["stdin"], "rb") as fin, open(paths["stdout"], "wb") as fout, \
                open(paths["stderr"], "wb") as ferr:
            proc = subprocess.Popen(argv, stdin=fin, stdout=fout, stderr=ferr, cwd=box, env=_env(box),
                                    start_new_session=True, close_fds=True)
        start = time.monotonic()
        try:
            status, ru, killed_for = _wait(proc, start + lim.timeout_s, box, lim.disk_mb * mb)
        finally:
            _kill_group(proc.pid)                      # leftovers of the group (daemonised children)
            _remove_cgroup(cgroup)
            cgroup = None
        proc.returncode = rc = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - start
        out, out_cut = _read_head(paths["stdout"], lim.max_output_bytes)
        err, err_cut = _read_head(paths["stderr"], lim.max_output_bytes)
        iso = tuple(_read_head(paths["isolation"], 200)[0].split())
        cpu = ru.ru_utime + ru.ru_stime
        st, reason = _classify(rc, err, killed_for, cpu, lim, cpu_limit)
        if out_cut or err_cut:
            reason = (reason + "; " if reason else "") + f"output cut at {lim.max_output_bytes} bytes"
        return Result(st, out, err, rc, wall, reason, cpu, iso)
    except Exception as e:  # the sandbox itself failed: say so, never raise into the evaluation
        return Result("sandbox_error", "", "", None, time.perf_counter() - t0, f"{type(e).__name__}: {e}")
    finally:
        _remove_cgroup(cgroup)
        if work is not None:
            _rmtree(work)


def run_programs(programs: Sequence[str | Mapping], *, workers: int | None = None, limits: Limits | None = None,
                 progress: bool = False, **limit_kw) -> list[Result]:
    """Run many programs on a small thread pool (each in its own sandbox); results in input order.
    An item is the code, or ``{"code": ..., "stdin": ...}``."""
    lim = limits if limits is not None else Limits(**limit_kw)
    if limits is not None and limit_kw:
        lim = dataclasses.replace(limits, **limit_kw)
    items = [p if isinstance(p, Mapping) else {"code": p} for p in programs]
    n = workers or max(1, min(len(items), os.cpu_count() or 1))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), desc="sandbox", unit="program")
    out: list[Result | None] = [None] * len(items)
    with cf.ThreadPoolExecutor(max_workers=n) as pool:
        futs = {pool.submit(run_program, it["code"], stdin=it.get("stdin", ""), limits=lim): i
                for i, it in enumerate(items)}
        for fut in cf.as_completed(futs):
            out[futs[fut]] = fut.result()
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out  # type: ignore[return-value]
