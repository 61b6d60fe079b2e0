"""The arena's report: one table (``report.md``, ``report.json``), one plot (``arena.png``)."""
from __future__ import annotations

import os
import platform
from pathlib import Path

import numpy as np

from fusion_jax.train.report import markdown_table, save_png, write_report


def summary(row: dict) -> str:
    parts = [f"loss {d} {v:.3f}" for d, v in row.get("loss", {}).items()]
    if "math" in row:
        parts.append(f"math acc {row['math']['accuracy']:.3f}")
    if "code" in row:
        parts.append(f"code pass@1 {row['code'].get('pass@1', 0.0):.3f}")
    return ", ".join(parts)


def table_rows(report: dict) -> dict[str, dict]:
    """One flat row per contestant: losses per domain and their mean, the task metrics, status."""
    out = {}
    for name, r in report["contestants"].items():
        row: dict = {"family": r["family"], "status": r["status"]}
        if r["status"] == "ok":
            for d, v in r["loss"].items():
                row[f"loss {d}"] = v
            row["loss mean"] = float(np.mean([r["loss"][d] for d in r["loss"] if d != "mixed"]))
            if "math" in r:
                row["math acc"] = r["math"]["accuracy"]
                row["math answered"] = r["math"]["answered"]
            if "code" in r:
                row["code pass@1"] = r["code"].get("pass@1")
                row["code parses"] = r["code"].get("parses")
            row["template"] = r.get("template")
            row["build s"] = r.get("build_s")
            row["eval s"] = r.get("eval_s")
        else:
            row["note"] = r.get("reason", "")
        out[name] = row
    return out


def _stage_seconds(timings: dict) -> float:
    return float(sum(v for k, v in timings.items() if k.startswith(("build_", "eval_"))))


def markdown(report: dict, timings: dict, c, u) -> str:
    rows = table_rows(report)
    domains = report["domains"]
    ok = {n: r for n, r in rows.items() if r["status"] == "ok"}
    cols = [f"loss {d}" for d in domains] + ["loss mean", "math acc", "math answered", "code pass@1",
                                              "code parses"]
    b = report["budget"]
    lines = ["# Fusion arena", "",
             f"Every method on the demo zoo ({report['zoo']}): a base and one specialist per domain of one "
             "tokenizer and architecture. Trained methods share one budget: "
             f"{b['steps']} steps x {b['batch_per_domain']} examples per domain (UltraFuser's two stages "
             "together). Eval loss: mean response-token cross-entropy on the UltraFuser report's held-out "
             "sets (lower is better; bold: best). Math: greedy answer accuracy on held-out demo problems; "
             "answered: outputs with a final answer. Code: pass@1 (greedy) of generated function + test "
             "tasks in the sandbox; parses: outputs that are valid Python.", ""]
    lines += markdown_table({n: {k: v for k, v in r.items() if k in cols} for n, r in ok.items()}, cols,
                            first="contestant", fmt="{:.3f}")
    lines += ["", "## Contestants", "", "| contestant | family | template | build s | eval s | how |",
              "|---|---|---|---|---|---|"]
    for n, r in report["contestants"].items():
        if r["status"] == "ok":
            lines.append(f"| {n} | {r['family']} | {r['template']} | {r.get('build_s', 0):.1f} | "
                         f"{r.get('eval_s', 0):.1f} | {r['what']}" + (f"; {r['note']}" if r.get("note") else "") + " |")
        else:
            lines.append(f"| {n} | {r['family']} | — | — | — | **{r['status']}**: {r.get('reason', '')} |")
    lines += ["", "Templates: `base` = the base's pre-training format `{prompt}\\n`; `own:X` = specialist X's "
              "own template in every domain (as the UltraFuser report); `domain` = each domain in its own "
              "specialist's template (merged and multi-task models have no template of their own), the "
              "mixed set in the text template; `fused` = every specialist's template at once (one view each).",
              "", f"This run {timings.get('total_s', 0):.0f} s (zoo {timings.get('zoo_s', 0):.0f} s); the "
              f"contestants' stages took {_stage_seconds(timings):.0f} s when first computed (a rerun reuses "
              f"them); {platform.processor() or platform.machine()}, {os.cpu_count()} cores. Per-item outputs in "
              "`outputs/<contestant>/`."]
    return "\n".join(lines) + "\n"


def plot(path: Path, report: dict) -> None:
    """Left: eval loss per domain per contestant; right: the task metrics (math, code)."""
    from fusion_jax.train.report import _mpl
    plt = _mpl()
    ok = {n: r for n, r in report["contestants"].items() if r["status"] == "ok"}
    names = list(ok)
    domains = report["domains"]
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 0.9 * len(names) + 6), 4.2),
                             gridspec_kw={"width_ratios": [3, 2]})
    x = np.arange(len(names))
    w = 0.8 / max(1, len(domains))
    for j, d in enumerate(domains):
        axes[0].bar(x + (j - (len(domains) - 1) / 2) * w, [ok[n]["loss"].get(d, np.nan) for n in names], w,
                    label=d)
    axes[0].set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    axes[0].set_ylabel("eval loss (response tokens)")
    axes[0].set_title("held-out loss by domain (lower is better)")
    lo = min((v for n in names for v in ok[n]["loss"].values()), default=0.0)
    axes[0].set_ylim(bottom=max(0.0, lo - 0.5))
    axes[0].legend(fontsize=8)
    metrics = [("math", "accuracy", "math accuracy"), ("math", "answered", "math: has an answer"),
               ("code", "pass@1", "code pass@1"), ("code", "parses", "code: valid Python")]
    w2 = 0.8 / len(metrics)
    for j, (task, key, label) in enumerate(metrics):
        axes[1].bar(x + (j - (len(metrics) - 1) / 2) * w2, [ok[n].get(task, {}).get(key, np.nan) for n in names],
                    w2, label=label)
    axes[1].set_xticks(x, names, rotation=60, ha="right", fontsize=8)
    axes[1].set_ylim(0, 1)
    axes[1].set_title("task metrics (higher is better)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    save_png(path, fig)


def write_all(out_dir: Path, report: dict, timings: dict, c, u) -> None:
    out_dir = Path(out_dir)
    report = dict(report, table=table_rows(report))
    write_report(out_dir, report, markdown(report, timings, c, u),
                 {"timings": timings, "config": c.to_dict(), "ultrafuser_config": u.to_dict()})
    if any(r["status"] == "ok" for r in report["contestants"].values()):
        plot(out_dir / "arena.png", report)
