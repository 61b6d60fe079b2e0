"""A tqdm progress bar over train steps showing loss, tokens/s and ETA (process 0 only, on stderr)."""
from __future__ import annotations

import sys
import time

import jax


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool | None = None, desc: str = "train"):
        self.enabled = (jax.process_index() == 0) if enabled is None else enabled
        self._bar = None
        self._t0 = time.perf_counter()
        self._t_first: float | None = None   # end of the first step (which includes compilation)
        self._tokens = 0.0
        if self.enabled:
            from tqdm.auto import tqdm
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, smoothing=0.1)

    def update(self, step: int, loss: float, tokens: float) -> float:
        """Advance to ``step``; returns tokens/s.

        The rate counts from the end of the first step after (re)start, whose time is mostly compilation
        and would otherwise drag the reported throughput down for the whole run.
        """
        now = time.perf_counter()
        if self._t_first is None:
            self._t_first = now
            rate = tokens / max(now - self._t0, 1e-9)
        else:
            self._tokens += tokens
            rate = self._tokens / max(now - self._t_first, 1e-9)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:,.0f}", refresh=False)
            self._bar.update(step - self._bar.n)
        return rate

    def write(self, msg: str) -> None:
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)  # beside the bar (tqdm.write defaults to stdout)
        elif self.enabled:
            print(msg, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
