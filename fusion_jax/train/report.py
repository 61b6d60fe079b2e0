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


def plot_heatmaps(path: str | Path, panels: Mapping[str, Sequence[Sequence[float]]], *, xlabel: str, ylabel: str,
                  xticks: Sequence[str] | None = None, yticks: Sequence[str] | None = None, cbar: str = "",
                  vmin: float | None = None, vmax: float | None = None, width: float = 4.2) -> None:
    """One heatmap per ``panels`` entry (its title: a ``[rows, cols]`` matrix), annotated with the values,
    one shared colour scale (``vmin``/``vmax``, default the data's range)."""
    plt = _mpl()
    mats = {t: np.asarray(m, np.float64) for t, m in panels.items()}
    lo = min(float(m.min()) for m in mats.values()) if vmin is None else vmin
    hi = max(float(m.max()) for m in mats.values()) if vmax is None else vmax
    n = max(1, len(mats))
    rows = max((m.shape[0] for m in mats.values()), default=1)
    fig, axes = plt.subplots(1, n, figsize=(width * n + 1.0, 2.2 + 0.4 * rows), squeeze=False,
                             layout="constrained")
    im = None
    for ax, (title, m) in zip(axes[0], mats.items()):
        im = ax.imshow(m, vmin=lo, vmax=hi, cmap="viridis", aspect="auto")
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < lo + 0.5 * (hi - lo) else "black")
        ax.set_xticks(range(m.shape[1]), xticks if xticks is not None else range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]), yticks if yticks is not None else range(m.shape[0]))
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    if im is not None:
        fig.colorbar(im, ax=list(axes[0]), label=cbar, shrink=0.9)
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
