"""The run report every pipeline writes: ``report.json`` (the method's fixed schema), ``report.md``,
``run.json`` (timings, checks, config, environment) and PNG plots, each written atomically.

Plot helpers take plain data (``{label: [(step, value), ...]}``, ``{group: {series: value}}``) so that a
method's report module only decides WHAT to show.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fusion_jax.utils.atomic import atomic_file


def _mpl():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_png(path: str | Path, fig) -> None:
    """Render ``fig`` and write it atomically (a killed run never leaves half a PNG)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())
    _mpl().close(fig)


Curve = Sequence[tuple[float, float]]


def plot_curves(path: str | Path, panels: Mapping[str, Mapping[str, Curve]], *, xlabel: str = "step",
                ylabel: str = "train loss", width: float = 5.2) -> None:
    """One panel per ``panels`` entry (its title), one line per series ``{label: [(x, y), ...]}``."""
    plt = _mpl()
    panels = {t: s for t, s in panels.items() if any(len(c) for c in s.values())}
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(width * n, 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for label, curve in series.items():
            if len(curve):
                xs, ys = zip(*curve)
                ax.plot(xs, ys, label=label, marker="." if len(curve) < 40 else None)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(path, fig)


def plot_grouped_bars(path: str | Path, values: Mapping[str, Mapping[str, float]], *, title: str,
                      xlabel: str, ylabel: str, legend_title: str = "", reference: float | None = None,
                      width: float = 6.4) -> None:
    """Grouped bars: one group per key of ``values``, one bar per series inside it (same series in every
    group). ``reference`` draws a dotted horizontal line (e.g. the uniform weight 1/N)."""
    plt = _mpl()
    groups = list(values)
    series = list(next(iter(values.values()))) if values else []
    fig, ax = plt.subplots(figsize=(max(width, 1.2 * len(groups) * max(1, len(series)) / 2), 3.6))
    x = np.arange(len(groups))
    w = 0.8 / max(1, len(series))
    for j, s in enumerate(series):
        ax.bar(x + (j - (len(series) - 1) / 2) * w, [values[g].get(s, np.nan) for g in groups], w, label=s)
    if reference is not None:
        ax.axhline(reference, color="gray", lw=0.8, ls=":")
    ax.set_xticks(x, groups)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if series:
        ax.legend(title=legend_title or None, fontsize=8)
    fig.tight_layout()
    save_png(path, fig)


def markdown_table(rows: Mapping[str, Mapping[str, Any]], columns: Sequence[str], *, first: str = "model",
                   fmt: str = "{:.4f}", best: str | None = None) -> list[str]:
    """Markdown lines of a ``rows x columns`` table; ``best="min"|"max"`` bolds each column's best value."""
    lines = [f"| {first} | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    bests = {}
    if best:
        for c in columns:
            vals = [r[c] for r in rows.values() if isinstance(r.get(c), (int, float)) and np.isfinite(r[c])]
            if vals:
                bests[c] = min(vals) if best == "min" else max(vals)

    def cell(v, c):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            s = fmt.format(v)
            return f"**{s}**" if c in bests and v == bests[c] else s
        return "—" if v is None else str(v)

    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(cell(r.get(c), c) for c in columns) + " |")
    return lines


def check_lines(checks: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Markdown bullets ``- name: PASS|FAIL (detail)`` for a ``{name: {"pass": bool, ...}}`` table."""
    out = []
    for k, v in checks.items():
        detail = ", ".join(f"{a}={b:.4f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items() if a != "pass")
        out.append(f"- {k}: {'PASS' if v['pass'] else 'FAIL'}" + (f" ({detail})" if detail else ""))
    return out


def write_report(out_dir: str | Path, report: Mapping[str, Any], markdown: str, run_info: Mapping[str, Any]
                 ) -> None:
    """``report.json``, ``report.md`` and ``run.json`` in ``out_dir`` (process 0 calls it)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / "report.json") as f:
        json.dump(report, f, indent=2, default=str)
    with atomic_file(out / "run.json") as f:
        json.dump(dict(run_info), f, indent=2, default=str)
    with atomic_file(out / "report.md") as f:
        f.write(markdown)


def curve(rows: Sequence[Mapping[str, Any]], key: str = "loss") -> list[tuple[int, float]]:
    """``[(step, value)]`` of ``key`` from Trainer metrics rows (``metrics.jsonl``)."""
    return [(int(r["step"]), float(r[key])) for r in rows if key in r]
