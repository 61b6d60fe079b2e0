"""The demo zoo: a tiny Llama base pre-trained on a three-domain corpus, and one specialist per domain.

Built offline from nothing: the demo corpus (:mod:`fusion_jax.data.demo_corpus`), a byte-level BPE
tokenizer (:mod:`fusion_jax.data.tokenizer`), a base pre-trained on the mixture (plain
``prompt\\nresponse`` documents, packed with segment ids), then three specialists fine-tuned from it,
each on ONE domain in its OWN prompt template (as UltraLM, CodeLlama and WizardMath differ), with the
loss on response tokens only. Every run goes through :class:`fusion_jax.train.Trainer`, so a killed
build resumes from its Orbax checkpoints (``<cache>/<key>.work/``).

The finished zoo is one directory ``<cache>/<key>/`` (key = hash of everything that shapes it), moved
into place atomically: ``corpus.json``, ``tokenizer/``, ``base/`` and ``<domain>/`` HF checkpoints
(transformers loads them), ``zoo.json`` (config, loss curves, timings). A later run reuses it.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from fusion_jax import sharding as shd
from fusion_jax.errors import DataError
from fusion_jax.utils.atomic import atomic_directory

ZOO_FORMAT = 2
ZOO_JSON = "zoo.json"


def zoo_key(c) -> str:
    """Hash of the zoo config, the corpus config, the sequence layout and the templates."""
    blob = json.dumps({
        "format": ZOO_FORMAT, "zoo": {k: v for k, v in c.zoo.to_dict().items() if k != "cache_dir"},
        "corpus": {k: c.data[k] for k in ("seed", "n_train", "n_eval", "seq_len", "max_prompt_len")},
        "templates": {n: c.specialists.templates[n] for n in c.specialists.names},
    }, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def zoo_dir(c) -> Path:
    return Path(str(c.zoo.cache_dir)).expanduser() / zoo_key(c)


def is_main() -> bool:
    return jax.process_index() == 0


def barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def host_tree(tree):
    """Params (possibly sharded across processes) -> numpy on every process."""
    from fusion_jax.ultrafuser.evaluate import to_host
    return jax.tree.map(to_host, tree)


def model_config(c, tok):
    from fusion_jax.models import ModelConfig
    z = c.zoo
    d, h = int(z.hidden_size), int(z.num_heads)
    return ModelConfig(
        architecture="LlamaForCausalLM", vocab_size=len(tok), hidden_size=d,
        intermediate_size=int(z.intermediate_size), num_layers=int(z.num_layers), num_heads=h,
        num_kv_heads=int(z.num_kv_heads), head_dim=d // h, max_position_embeddings=max(256, int(c.data.seq_len)),
        rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)


def train_lm(loss_fn, params, axes, arrays: Mapping[str, np.ndarray], run, workdir: Path, mesh, seed: int,
             trainer_cfg, desc: str, log: Callable[[str], None], grad_clip: float | None = 1.0):
    """One Trainer run; returns (params, loss curve [(step, loss)]).

    ``arrays``: ``{name: [N, ...]}`` rows drawn uniformly (seeded, resumable), ``run.batch`` per step;
    or ``{domain: {name: [N, ...]}}``: ``run.batch`` rows of EACH domain per step (balanced sampler)."""
    from fusion_jax.data.sampler import DomainBalancedSampler
    from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig
    from fusion_jax.train.metrics import read_jsonl

    by_domain = arrays if isinstance(next(iter(arrays.values())), Mapping) else {desc: arrays}
    log(f"  {desc}: {int(run.steps)} steps x {int(run.batch)} rows" + (" per domain" if len(by_domain) > 1 else ""))
    sampler = DomainBalancedSampler({k: dict(v) for k, v in by_domain.items()}, int(run.batch), seed=seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    opt = OptimizerConfig(learning_rate=float(run.learning_rate), warmup_steps=int(run.warmup_steps),
                          schedule="cosine", end_lr_ratio=0.1, weight_decay=0.0, grad_clip=grad_clip)
    tc = TrainerConfig(total_steps=int(run.steps), workdir=str(workdir), seed=seed,
                       save_every=int(trainer_cfg.save_every), keep_checkpoints=int(trainer_cfg.keep_checkpoints),
                       log_every=max(1, min(int(trainer_cfg.log_every), int(run.steps))),
                       progress=bool(trainer_cfg.progress), async_checkpointing=bool(trainer_cfg.async_checkpointing))
    trainer = Trainer(loss_fn, params, opt, tc, mesh=mesh, param_logical_axes=axes)
    try:
        result = trainer.run(sampler)
    finally:
        trainer.close()
    f = Path(workdir) / "logs" / "metrics.jsonl"
    rows = read_jsonl(f) if f.is_file() else []
    return result.params, rows


def stacked_sft_loss(loss_fn, names):
    """Loss of K models stacked on a leading axis, model k on the rows of domain ``names[k]``.

    Batches come from a DomainBalancedSampler: row i belongs to domain ``sorted(names)[i % K]``."""
    import jax.numpy as jnp
    K = len(names)
    order = [sorted(names).index(n) for n in names]   # model k <- sorted-domain slot order[k]

    def f(params, batch, rng):
        b = {k: v for k, v in batch.items() if k != "domain_id"}
        b = {k: jnp.swapaxes(v.reshape((-1, K) + v.shape[1:]), 0, 1)[jnp.asarray(order)] for k, v in b.items()}
        losses, aux = jax.vmap(lambda p, x: loss_fn(p, x, rng))(params, b)
        out = {"num_tokens": aux["num_tokens"].sum()}
        out.update({f"loss/{n}": losses[k] for k, n in enumerate(names)})
        return losses.sum(), out

    return f


def _tokenizer(c, corpus: dict, work: Path, log):
    """Train the byte-level BPE once (process 0), reuse it on resume; every process loads it."""
    from fusion_jax.data.tokenizer import load_tokenizer, train_tokenizer
    tdir = work / "tokenizer"
    if is_main() and not (tdir / "tokenizer.json").is_file():
        t = time.perf_counter()
        texts = [s for dom in corpus.values() for ex in dom["train"] for s in (ex["prompt"], ex["response"])]
        # the templates' fixed words, so that they become single tokens as in a real model's vocabulary
        extra = [str(c.specialists.templates[n]).replace("{prompt}", " ") for n in c.specialists.names] * 50
        with atomic_directory(tdir, overwrite=True) as tmp:
            train_tokenizer(texts, tmp, vocab_size=int(c.zoo.vocab_size), extra_texts=extra)
        log(f"  tokenizer: byte-level BPE, vocab {int(c.zoo.vocab_size)} ({time.perf_counter() - t:.1f}s)")
    barrier("zoo-tokenizer")
    return load_tokenizer(tdir)


def build_zoo(c, mesh, log: Callable[[str], None] = print) -> Path:
    """Build (or reuse) the demo zoo for config ``c``; returns its directory."""
    from fusion_jax import hf
    from fusion_jax.data.demo_corpus import build_demo_corpus
    from fusion_jax.data.packing import encode_documents, pack_sequences
    from fusion_jax.data.templates import render_dataset
    from fusion_jax.models import CausalLM
    from fusion_jax.ultrafuser.data import templates_from_config
    from fusion_jax.train.losses import nnx_causal_lm_loss

    out = zoo_dir(c)
    if (out / ZOO_JSON).is_file():
        log(f"demo zoo: reusing {out}")
        return out
    work = out.parent / f"{out.name}.work"
    log(f"demo zoo: building {out} (resumable work in {work}; cached for later runs)")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    names = list(c.specialists.names)
    corpus = build_demo_corpus(seed=int(c.data.seed), n_train=int(c.data.n_train), n_eval=int(c.data.n_eval),
                               domains=tuple(names))
    timings["corpus_s"] = time.perf_counter() - t0
    log("  corpus: " + ", ".join(f"{d} {len(v['train'])}/{len(v['eval'])}" for d, v in corpus.items())
        + " train/eval examples")
    t = time.perf_counter()
    tok = _tokenizer(c, corpus, work, log)
    timings["tokenizer_s"] = time.perf_counter() - t
    cfg = model_config(c, tok)
    S, seed = int(c.data.seq_len), int(c.zoo.seed)

    # -- pre-train the base on the mixture (plain documents, packed) ----------------------------------
    t = time.perf_counter()
    docs = [ex["prompt"] + "\n" + ex["response"] for d in names for ex in corpus[d]["train"]]
    docs = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]
    packed = pack_sequences(encode_documents(tok, docs), S, tok.pad_token_id, mode="concat")
    if len(packed["input_ids"]) < int(c.zoo.pretrain.batch):
        raise DataError(f"demo corpus: {len(packed['input_ids'])} packed rows, fewer than zoo.pretrain.batch")
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model, nnx.Param)
    axes = shd.state_logical_axes(state)
    loss_fn = nnx_causal_lm_loss(graphdef)
    base, base_rows = train_lm(loss_fn, nnx.to_pure_dict(state), axes, packed, c.zoo.pretrain, work / "base",
                                mesh, seed, c.trainer, "pre-train base", log)
    timings["pretrain_s"] = time.perf_counter() - t
    log(f"  base: {cfg.num_params() / 1e6:.2f}M params, {len(packed['input_ids'])} packed rows of {S} tokens "
        f"({timings['pretrain_s']:.0f}s)")

    # -- one specialist per domain, fine-tuned in its own template ------------------------------------
    # The three fine-tunes are independent runs of one shape; they train side by side as ONE vmapped
    # Trainer run over params stacked on the expert axis (one compile, bigger matmuls on a small CPU):
    # the balanced sampler gives every step `batch` rows of each domain and specialist k sees only
    # its domain's rows. The loss is the SUM of the per-specialist means, so each specialist's gradient
    # is exactly its own; AdamW is per parameter; clipping is off (a global norm would couple them).
    curves = {"base": [(int(r["step"]), float(r["loss"])) for r in base_rows]}
    base = host_tree(base)
    t = time.perf_counter()
    rows = {}
    for d, tmpl in zip(names, templates_from_config(names, c.specialists.templates)):
        r = render_dataset(tok, corpus[d]["train"], tmpl, S, domains=(d,), max_prompt_len=int(c.data.max_prompt_len))
        rows[d] = {k: r[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    stacked0 = jax.tree.map(lambda x: np.stack([x] * len(names)), base)
    stacked_axes = jax.tree.map(lambda ax: ("expert",) + tuple(ax), axes,
                                is_leaf=lambda x: isinstance(x, tuple))
    stacked, ft_curve = train_lm(stacked_sft_loss(loss_fn, names), stacked0, stacked_axes, rows,
                                 c.zoo.finetune, work / "finetune", mesh, seed + 1, c.trainer,
                                 "fine-tune specialists", log, grad_clip=None)
    specialists = {d: jax.tree.map(lambda x, k=k: x[k], stacked) for k, d in enumerate(names)}
    for d in names:
        curves[d] = [(int(r["step"]), float(r[f"loss/{d}"])) for r in ft_curve if f"loss/{d}" in r]
    timings["finetune_s"] = time.perf_counter() - t

    # -- write the zoo (process 0), atomically -----------------------------------------------------------
    spec_h = host_tree(specialists)
    if is_main():
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "corpus.json").write_text(json.dumps(corpus))
            shutil.copytree(work / "tokenizer", tmp / "tokenizer")
            hf.save(base, cfg, tmp / "base", source_dir=work / "tokenizer")
            for d in names:
                hf.save(spec_h[d], cfg, tmp / d, source_dir=work / "tokenizer")
            timings["total_s"] = time.perf_counter() - t0
            (tmp / ZOO_JSON).write_text(json.dumps(
                {"key": out.name, "config": {"zoo": c.zoo.to_dict(), "data": c.data.to_dict(),
                                             "templates": c.specialists.templates.to_dict()},
                 "timings_s": timings, "curves": curves, "model_config": cfg.to_hf(),
                 "num_params": cfg.num_params()}, indent=2, default=str))
        shutil.rmtree(work, ignore_errors=True)
    barrier("zoo-written")
    log(f"demo zoo: built in {time.perf_counter() - t0:.0f}s")
    return out
