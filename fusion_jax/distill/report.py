"""The FuseLLM / FuseChat run report: ``report.json``, ``report.md``, ``run.json`` and plots, written
through :mod:`fusion_jax.train.report`.

``report.json``::

    {"method": "fusellm" | "fusechat",
     "eval_nats_per_byte": {model: {domain: v, "all": v}},     # every model, comparable across tokenizers
     "eval_nats_per_token": {model: {domain: v, "all": v}},    # models of the student's tokenizer
     "stores": {name: {bytes_per_token, n_tokens, mean_seq_ce}}, "aligned": {teacher: position shares},
     "candidates": [...], "mince_choice": {...}, "checks": {name: {"pass": bool, ...}}}

Models: ``student`` (FuseChat: ``pivot``) before training, ``distilled`` (FuseChat: ``target_<source>``
and ``merged``), ``baseline`` (the same student trained without the fusion term on the same batches and
steps: FuseLLM's CLM-only baseline, FuseChat's SFT-only one) and each teacher / source.
"""
from __future__ import annotations

from pathlib import Path

from fusion_jax.train import report as rep

ALL = "all"


def _per(results: dict, unit: str, models=None) -> dict:
    out = {}
    for m, by_dom in results.items():
        if models is not None and m not in models:
            continue
        row = {d: v["nll"] / max(v[unit], 1.0) for d, v in by_dom.items()}
        row[ALL] = sum(v["nll"] for v in by_dom.values()) / max(sum(v[unit] for v in by_dom.values()), 1.0)
        out[m] = row
    return out


def checks(method: str, per_byte: dict, teachers: list[str]) -> dict:
    """What the demo should show (the papers' claims), each PASS or FAIL, never tuned to pass."""
    out = {}
    if not per_byte:
        return out
    doms = list(next(iter(per_byte.values())))
    if method == "fusellm" and "baseline" in per_byte:
        for d in doms:
            out[f"distilled_beats_clm_only_{d}"] = {"pass": per_byte["distilled"][d] < per_byte["baseline"][d],
                                                    "distilled": per_byte["distilled"][d],
                                                    "clm_only": per_byte["baseline"][d]}
    if method == "fusechat":
        for d in doms:
            out[f"merged_beats_pivot_{d}"] = {"pass": per_byte["merged"][d] < per_byte["pivot"][d],
                                              "merged": per_byte["merged"][d], "pivot": per_byte["pivot"][d]}
        if "baseline" in per_byte:
            m, b = per_byte["merged"][ALL], per_byte["baseline"][ALL]
            out["merged_beats_sft_only_all"] = {"pass": m < b, "merged": m, "sft_only": b}
    student = "student" if method == "fusellm" else "pivot"
    for t in teachers:
        out[f"teacher_{t}_better_than_{student}"] = {"pass": per_byte[t][ALL] < per_byte[student][ALL],
                                                    "teacher": per_byte[t][ALL], student: per_byte[student][ALL]}
    return out


def build(c, results: dict, info: dict, teachers: list[str]) -> dict:
    per_byte = _per(results, "bytes")
    own = {m for m in results if m not in teachers}
    report = {"method": c.method, "eval_nats_per_byte": per_byte, "eval_nats_per_token": _per(results, "tokens", own)}
    report.update(info)
    report["checks"] = checks(c.method, per_byte, teachers)
    return report


def _claim(report: dict) -> list[str]:
    """The paper's claim in one plain sentence: holds or does not, with the numbers."""
    pb = report["eval_nats_per_byte"]
    if report["method"] == "fusellm" and "baseline" in pb:
        a, b = pb["distilled"][ALL], pb["baseline"][ALL]
        doms = [d for d in pb["distilled"] if d != ALL and pb["distilled"][d] < pb["baseline"][d]]
        if a < b:
            return [f"**The paper's claim holds here:** the distilled student reaches {a:.4f} nats/byte against "
                    f"{b:.4f} for the same student trained with the CLM loss only on the same batches "
                    f"({100 * (b - a) / b:.2f}% lower; better on {len(doms)} of {len(pb['distilled']) - 1} "
                    "domains)."]
        return [f"**The paper's claim does NOT hold here:** the distilled student reaches {a:.4f} nats/byte against "
                f"{b:.4f} for the CLM-only student on the same batches (better on {len(doms)} of "
                f"{len(pb['distilled']) - 1} domains). See the teachers' margin over the student and the aligned "
                "positions' shares below for what the fusion term had to give."]
    if report["method"] == "fusechat" and "merged" in pb and "pivot" in pb:
        a, b = pb["merged"][ALL], pb["pivot"][ALL]
        s = (f"The merged model reaches {a:.4f} nats/byte, the pivot {b:.4f}"
             + (f", the pivot fine-tuned without fusion {pb['baseline'][ALL]:.4f}" if "baseline" in pb else "")
             + ", the pairwise targets " + ", ".join(f"{m[7:]} {pb[m][ALL]:.4f}" for m in pb if m.startswith("target_"))
             + ".")
        holds = a < pb.get("baseline", pb["pivot"])[ALL]
        return [("**The paper's claim holds here:** " if holds else "**The paper's claim does NOT hold here:** ") + s]
    return []


def _markdown(c, report: dict, timings: dict) -> str:
    pb, pt = report["eval_nats_per_byte"], report["eval_nats_per_token"]
    doms = list(next(iter(pb.values()))) if pb else []
    title = "FuseLLM" if c.method == "fusellm" else "FuseChat"
    lines = [f"# {title}: {c.name}", "",
             f"Seed {c.seed}; total wall time {timings.get('total_s', 0):.0f} s. Loss = held-out response "
             "cross-entropy in **nats per UTF-8 byte** of the response (every model in its own tokenizer, on the "
             "same texts; lower is better, the best of each column in bold). `baseline` is the same student "
             "trained without the fusion term (lambda = 1) on the same batches and steps.", ""]
    lines += _claim(report) + [""]
    lines += rep.markdown_table(pb, doms, best="min") + [""]
    if pt:
        lines += ["Nats per token (student tokenizer):", ""] + rep.markdown_table(pt, doms, best="min") + [""]
    lines += ["Teacher stores (the teacher pass):", ""]
    lines += rep.markdown_table(report.get("stores", {}), ["bytes_per_token", "n_tokens", "mean_seq_ce"],
                                first="store", fmt="{:.3f}") + [""]
    if report.get("aligned"):
        lines += ["Aligned student positions (share with several teacher entries / one entry, e.g. the one-hot "
                  "fallback / none):", ""]
        lines += rep.markdown_table(report["aligned"], ["multi", "single", "none", "bytes_per_token"],
                                    first="teacher", fmt="{:.3f}") + [""]
    if report.get("mince_choice"):
        lines += [f"MinCE candidate per training sequence (share): `{report['mince_choice']}`", ""]
    lines += ["Checks:", ""] + rep.check_lines(report["checks"])
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()), "",
              "![evaluation](eval.png)", "", "![loss curves](loss_curves.png)", ""]
    return "\n".join(lines)


def write_all(out_dir: Path, c, report: dict, curves: dict, zoo_curves: dict, timings: dict, extra: dict) -> None:
    out_dir = Path(out_dir)
    rep.write_report(out_dir, report, _markdown(c, report, timings),
                     {"timings_s": timings, "checks": report["checks"], "config": c.to_dict(), **extra})
    pb = report["eval_nats_per_byte"]
    if pb:
        doms = list(next(iter(pb.values())))
        rep.plot_grouped_bars(out_dir / "eval.png", {d: {m: pb[m][d] for m in pb} for d in doms},
                              title=f"{c.method}: held-out response loss", xlabel="domain",
                              ylabel="nats per byte (lower is better)", legend_title="model")
    panels = {}
    for key in ("loss", "clm_loss", "fusion_loss"):
        series = {n: rep.curve(rows, key) for n, rows in curves.items()}
        if key == "fusion_loss":
            series = {n: s for n, s in series.items() if n != "baseline"}
        panels[key] = series
    if zoo_curves:
        panels["demo zoo pre-training"] = {n: [tuple(p) for p in cv] for n, cv in zoo_curves.items()}
    rep.plot_curves(out_dir / "loss_curves.png", panels, ylabel="train loss (nats per token)")
