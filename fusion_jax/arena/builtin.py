"""The contestants this install has: the zoo's own models, the multi-task baseline, every weight-merging
method (through ``fusion_jax.merging.merge``, the file-based mergekit-compatible executor) and UltraFuser
(through its own pipeline). Each is ``fn(ctx) -> Entry`` (see :mod:`fusion_jax.arena.contestants`)."""
from __future__ import annotations

import json
from pathlib import Path

from fusion_jax.arena.contestants import Context, Entry


def base(ctx: Context) -> Entry:
    return Entry(str(ctx.family.base_dir), "base", "pre-trained on plain prompt\\nresponse documents")


def specialist(ctx: Context) -> Entry:
    return Entry(str(ctx.family.specialist_dir(ctx.name)), f"own:{ctx.name}",
                 f"fine-tuned from the base on {ctx.name} in its own template")


# -- the multi-task baseline -------------------------------------------------------------------------------
def multitask(ctx: Context) -> Entry:
    """The base fine-tuned on every domain at once (each example in its domain's specialist template,
    ``budget.batch_per_domain`` examples of each domain per step, ``budget.steps`` steps): what the fusion
    papers compare against, at UltraFuser's budget."""
    from flax import nnx

    from fusion_jax import hf
    from fusion_jax import sharding as shd
    from fusion_jax.data.templates import render_dataset, template_from_format
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.models import abstract_model, param_logical_axes
    from fusion_jax.train.losses import nnx_causal_lm_loss
    from fusion_jax.train.run import train_on_arrays
    out = ctx.work_dir() / "model"
    if (out / "config.json").is_file():
        return Entry(str(out), "domain", _multitask_note(ctx))
    tok = load_tokenizer(ctx.family.tokenizer_dir)
    corpus = ctx.family.corpus()
    rows = {}
    for d in ctx.domains:
        exs = [dict(e, domain=d) for e in corpus[d]["train"][: ctx.budget.train_examples or None]]
        r = render_dataset(tok, exs, template_from_format(d, ctx.formats[d], bos=tok.bos_token_id is not None),
                           ctx.seq_len, domains=(d,), max_prompt_len=ctx.max_prompt_len)
        rows[d] = {k: r[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    cfg, params = hf.load(ctx.family.base_dir)
    graphdef = nnx.split(abstract_model(cfg), nnx.Param)[0]
    axes = param_logical_axes(cfg)
    mt = ctx.config.multitask
    run = {"steps": ctx.budget.steps, "batch": ctx.budget.batch_per_domain,
           "learning_rate": float(mt.learning_rate), "warmup_steps": int(mt.warmup_steps)}
    params, _ = train_on_arrays(nnx_causal_lm_loss(graphdef), params, axes, rows, run, ctx.work_dir() / "train",
                                ctx.mesh, int(ctx.config.seed) + 7, ctx.trainer, "multi-task fine-tune")
    hf.save(shd.host_tree(params), cfg, out, source_dir=ctx.family.tokenizer_dir)
    return Entry(str(out), "domain", _multitask_note(ctx))


def _multitask_note(ctx: Context) -> str:
    b = ctx.budget
    return (f"{b.steps} steps x {b.batch_per_domain} examples per domain, lr "
            f"{float(ctx.config.multitask.learning_rate):g}, each domain in its specialist's template")


# -- weight merging ------------------------------------------------------------------------------------------
def merge_config(ctx: Context, method: str) -> dict:
    """The mergekit-style config of one merge contestant (``ctx.config.merges.<method>``)."""
    p = ctx.config.merges[method].to_dict() if hasattr(ctx.config.merges[method], "to_dict") \
        else dict(ctx.config.merges[method])
    base_dir = str(ctx.family.base_dir)
    specs = [str(ctx.family.specialist_dir(d)) for d in ctx.domains]
    if method == "slerp":
        a, b = [str(ctx.family.specialist_dir(d)) for d in p["pair"]]
        return {"merge_method": "slerp", "base_model": a, "models": [{"model": a}, {"model": b}],
                "parameters": {"t": float(p["t"])}, "dtype": "float32"}
    if method == "linear":
        return {"merge_method": "linear", "dtype": "float32",
                "models": [{"model": s, "parameters": {"weight": float(p["weight"])}} for s in specs]}
    per = {k: float(v) for k, v in p.items() if k in ("weight", "density")}
    shared = {k: v for k, v in p.items() if k not in ("weight", "density")}
    return {"merge_method": method, "base_model": base_dir, "dtype": "float32",
            "models": [{"model": s, **({"parameters": per} if per else {})} for s in specs],
            **({"parameters": shared} if shared else {})}


def merge(ctx: Context) -> Entry:
    from fusion_jax.merging import merge as run_merge
    cfg = merge_config(ctx, ctx.name)
    out = ctx.work_dir() / "model"
    if not (out / "config.json").is_file():
        run_merge(cfg, out, seed=int(ctx.config.merge_seed), overwrite=True, quiet=True)
    params = {k: v for k, v in (cfg.get("parameters") or {}).items()}
    per = (cfg["models"][0].get("parameters") or {}) if ctx.name != "linear" else {}
    note = ", ".join(f"{k}={v}" for k, v in {**per, **params}.items())
    if ctx.name == "slerp":
        note = f"{' and '.join(ctx.config.merges.slerp.pair)} specialists, t={ctx.config.merges.slerp.t}"
    elif ctx.name == "linear":
        note = "uniform average of the specialists"
    return Entry(str(out), "domain", note)


# -- UltraFuser ---------------------------------------------------------------------------------------------
def _finished_run(run_dir: Path, fingerprint: str) -> Path | None:
    """The fused directory of a finished UltraFuser run with this training fingerprint, else None."""
    f = run_dir / "work" / "fingerprint.json"
    try:
        same = json.loads(f.read_text()).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return None
    done = (run_dir / "report.json").is_file() and (run_dir / "fused" / "fused.json").is_file()
    return run_dir / "fused" if same and done else None


def ultrafuser(ctx: Context) -> Entry:
    """The main job's pipeline at the arena's UltraFuser preset: a finished run with the same training
    fingerprint (the main job's ``runs/ultrafuser_demo``, or an earlier arena run) is reused."""
    from fusion_jax.ultrafuser.config import training_fingerprint
    from fusion_jax.ultrafuser.pipeline import run as run_pipeline
    u = ctx.ultrafuser_config
    fp = training_fingerprint(u)
    steps = f"stage 1 {int(u.stage1.steps)} + stage 2 {int(u.stage2.steps)} steps"
    reuse = str(ctx.config.ultrafuser.reuse_dir)
    if reuse:
        found = _finished_run(Path(reuse).expanduser(), fp)
        if found is not None:
            ctx.log(f"  ultrafuser: reusing the finished run {found.parent} (same training fingerprint {fp})")
            return Entry(str(found), "fused", f"{steps}; reused {found.parent}")
    own = ctx.work_dir()
    u = u.copy_and_resolve_references()
    u.output_dir = str(own)
    u.name = "run"
    found = _finished_run(own / "run", fp)
    if found is None:
        u.eval.generate_examples = 0
        run_pipeline(u)
        found = own / "run" / "fused"
    return Entry(str(found), "fused", steps)
