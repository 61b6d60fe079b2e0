"""Benchmark: the sandbox's overhead per executed program (fusion_jax.eval.sandbox.run_program) against
the floor every program pays anyway, a bare ``python -I`` process started the same way, side by side.

Runs alternate (floor, sandbox, floor, ...) in rounds; medians are reported, for a stdlib-only
interpreter (``-S``, what HumanEval uses) and with site-packages (ToRA's numpy/sympy). Then the batched
runner's throughput on a small thread pool against bare processes on the same pool.

    python bench/sandbox.py                 # 6 rounds x 10 runs per variant, batch of 64
    python bench/sandbox.py --rounds 1 --no-write-md
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _report import machine, write_section  # noqa: E402  (bench/ is this script's directory)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SECTION = "## Sandbox"

from fusion_jax.eval.sandbox import Limits, run_program, run_programs  # noqa: E402

PROGRAM = "print(sum(range(1000)))"


def _cpu() -> float:
    """CPU seconds of this process and its reaped children (the sandboxed or bare interpreters)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def floor_once(site: bool) -> tuple[float, float]:
    """A bare child interpreter: spawn, run the program, wait (stdout to a pipe). (wall s, CPU s)"""
    t, c = time.perf_counter(), _cpu()
    subprocess.run([sys.executable, "-I", "-B"] + ([] if site else ["-S"]) + ["-c", PROGRAM],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=True)
    return time.perf_counter() - t, _cpu() - c


def sandbox_once(site: bool) -> tuple[float, float]:
    t, c = time.perf_counter(), _cpu()
    r = run_program(PROGRAM, timeout_s=10, site_packages=site)
    dt, dc = time.perf_counter() - t, _cpu() - c
    assert r.ok and r.stdout == "499500\n", r
    return dt, dc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-write-md", action="store_true")
    a = ap.parse_args()
    mach = machine(libs=()) + " at start"
    iso = run_program("pass", site_packages=False).isolation
    times = {k: [] for k in ("floor_S", "sandbox_S", "floor_site", "sandbox_site")}
    for _ in range(a.rounds):
        for _ in range(a.per_round):
            times["floor_S"].append(floor_once(False))
            times["sandbox_S"].append(sandbox_once(False))
            times["floor_site"].append(floor_once(True))
            times["sandbox_site"].append(sandbox_once(True))
    med = {k: statistics.median(w for w, _ in v) * 1e3 for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) * 1e3 for k, v in times.items()}
    # throughput of the batched runner vs bare processes on the same pool
    t = time.perf_counter()
    rs = run_programs([PROGRAM] * a.batch, workers=a.workers, limits=Limits(timeout_s=10, site_packages=False))
    batch_s = time.perf_counter() - t
    assert all(r.ok for r in rs)
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(a.workers) as pool:
        list(pool.map(lambda _: floor_once(False), range(a.batch)))
    floor_batch_s = time.perf_counter() - t
    over_S, over_site = med["sandbox_S"] - med["floor_S"], med["sandbox_site"] - med["floor_site"]
    n = a.rounds * a.per_round
    lines = [
        SECTION, "",
        f"`python bench/sandbox.py` ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC): one "
        f"tiny program (`{PROGRAM}`) per run, wall time from the caller's side; floor and sandbox "
        f"alternate, {n} runs each, medians; CPU = the caller's plus its children's (`getrusage`), which "
        f"a loaded machine inflates less than wall time. Machine: {mach}; isolation layers active here: "
        f"{', '.join(iso)}.", "",
        "| interpreter | bare `python -I` (floor) wall ms | `run_program` wall ms | overhead wall ms "
        "| floor CPU ms | `run_program` CPU ms | overhead CPU ms |",
        "|---|---|---|---|---|---|---|",
        f"| stdlib only (`-S`, HumanEval) | {med['floor_S']:.1f} | {med['sandbox_S']:.1f} | **{over_S:.1f}** "
        f"| {cpu['floor_S']:.1f} | {cpu['sandbox_S']:.1f} | {cpu['sandbox_S'] - cpu['floor_S']:.1f} |",
        f"| with site-packages (ToRA) | {med['floor_site']:.1f} | {med['sandbox_site']:.1f} | **{over_site:.1f}** "
        f"| {cpu['floor_site']:.1f} | {cpu['sandbox_site']:.1f} | {cpu['sandbox_site'] - cpu['floor_site']:.1f} |",
        "",
        f"Goal < 50 ms overhead per program: {'met' if max(over_S, over_site) < 50 else 'NOT met'}. Batched, "
        f"{a.batch} programs on {a.workers} threads: `run_programs` {a.batch / batch_s:.1f} programs/s, bare "
        f"processes {a.batch / floor_batch_s:.1f}/s ({batch_s / floor_batch_s:.2f}x the time).",
        "What the overhead buys: a private directory (created, removed), the bootstrap in the child (rlimits, "
        "a network namespace via `unshare`, the pids cgroup on root, the audit hook, compiling the program "
        "from its file), stdout/stderr through files (the file-size limit caps them), the parent's "
        "pidfd wait with the disk-quota poll, and killing the process group at the end.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not a.no_write_md:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
