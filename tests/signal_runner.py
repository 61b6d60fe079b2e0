"""Run ``fusion-jax`` (or, with ``--train``, ``train.py``) in this process, pausing at a chosen point so
that a test can send a real signal from outside at a known moment (tests/hardening.py ``run_paused``).

    python tests/signal_runner.py --pause module:Qual.name:N:FLAGFILE [--train] -- ARGV...

At the N-th call of the target (made from the main thread) the runner creates FLAGFILE and sleeps
(up to 120 s, in the main thread, where Python delivers signals) until a signal comes, then carries on
with the call. A signal that arrives inside a section where fusion-jax holds signals (an Orbax write in
progress) ends the pause too: it is then raised when the section ends.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import sys
import time
from pathlib import Path


def _install_pause(spec: str) -> None:
    module, qual, n, flag = spec.split(":", 3)
    owner = importlib.import_module(module)
    parts = qual.split(".")
    for p in parts[:-1]:
        owner = getattr(owner, p)
    name = parts[-1]
    raw = getattr(owner, name)  # (inherited methods too: the wrapper then shadows them on this class)
    counter = itertools.count(1)

    @functools.wraps(raw)
    def wrapper(*a, **k):
        if next(counter) == int(n):
            Path(flag).touch()
            from fusion_jax.utils import interrupt
            t0 = time.monotonic()
            while time.monotonic() - t0 < 120 and interrupt._state.pending is None:
                time.sleep(0.02)  # the signal's handler raises here (or, held, sets pending)
        return raw(*a, **k)

    setattr(owner, name, wrapper)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pause", required=True)
    ap.add_argument("--train", action="store_true")
    ap.add_argument("argv", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    argv = a.argv[1:] if a.argv[:1] == ["--"] else a.argv
    _install_pause(a.pause)
    if a.train:
        from fusion_jax.train.cli import main as entry
        return entry(argv, prog="train.py")
    from fusion_jax.cli import main as entry
    return entry(argv)


if __name__ == "__main__":
    sys.exit(main())
