"""XFT as a contestant of the fusion arena (``fusion_jax.arena.contestants`` names ``fusion_jax.xft.arena:xft``).

The arena calls ``xft(ctx)`` with its zoo family and common budget; XFT trains within it
(:func:`fusion_jax.xft.pipeline.arena_contestant`: 4/5 of the steps MoE SFT, 1/5 alpha training, each domain
in its specialist's template, as the arena's multi-task baseline is trained) and hands back the merged dense
model, evaluated under the "domain" template policy.
"""
from __future__ import annotations


def xft(ctx):
    from fusion_jax.arena.contestants import Entry   # the arena's record type (the arena imports this module)
    from fusion_jax.xft.pipeline import arena_contestant
    b = ctx.budget
    path = arena_contestant(ctx.family, steps=int(b.steps), batch_per_domain=int(b.batch_per_domain),
                            train_examples=int(b.train_examples), work_dir=ctx.work_dir(), domains=tuple(ctx.domains),
                            formats=dict(ctx.formats), seq_len=int(ctx.seq_len), max_prompt_len=int(ctx.max_prompt_len),
                            mesh=ctx.mesh, trainer_cfg=ctx.trainer, seed=int(getattr(ctx.config, "seed", 0)),
                            log_fn=ctx.log)
    moe = round(0.8 * int(b.steps))
    return Entry(str(path), "domain", f"upcycled to 8 experts (shared + top-5 of 7), {moe} MoE SFT + "
                                      f"{int(b.steps) - moe} alpha steps x {b.batch_per_domain} per domain, merged "
                                      "back (W = 0.75 W_0 + 0.25 sum softmax(alpha)_i W_i)")
