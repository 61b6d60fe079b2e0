"""Benchmark: one distillation train step, the sparse chunked loss against a dense-target implementation of
the same loss (same model, batch, optimizer, process).

``0.9 * CLM + 0.1 * CE(student, fused target)``, the target fused by AvgCE from C candidates' top-k entries:

* fusion-jax (:func:`fusion_jax.distill.loss.make_distill_loss`): the decoder's hidden states once, then a
  scan over sequence chunks (``jax.checkpoint``-ed) that forms one chunk's ``[B, c, V]`` logits, one
  logsumexp, and gathers the logits at the label and the ``C * k`` target ids; the target stays sparse;
* dense: the full ``[B, S, V]`` logits and ``log_softmax``, the fused target scattered into a dense
  ``[B, S, V]`` float32 tensor (what the official collator builds, then ``F.cross_entropy`` with probability
  targets), the same masks and means.

Both are ``jax.jit``-ed AdamW train steps (value_and_grad + update, donated state). The parent checks that the
two losses and gradient norms agree, then reports XLA's compiled memory (the step's temporaries, beside
the params and optimizer state both hold) and tokens/s from alternating rounds (medians).

    python bench/distill_step.py            # prints the table
    python bench/distill_step.py --write    # also rewrites BENCHMARKS.md's section
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _report import machine, write_section  # noqa: E402  (bench/ is this script's directory)

SECTION = "## Distillation train step"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    a = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from fusion_jax.distill.loss import batch_target, combine, make_distill_loss
    from fusion_jax.models import CausalLM, ModelConfig

    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=a.vocab, hidden_size=a.hidden,
                      intermediate_size=int(a.hidden * 2.7), num_layers=a.layers, num_heads=4, num_kv_heads=4,
                      head_dim=a.hidden // 4, max_position_embeddings=max(2048, a.seq))
    graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    B, S, C, k, V = a.batch, a.seq, a.candidates, a.k, a.vocab
    am = np.ones((B, S), np.int32)
    batch = {"input_ids": rng.integers(0, V, (B, S)).astype(np.int32), "attention_mask": am, "loss_mask": am,
             "fusion_mask": am.astype(np.float32), "t_ids": rng.integers(0, V, (B, S, C, k)).astype(np.int32),
             "t_values": -np.sort(rng.exponential(2, (B, S, C, k)), -1).astype(np.float32),
             "t_count": rng.integers(1, k + 1, (B, S, C)).astype(np.int32),
             "t_ce": rng.uniform(1, 4, (B, C)).astype(np.float32)}
    batch = jax.device_put(batch)

    sparse_loss = make_distill_loss(graphdef, lam=0.9, method="avgce", chunk=a.chunk)

    def dense_loss(p, b, rng):
        model = nnx.merge(graphdef, nnx.State(p))
        logq = jax.nn.log_softmax(model(b["input_ids"], attention_mask=b["attention_mask"]).logits.astype(jnp.float32))
        ids, tw, covered, _ = batch_target(b, method="avgce")
        target = jnp.zeros((B, S, V), jnp.float32).at[jnp.arange(B)[:, None, None], jnp.arange(S)[None, :, None],
                                                       ids].add(tw)
        fm = b["fusion_mask"] * covered
        fus = (-(target * logq).sum(-1) * fm).sum()
        lm = b["loss_mask"][:, 1:].astype(jnp.float32)
        clm = (-jnp.take_along_axis(logq[:, :-1], b["input_ids"][:, 1:, None], -1)[..., 0] * lm).sum()
        return combine((clm, lm.sum(), fus, fm.sum()), 0.9)

    tx = optax.adamw(1e-4)

    def make_step(loss_fn):
        def step(p, opt, b):
            (loss, _), g = jax.value_and_grad(lambda q: loss_fn(q, b, None), has_aux=True)(p)
            up, opt = tx.update(g, opt, p)
            return optax.apply_updates(p, up), opt, loss, optax.global_norm(g)
        return jax.jit(step, donate_argnums=(0, 1))

    steps = {"fusion-jax (sparse, chunked)": make_step(sparse_loss), "dense target": make_step(dense_loss)}
    mem, first = {}, {}
    for name, f in steps.items():
        p = jax.tree.map(jnp.array, params)
        compiled = f.lower(p, tx.init(p), batch).compile()
        ma = compiled.memory_analysis()
        mem[name] = getattr(ma, "temp_size_in_bytes", 0) or 0   # the step's working memory (not params/state)
        _, _, loss, gn = f(p, tx.init(p), batch)
        first[name] = (float(loss), float(gn))
    (l0, g0), (l1, g1) = first.values()
    print(f"losses {l0:.6f} / {l1:.6f}, gradient norms {g0:.6f} / {g1:.6f}")
    if abs(l0 - l1) > 1e-4 * abs(l1) or abs(g0 - g1) > 1e-3 * abs(g1):
        raise SystemExit("the two steps do not compute the same loss; not timing")
    times = {n: [] for n in steps}
    for _ in range(a.rounds):
        for name, f in steps.items():
            p = jax.tree.map(jnp.array, params)
            opt = tx.init(p)
            p, opt, loss, _ = f(p, opt, batch)
            loss.block_until_ready()
            t = time.perf_counter()
            for _ in range(a.steps):
                p, opt, loss, _ = f(p, opt, batch)
            loss.block_until_ready()
            times[name].append((time.perf_counter() - t) / a.steps)
            time.sleep(0.5)
    rate = {n: B * S / float(np.median(v)) for n, v in times.items()}
    base = "dense target"
    lines = [SECTION, "",
             f"`python bench/distill_step.py` ({time.strftime('%Y-%m-%d')}; {machine(libs=('jax', 'optax'))} "
             f"at the end): a Llama student (d={a.hidden}, {a.layers} layers, vocab {V}, "
             f"float32), batch {B} x {S}, {C} candidates x top-{k}, AvgCE, lambda 0.9, AdamW, jitted with donated "
             f"state; {a.rounds} alternating rounds of {a.steps} steps (medians). Same loss ({l0:.5f} vs {l1:.5f}) "
             f"and gradient norm ({g0:.4f} vs {g1:.4f}). Memory: XLA's compiled temporaries of the step "
             "(XLA's `temp_size_in_bytes`: the step's working memory; params and optimizer state, the same for "
             "both, not counted).", "",
             "| train step | step memory MB | tokens/s | vs dense |", "|---|---|---|---|"]
    for n in steps:
        lines.append(f"| {n} | {mem[n] / 2**20:,.0f} | {rate[n]:,.0f} | memory {mem[n] / mem[base]:.2f}x, "
                     f"speed {rate[n] / rate[base]:.2f}x |")
    lines += ["", f"The dense step holds the [B, S, V] logits, log-softmax, target and their gradients "
              f"({B * S * V * 4 / 2**20:,.0f} MB each in float32); the sparse step holds one [B, {a.chunk}, V] "
              "chunk at a time and C * k target entries per position.", ""]
    text = "\n".join(lines)
    print(text)
    if a.write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
