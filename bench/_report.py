"""What every benchmark script shares: its section of BENCHMARKS.md, replaced in place; the one-line
description of the machine it ran on; timing candidates in alternation.

    from _report import machine, write_section      # bench/ is the script's own directory, so it is on sys.path
    write_section("## My benchmark", f"## My benchmark\n\nMachine: {machine(libs=('jax', 'torch'))}. ...")
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def write_section(section: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace the section that starts with the heading line ``section`` (up to the next ``## `` heading)
    with ``text``, or append ``text`` when there is none; every other section stays as it is. Written
    atomically (a killed benchmark never leaves half a file); says what it wrote where."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fusion_jax.utils.atomic import atomic_file
    old = path.read_text() if path.exists() else ""
    body = text.rstrip("\n") + "\n"
    pat = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(old):
        new = pat.sub(lambda _: body + "\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + body
    with atomic_file(path) as f:
        f.write(new)
    print(f"wrote '{section}' into {path}")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()   # no /proc (macOS) or no model line (many ARM kernels)


def _version(name: str) -> str | None:
    """The installed version of the importable package ``name``, without importing it (torch alone takes
    seconds); None when it is not importable."""
    if importlib.util.find_spec(name) is None:
        return None
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:   # importable, but not installed as a distribution
        return getattr(importlib.import_module(name), "__version__", "unknown version")


def machine(*, libs: tuple[str, ...] = ("jax",)) -> str:
    """One line on where a benchmark ran: CPU model, core count, RAM, the versions of those of ``libs`` that
    are importable, and the 1-minute load average now. The load average comes last so that a caller can say
    when it was taken (``machine() + " at start"``)."""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    parts = [f"{_cpu_model()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"]
    versions = [f"{name} {v}" for name in libs if (v := _version(name)) is not None]
    if versions:
        parts.append(", ".join(versions))
    parts.append(f"load average {os.getloadavg()[0]:.1f}")
    return "; ".join(parts)


def time_call(fn: Callable[[], object]) -> float:
    """Seconds one call of ``fn`` takes (``fn`` blocks until its work is done)."""
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def alternate(fns: dict, rounds: int, *, pause_s: float = 0.0,
              after_round: Callable[[int, dict], None] | None = None) -> dict:
    """Time each callable of ``fns`` once per round for ``rounds`` rounds, rotating which one goes first
    every round, so that all candidates see the same load on a shared machine. A pause before each call
    lets the previous candidate's spinning pool threads go to sleep. ``after_round(i, times)`` is called after
    round ``i`` (progress lines). Returns ``{name: [seconds, one per round]}``."""
    names = list(fns)
    times: dict = {k: [] for k in names}
    for i in range(rounds):
        for k in names[i % len(names):] + names[:i % len(names)]:
            time.sleep(pause_s)
            times[k].append(time_call(fns[k]))
        if after_round is not None:
            after_round(i, times)
    return times
