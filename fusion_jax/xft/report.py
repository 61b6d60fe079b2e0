"""The XFT run's report: ``report.json``, the checks, ``report.md`` and the plots (through
:mod:`fusion_jax.train.report`).

``report.json``::

    {"eval_loss": {model: {domain: loss, ..., "mean": loss}},     # base, dense_sft, moe, xft, xft_fixed
     "expert_load": {domain: [[share] * (E-1)] * L},              # routed assignments per expert (rows sum to 1)
     "experts": {"shared_drift", "routed_drift", "routed_spread": [per layer]},   # pipeline.expert_divergence
     "router": {"noise", "agreement_first", "agreement_last", "agreement_random"},  # pipeline.router_summary
     "alpha": {"softmax": [[...]] * L, "coefficients": [[lambda, ...]] * L, "max_abs_change": float},
     "steps": {"moe_sft": n, "merge": m, "dense_sft": n + m}, "domains": [...]}
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fusion_jax.train import report as rep

MODELS = {
    "base": "the dense model before any fine-tuning",
    "dense_sft": "dense SFT: the dense model fine-tuned on the same batches for the same steps (the baseline)",
    "moe": "the upcycled MoE after MoE SFT (evaluation mode: clean routing), before merge-back",
    "xft": "XFT: the MoE merged back with the learned alpha (the exported dense model)",
    "xft_fixed": "ablation: the MoE merged back with alpha fixed at ones, 0.75 W_0 + 0.25 mean(W_1..W_E-1)",
}


def checks(report: dict) -> dict:
    """The paper's claim (XFT's dense model beats dense SFT at the same data and steps, mean held-out loss
    over the domains) and the sanity of each arm (fine-tuning helps the held-out loss)."""
    ev = report["eval_loss"]
    out = {}
    if "dense_sft" in ev:
        out["xft_beats_dense_sft"] = {"pass": ev["xft"]["mean"] < ev["dense_sft"]["mean"], "xft": ev["xft"]["mean"],
                                      "dense_sft": ev["dense_sft"]["mean"]}
        out["dense_sft_improves_on_base"] = {"pass": ev["dense_sft"]["mean"] < ev["base"]["mean"],
                                             "dense_sft": ev["dense_sft"]["mean"], "base": ev["base"]["mean"]}
    out["moe_sft_improves_on_base"] = {"pass": ev["moe"]["mean"] < ev["base"]["mean"], "moe": ev["moe"]["mean"],
                                       "base": ev["base"]["mean"]}
    out["xft_improves_on_base"] = {"pass": ev["xft"]["mean"] < ev["base"]["mean"], "xft": ev["xft"]["mean"],
                                   "base": ev["base"]["mean"]}
    return out


def _findings(report: dict) -> list[str]:
    """Plain sentences on what the numbers say (the claim, where XFT gains or loses, alpha)."""
    ev, a = report["eval_loss"], report["alpha"]
    m = {k: v["mean"] for k, v in ev.items()}
    lines = []
    if "dense_sft" in m:
        d = m["xft"] - m["dense_sft"]
        verdict = "holds" if d < 0 else "does NOT hold"
        lines.append(f"- The paper's claim {verdict} here: XFT's dense model {m['xft']:.4f} vs dense SFT "
                     f"{m['dense_sft']:.4f} (mean held-out loss, difference {d:+.4f}).")
        st = report["steps"]
        lines.append(f"- Full-weight steps: dense SFT {st['dense_sft']}, XFT {st['moe_sft']} (its merge stage's "
                     f"{st['merge']} steps train only alpha, {np.size(a['softmax'])} numbers).")
        lines.append(f"- Where it comes from: the MoE itself {m['moe']:.4f} ({m['moe'] - m['dense_sft']:+.4f} vs dense "
                     f"SFT); merging it back costs {m['xft'] - m['moe']:+.4f}.")
    e = report.get("experts")
    if e:
        lines.append(f"- MoE SFT moved the shared expert by {np.mean(e['shared_drift']):.4f} and the routed experts' "
                     f"mean by {np.mean(e['routed_drift']):.4f} from the dense weights; the routed experts differ "
                     f"from their mean by {np.mean(e['routed_spread']):.4f} (relative Frobenius norms, mean over "
                     "layers).")
    r = report.get("router") or {}
    if r.get("agreement_last") is not None:
        drowned = r["agreement_last"] < r["agreement_random"] + 0.05
        lines.append(f"- Routing in training: the experts chosen under the gating noise were also the clean "
                     f"logits' choice for {r['agreement_last']:.3f} of them at the end of MoE SFT "
                     f"({r['agreement_first']:.3f} at the start; {r['agreement_random']:.3f} = chance): "
                     + ("the noise, not the learned router, chose the experts, so they could not specialise."
                        if drowned else "the learned router's preference showed through the noise."))
    lines.append(f"- Learned merge {m['xft']:.4f} vs fixed 0.75 W_0 + 0.25 mean(W_i) {m['xft_fixed']:.4f} "
                 f"(difference {m['xft'] - m['xft_fixed']:+.5f}); alpha moved by at most {a['max_abs_change']:.4f} "
                 f"from its init (softmax(alpha) in [{np.min(a['softmax']):.4f}, {np.max(a['softmax']):.4f}], "
                 f"uniform {1 / len(a['softmax'][0]):.4f}).")
    return lines


def _markdown(report: dict, chk: dict, timings: dict, name: str, seed: int) -> str:
    ev = report["eval_loss"]
    cols = list(report["domains"]) + ["mean"]
    st = report["steps"]
    lines = [f"# XFT: {name}", "",
             f"Seed {seed}; total wall time {timings.get('total_s', 0):.0f} s. Held-out loss = mean cross-entropy "
             "(nats) on response tokens, each domain in its own prompt template. Lower is better; the best of "
             "each column is in bold. Steps: MoE SFT "
             f"{st['moe_sft']} + merge {st['merge']}" + (f"; dense SFT {st['dense_sft']} (the same batches)."
                                                          if st.get("dense_sft") else "."), ""]
    lines += rep.markdown_table(ev, cols, best="min")
    lines += [""] + [f"- `{k}`: {v}" for k, v in MODELS.items() if k in ev]
    lines += ["", "Findings:", ""] + _findings(report)
    lines += ["", "Learned merge coefficients softmax(alpha) per layer (expert 0, the shared one, has the fixed "
              "weight lambda):", ""]
    soft = report["alpha"]["softmax"]
    rows = {f"layer {i}": {f"e{j + 1}": w for j, w in enumerate(row)} for i, row in enumerate(soft)}
    lines += rep.markdown_table(rows, [f"e{j + 1}" for j in range(len(soft[0]))], first="layer", fmt="{:.4f}")
    lines += ["", "Checks:", ""] + rep.check_lines(chk)
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), "",
              "![held-out loss](eval_loss.png)", "", "![loss curves](loss_curves.png)", "",
              "![router load](expert_load.png)", "", "![routing under noise](router.png)", "", "![alpha](alpha.png)",
              ""]
    return "\n".join(lines)


def _offset(rows: list, key: str, off: int) -> list:
    return [(s + off, y) for s, y in rep.curve(rows, key)]


def _heldout_mean(rows: list, domains: list, off: int = 0) -> list:
    keys = [f"eval/{d}" for d in domains]
    return [(int(r["step"]) + off, float(np.mean([r[k] for k in keys]))) for r in rows if all(k in r for k in keys)]


def write_all(out_dir: Path, report: dict, chk: dict, timings: dict, curves: dict, c, extra: dict) -> None:
    out_dir = Path(out_dir)
    rep.write_report(out_dir, report, _markdown(report, chk, timings, str(c.name), int(c.seed)),
                     {"timings_s": timings, "checks": chk, "config": c.to_dict(), **extra})
    domains = list(report["domains"])
    n_sft = int(report["steps"]["moe_sft"])
    sft, merge, dense = curves.get("moe_sft") or [], curves.get("merge") or [], curves.get("dense_sft") or []
    rep.plot_curves(out_dir / "loss_curves.png", {
        "train CE (response tokens)": {"dense SFT": rep.curve(dense, "loss"), "MoE SFT": rep.curve(sft, "ce"),
                                       "merge (alpha only)": _offset(merge, "loss", n_sft)},
        "MoE SFT balance loss (sum over layers)": {"balance loss": rep.curve(sft, "balance_loss")},
        "held-out loss (monitor subset, mean over domains)": {
            "dense SFT": _heldout_mean(dense, domains), "MoE SFT": _heldout_mean(sft, domains),
            "merged (alpha training)": _heldout_mean(merge, domains, n_sft)},
    }, ylabel="loss (nats per target token)")
    agree = rep.curve(sft, "router_agreement")
    chance = (report.get("router") or {}).get("agreement_random", 0.0)
    rep.plot_curves(out_dir / "router.png", {
        "MoE SFT: experts chosen under the gating noise that the clean router chooses too": {
            "agreement (mean over layers)": agree,
            "chance: the noise alone chooses (k / n)": [(x, chance) for x, _ in agree],
            "the router alone chooses": [(x, 1.0) for x, _ in agree]}},
        ylabel="share of the chosen experts", width=7.5)
    load = report["expert_load"]
    n = len(next(iter(load.values()))[0])
    rep.plot_heatmaps(out_dir / "expert_load.png", {f"{d}": m for d, m in load.items()},
                      xlabel="routed expert (expert 0, shared, takes every token)", ylabel="layer",
                      xticks=[str(j + 1) for j in range(n)], cbar="share of routed assignments", vmin=0.0)
    soft = report["alpha"]["softmax"]
    rep.plot_grouped_bars(out_dir / "alpha.png",
                          {f"layer {i}": {f"expert {j + 1}": w for j, w in enumerate(row)}
                           for i, row in enumerate(soft)},
                          title="learned merge weights softmax(alpha) (dotted: uniform, the fixed merge)",
                          xlabel="layer", ylabel="softmax(alpha)", legend_title="expert", reference=1.0 / len(soft[0]))
    # the models differ by a few hundredths of a nat: bars of the change from the base show it, whole losses
    # would not
    ev = report["eval_loss"]
    rep.plot_grouped_bars(out_dir / "eval_loss.png",
                          {col: {m: ev[m][col] - ev["base"][col] for m in ev if m != "base"}
                           for col in domains + ["mean"]},
                          title="held-out loss minus the base model's (lower is better)", xlabel="domain",
                          ylabel="change in loss (nats per token)", legend_title="model", reference=0.0)
