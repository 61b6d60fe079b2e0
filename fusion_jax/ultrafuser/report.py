"""The UltraFuser run's report: ``report.json`` (``{"eval_loss": {model: {domain: loss}}, "gate_weights":
{domain: {specialist: weight}}}``), the demo's checks, ``report.md``, the gate-weights and loss-curve plots
and ``run.json``; written through :mod:`fusion_jax.train.report`."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion_jax.train import report as rep

# The held-out curve "rises" when it ends above its lowest point by more than this (relative), or above
# where the stage started.
RISE_TOLERANCE = 0.005


def heldout_curve(rows: list[dict], domains: list[str]) -> list[tuple[int, float]]:
    """``[(step, mean held-out loss over domains)]`` from a stage's metrics rows (``eval/<domain>``)."""
    keys = [f"eval/{d}" for d in domains]
    return [(int(r["step"]), float(np.mean([r[k] for k in keys]))) for r in rows if all(k in r for k in keys)]


def rising(curve: list[tuple[int, float]], tol: float = RISE_TOLERANCE) -> tuple[bool, float, float, float]:
    """Whether ``curve`` ends worse than it started or than its best point: (rises, start, best, last)."""
    ys = [y for _, y in curve]
    if len(ys) < 2:
        return False, float("nan"), float("nan"), float("nan")
    start, best, last = ys[0], min(ys), ys[-1]
    return last > start or last > best * (1 + tol), start, best, last


def checks(report: dict, names: list[str], domains: list[str], stage2_heldout: list | None = None) -> dict:
    """What the demo must show: fused within 2% of the best specialist on each domain; better than every
    specialist and than the base (when there is one) on the mixed set; the matching specialist has the
    largest mean gate weight; and stage 2's held-out loss (mean over the evaluation sets) does not rise."""
    ev, gw = report["eval_loss"], report["gate_weights"]
    out = {}
    for d in domains:
        best = min(ev[n][d] for n in names)
        out[f"fused_within_2pct_{d}"] = {"pass": ev["fused"][d] <= 1.02 * best, "fused": ev["fused"][d],
                                         "best_specialist": best}
    best_mixed = min(ev[n]["mixed"] for n in names)
    out["fused_beats_all_on_mixed"] = {"pass": ev["fused"]["mixed"] < best_mixed, "fused": ev["fused"]["mixed"],
                                       "best_specialist": best_mixed}
    if "base" in ev:
        out["fused_beats_base_on_mixed"] = {"pass": ev["fused"]["mixed"] < ev["base"]["mixed"],
                                            "fused": ev["fused"]["mixed"], "base": ev["base"]["mixed"]}
    for d, n in zip(domains, names):
        top = max(gw[d], key=gw[d].get)
        out[f"gate_prefers_{n}_on_{d}"] = {"pass": top == n, "top": top, "weight": gw[d][n]}
    if stage2_heldout:
        up, start, best, last = rising(stage2_heldout)
        out["stage2_heldout_loss_not_rising"] = {"pass": not up, "start": start, "best": best, "last": last}
    return out


def _markdown(report: dict, chk: dict, timings: dict, samples: list, name: str, seed: int) -> str:
    ev, gw = report["eval_loss"], report["gate_weights"]
    doms = list(next(iter(ev.values())))
    names = list(next(iter(gw.values())))
    lines = [f"# UltraFuser: {name}", "",
             f"Seed {seed}; total wall time {timings.get('total_s', 0):.0f} s. Eval loss = mean cross-entropy "
             "(nats) on held-out response tokens; each specialist in its own prompt template, the fused model "
             "with every specialist in its own template, the base in a plain `prompt\\n` format. Lower is "
             "better; the best of each column is in bold.", ""]
    lines += rep.markdown_table(ev, doms, best="min")
    lines += ["", "Mean gate weight by domain (response tokens):", ""]
    lines += rep.markdown_table(gw, names, first="domain", fmt="{:.3f}")
    lines += ["", "Checks:", ""] + rep.check_lines(chk)
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
    rep.write_report(out_dir, report, _markdown(report, chk, timings, samples, str(c.name), int(c.seed)),
                     {"timings_s": timings, "checks": chk, "samples": samples, "config": c.to_dict(), **extra})
    rep.plot_grouped_bars(out_dir / "gate_weights.png", report["gate_weights"], title="UltraFuser gate weights by domain",
                          xlabel="evaluation domain", ylabel="mean gate weight (response tokens)",
                          legend_title="specialist", reference=1.0 / len(names))
    stages, heldout, off = {}, {}, 0
    domains = list(report["eval_loss"]["fused"])
    for st in ("stage1", "stage2"):
        rows = curves.get(st) or []
        cv = rep.curve(rows)
        if cv:
            stages[st] = [(off + s, y) for s, y in cv]
        for d in domains:
            heldout.setdefault(d, []).extend((off + s, y) for s, y in rep.curve(rows, f"eval/{d}"))
        if cv:
            off += cv[-1][0]
    panels = {"UltraFuser train loss (stage 1, then 2)": stages,
              "held-out loss of the fused model (monitor subset)": heldout}
    if zoo_curves:
        panels["demo zoo"] = {("pre-train " if n == "base" else "fine-tune ") + n: cv for n, cv in zoo_curves.items()}
    rep.plot_curves(out_dir / "loss_curves.png", panels, ylabel="loss (nats per target token)")
