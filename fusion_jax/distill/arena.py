"""FuseLLM and FuseChat as arena contestants (:mod:`fusion_jax.arena.contestants`).

On the arena's zoo family the student (FuseChat: the pivot) is the base and the teachers (sources) are the
specialists, all of one tokenizer, so the alignment is the identity and what is compared is the fusion
itself. Every model sees the examples in the base's plain ``prompt\\nresponse`` format (the distillation
data have ONE format for all models), and the result is evaluated in it (template policy ``"base"``).

Budget: the arena's ``steps`` optimizer steps of ``batch_per_domain`` examples of each domain. FuseLLM
spends it on one student; FuseChat splits it evenly over its pairwise targets (then merges them), so both
train on as many examples as the multi-task baseline and UltraFuser.
"""
from __future__ import annotations

import json

from fusion_jax.arena.contestants import Context, Entry
from fusion_jax.utils.atomic import atomic_file


def _config(ctx: Context, method: str, steps: int):
    from fusion_jax.distill.config import get_config
    c = get_config(method, "demo")
    c.name = method
    c.output_dir = str(ctx.work_dir(method))
    c.seed = int(ctx.config.seed)
    c.student.path = str(ctx.family.base_dir)
    c.teachers.names = tuple(ctx.domains)
    c.teachers.paths = tuple(str(ctx.family.specialist_dir(d)) for d in ctx.domains)
    c.data.domains = tuple(ctx.domains)
    corpus = ctx.family.corpus()
    data_dir = ctx.work_dir(method) / "data"
    for d in ctx.domains:
        f = data_dir / f"{d}.jsonl"
        if not f.is_file():
            rows = corpus[d]["train"][: ctx.budget.train_examples or None]
            with atomic_file(f) as fh:
                fh.writelines(json.dumps({"prompt": e["prompt"], "response": e["response"]}) + "\n" for e in rows)
        c.data.train_files[d] = str(f)
    c.data.template = "{prompt}\n"
    c.data.seq_len = c.data.eval_seq_len = int(ctx.seq_len)
    c.data.max_train_examples = int(ctx.budget.train_examples)
    c.train.steps = int(steps)
    c.train.batch = int(ctx.budget.batch_per_domain)
    c.baseline = False            # the arena has its own baseline (the multi-task fine-tune)
    for k in ("save_every", "keep_checkpoints", "log_every", "progress", "async_checkpointing"):
        c.trainer[k] = ctx.trainer[k]
    return c


def fusellm(ctx: Context) -> Entry:
    """The specialists' distributions distilled into the base (MinCE with the base's own, lambda 0.9)."""
    from fusion_jax.distill.pipeline import run
    c = _config(ctx, "fusellm", ctx.budget.steps)
    out = run(c)["out_dir"]
    return Entry(f"{out}/distilled", "base", f"{ctx.budget.steps} steps x {ctx.budget.batch_per_domain} per "
                 f"domain; teachers {', '.join(ctx.domains)}; MinCE with the ref model; lambda {c.distill.lam}")


def fusechat(ctx: Context) -> Entry:
    """Pairwise fusion of each specialist into the base, then the targets merged (VaRM)."""
    from fusion_jax.distill.pipeline import run
    steps = max(1, ctx.budget.steps // len(ctx.domains))
    c = _config(ctx, "fusechat", steps)
    out = run(c)["out_dir"]
    return Entry(f"{out}/merged", "base", f"{len(ctx.domains)} pairwise targets x {steps} steps x "
                 f"{ctx.budget.batch_per_domain} per domain, merged by {c.merge.method}")
