"""The run's report: ``report.json`` (the fixed schema), the demo's three checks, ``report.md``, the
gate-weights and loss-curve plots and ``run.json`` (timings, config, samples). Written atomically."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from fusion_jax.utils.atomic import atomic_file


def checks(report: dict, names: list[str], domains: list[str]) -> dict:
    """What the demo must show: fused within 2% of the best specialist on each domain, better than every
    specialist on the mixed set, and the matching specialist has the largest mean gate weight."""
    ev, gw = report["eval_loss"], report["gate_weights"]
    out = {}
    for d in domains:
        best = min(ev[n][d] for n in names)
        out[f"fused_within_2pct_{d}"] = {"pass": ev["fused"][d] <= 1.02 * best, "fused": ev["fused"][d],
                                         "best_specialist": best}
    best_mixed = min(ev[n]["mixed"] for n in names)
    out["fused_beats_all_on_mixed"] = {"pass": ev["fused"]["mixed"] < best_mixed, "fused": ev["fused"]["mixed"],
                                       "best_specialist": best_mixed}
    for d, n in zip(domains, names):
        top = max(gw[d], key=gw[d].get)
        out[f"gate_prefers_{n}_on_{d}"] = {"pass": top == n, "top": top, "weight": gw[d][n]}
    return out


def _png(path: Path, fig) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    with atomic_file(path, "wb") as f:
        f.write(buf.getvalue())


def plot_gate_weights(path: Path, gate_weights: dict, names: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doms = list(gate_weights)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = np.arange(len(doms))
    wdt = 0.8 / len(names)
    for j, n in enumerate(names):
        ax.bar(x + (j - (len(names) - 1) / 2) * wdt, [gate_weights[d][n] for d in doms], wdt, label=n)
    ax.axhline(1.0 / len(names), color="gray", lw=0.8, ls=":")
    ax.set_xticks(x, doms)
    ax.set_xlabel("evaluation domain")
    ax.set_ylabel("mean gate weight (response tokens)")
    ax.set_title("UltraFuser gate weights by domain")
    ax.legend(title="specialist")
    fig.tight_layout()
    _png(path, fig)
    plt.close(fig)


def plot_loss_curves(path: Path, curves: dict, zoo_curves: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ncol = 2 if zoo_curves else 1
    fig, axes = plt.subplots(1, ncol, figsize=(5.2 * ncol, 3.6), squeeze=False)
    ax = axes[0][0]
    off = 0
    for st in ("stage1", "stage2"):
        rows = curves.get(st) or []
        if rows:
            ax.plot([off + r["step"] for r in rows], [r["loss"] for r in rows], marker=".", label=st)
            off += rows[-1]["step"]
    ax.set_xlabel("UltraFuser step (stage 1, then stage 2)")
    ax.set_ylabel("fused train loss (response tokens)")
    ax.set_title("UltraFuser")
    ax.legend()
    if zoo_curves:
        ax = axes[0][1]
        for n, cv in zoo_curves.items():
            if cv:
                s, l = zip(*cv)
                ax.plot(s, l, label=("pre-train " if n == "base" else "fine-tune ") + n)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.set_title("demo zoo")
        ax.legend()
    fig.tight_layout()
    _png(path, fig)
    plt.close(fig)


def _markdown(report: dict, chk: dict, timings: dict, samples: list, name: str, seed: int) -> str:
    ev, gw = report["eval_loss"], report["gate_weights"]
    doms = list(next(iter(ev.values())))
    lines = [f"# UltraFuser: {name}", "",
             f"Seed {seed}; total wall time {timings.get('total_s', 0):.0f} s. Eval loss = mean cross-entropy "
             "(nats) on held-out response tokens; each specialist in its own prompt template, the fused model "
             "with every specialist in its own template, the base in a plain `prompt\\n` format.", "",
             "| model | " + " | ".join(doms) + " |", "|---|" + "---|" * len(doms)]
    for m, row in ev.items():
        lines.append(f"| {m} | " + " | ".join(f"{row[d]:.4f}" for d in doms) + " |")
    names = list(next(iter(gw.values())))
    lines += ["", "Mean gate weight by domain (response tokens):", "",
              "| domain | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for d, row in gw.items():
        lines.append(f"| {d} | " + " | ".join(f"{row[n]:.3f}" for n in names) + " |")
    lines += ["", "Checks:", ""]
    for k, v in chk.items():
        detail = ", ".join(f"{a}={b:.4f}" if isinstance(b, float) else f"{a}={b}" for a, b in v.items() if a != "pass")
        lines.append(f"- {k}: {'PASS' if v['pass'] else 'FAIL'} ({detail})")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), "",
              "![gate weights](gate_weights.png)", "", "![loss curves](loss_curves.png)", ""]
    if samples:
        lines += ["Greedy samples of the fused model:", ""]
        for s in samples:
            lines += [f"**{s['domain']}** prompt: `{s['prompt'][:120]!r}`", "", "```", s["output"], "```", ""]
    return "\n".join(lines)


def write_all(out_dir: Path, report: dict, chk: dict, timings: dict, samples: list, curves: dict,
              zoo_curves: dict, c, names: list[str], extra: dict) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / "report.json") as f:
        json.dump(report, f, indent=2)
    with atomic_file(out_dir / "run.json") as f:
        json.dump({"timings_s": timings, "checks": chk, "samples": samples, "config": c.to_dict(), **extra},
                  f, indent=2, default=str)
    plot_gate_weights(out_dir / "gate_weights.png", report["gate_weights"], names)
    plot_loss_curves(out_dir / "loss_curves.png", curves, zoo_curves)
    with atomic_file(out_dir / "report.md") as f:
        f.write(_markdown(report, chk, timings, samples, str(c.name), int(c.seed)))
