"""``run(config)``: the UltraFuser job end to end (``python train.py --config=configs/ultrafuser.py``).

1. Validate everything that can be checked without training: the config (unknown preset or option),
   specialist files, architectures and vocabularies, templates, every domain's data. Errors are
   ConfigError / CheckpointError / DataError naming the option or file, raised before any step.
2. Specialists: the HF directories in ``specialists.paths``, or the demo zoo (built once, cached).
3. Every example rendered in every specialist's template (aligned responses); class-balanced batches
   (``DomainBalancedSampler``: ``batch_per_domain`` examples of each domain per step).
4. Stage 1 (gate only: the specialists are frozen, with no gradients or optimizer state) and stage 2
   (all weights), each a :class:`fusion_jax.train.Trainer` run with its own steps/batch/lr: Orbax
   checkpoints every ``trainer.save_every`` steps under ``<run>/work/``, automatic resume (rerun the
   same command after a crash), metrics JSONL + TensorBoard, progress bars, per-process data shards.
5. Evaluate base / specialists / fused per domain and on the mixed set; mean gate weights by domain.
6. Write ``<output_dir>/<name>/``: ``fused/`` (HF specialists + gate), ``report.json``, ``report.md``,
   ``gate_weights.png``, ``loss_curves.png``, ``run.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import jax

from fusion_jax.data.loading import examples_from_config
from fusion_jax.errors import ConfigError
from fusion_jax.train.run import Run, barrier, init_distributed, is_main, log, quiet_orbax
from fusion_jax.ultrafuser import config as ucfg
from fusion_jax.ultrafuser import data as udata
from fusion_jax.ultrafuser import evaluate as uev
from fusion_jax.ultrafuser import report as ureport

# The gate's output bias b2 is one scalar added to EVERY specialist's score, so the softmax cancels it:
# its gradient is zero up to rounding, which Adam would turn into an arbitrary drift. It stays in the
# gate (the paper's MLP, and the exported format) but is never trained.
STAGE1_TRAINABLE = r"^gate/(w1|b1|w2)$"
STAGE2_TRAINABLE = r"^(?!gate/b2$)"
BASE_TEMPLATE = "{prompt}\n"   # the demo base was pre-trained on "prompt\nresponse" documents


# -- inputs --------------------------------------------------------------------------------------------

def _demo_examples(corpus: dict, c, domains) -> tuple[dict, dict]:
    cap_t, cap_e = int(c.data.max_train_examples), int(c.data.max_eval_examples)
    train = {d: corpus[d]["train"][:cap_t or None] for d in domains}
    ev = {d: corpus[d]["eval"][:cap_e or None] for d in domains}
    return train, ev


# -- training ------------------------------------------------------------------------------------------
def monitor_fn(fm, monitor_sets: dict, c, mesh):
    """``params -> {domain: held-out fused loss}`` on a fixed subset of every evaluation set: the curve that
    shows whether a stage helps (the train loss of small balanced batches moves with how hard each batch
    happens to be, so it cannot show a trend over a few dozen steps)."""
    ev = uev.make_fused_eval(fm, int(c.loss_chunk))
    bs = int(c.eval.batch_size)
    names = list(fm.names)
    return lambda params: {d: uev.fused_loss_and_weights(ev, params, a, bs, mesh, names)[0]
                           for d, a in monitor_sets.items()}


def run_stage(stage: int, fm, train_sets: dict, c, mesh, work: Path, monitor=None):
    """Stage 1: gate only; stage 2: all weights. Updates ``fm`` in place; returns the metrics rows (the
    train loss every ``trainer.log_every`` steps, the held-out ``eval/<domain>`` losses of ``monitor``
    every ``trainer.eval_every`` steps)."""
    from fusion_jax.data.sampler import DomainBalancedSampler
    from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig
    from fusion_jax.train.metrics import read_jsonl

    sc = c[f"stage{stage}"]
    steps = int(sc.steps)
    if steps == 0:
        return []
    log(f"stage {stage} ({'gate only' if stage == 1 else 'all weights'}): {steps} steps x "
         f"{int(sc.batch_per_domain)} examples per domain, lr {float(sc.learning_rate):g}")
    sampler = DomainBalancedSampler(train_sets, int(sc.batch_per_domain), seed=int(c.seed) + stage,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    opt = OptimizerConfig(learning_rate=float(sc.learning_rate), schedule=str(sc.schedule),
                          warmup_steps=int(sc.warmup_steps), end_lr_ratio=float(sc.end_lr_ratio),
                          weight_decay=float(sc.weight_decay), grad_clip=float(sc.grad_clip))
    t = c.trainer
    wd = work / f"stage{stage}"
    tc = TrainerConfig(total_steps=steps, workdir=str(wd), seed=int(c.seed) + stage,
                       save_every=int(t.save_every), keep_checkpoints=int(t.keep_checkpoints),
                       log_every=max(1, min(int(t.log_every), steps)), progress=bool(t.progress),
                       async_checkpointing=bool(t.async_checkpointing), eval_every=int(t.eval_every),
                       # stage 1: the frozen specialists are re-read from their files on resume
                       save_frozen=stage != 1)
    trainer = Trainer(fm.trainer_loss_fn(int(c.loss_chunk)), fm.train_params(), opt, tc,
                      trainable=STAGE1_TRAINABLE if stage == 1 else STAGE2_TRAINABLE, mesh=mesh,
                      param_logical_axes=fm.train_logical_axes(), meta={"stage": stage}, eval_fn=monitor)
    try:
        result = trainer.run(sampler)
    finally:
        trainer.close()
    fm.set_train_params(result.params)
    if result.resumed_from is not None:
        log(f"stage {stage}: resumed from step {result.resumed_from} ({wd / 'checkpoints'})")
    f = wd / "logs" / "metrics.jsonl"
    return read_jsonl(f) if f.is_file() else []


# -- the job -------------------------------------------------------------------------------------------
def run(config) -> dict:
    c = ucfg.validate(config)
    quiet_orbax()
    init_distributed(c.distributed)
    from fusion_jax import hf, sharding
    from fusion_jax.data.templates import PromptTemplate, render_dataset
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.eval.loss import lm_loss, make_lm_eval
    from fusion_jax.ultrafuser.export import check_specialist_dirs, load_specialists, save_fused

    names, domains = list(c.specialists.names), list(c.data.domains)
    mesh = sharding.make_mesh(c.mesh.to_dict())

    # -- 1. everything checkable before training ----------------------------------------------------------
    paths = [str(Path(str(p)).expanduser()) for p in c.specialists.paths]
    if paths:
        check_specialist_dirs(paths, names)
        train_ex, eval_ex = examples_from_config(c.data, domains)
        tok_path = str(c.specialists.tokenizer) or paths[0]
        tok = load_tokenizer(tok_path)
    elif any(str(c.data.train_files.get(d, "")) for d in domains):
        raise ConfigError("data.train_files is set but specialists.paths is not: the demo zoo is trained on "
                          "the demo corpus; give specialists.paths to fuse your own specialists")
    elif sorted(names) != sorted(domains) or set(domains) - {"text", "code", "math"}:
        raise ConfigError("the demo zoo has specialists text, code, math for domains text, code, math; "
                          "give specialists.paths (and data files) to fuse other models")
    run_dir = Run.open(c, fingerprint=ucfg.training_fingerprint(c))
    out_dir, work, timings = run_dir.out_dir, run_dir.work, run_dir.timings

    # -- 2. the demo zoo (built once, cached by content hash) ----------------------------------------------
    base_path = zoo = None
    if not paths:
        from fusion_jax.zoo import build_family
        spec, corpus = ucfg.zoo_specs(c)
        zoo = run_dir.timed("zoo", lambda: build_family(spec, corpus, cache_dir=str(c.zoo.cache_dir), mesh=mesh,
                                                        trainer_cfg=c.trainer, log=log))
        paths = [str(zoo.specialist_dir(n)) for n in names]
        base_path = zoo.base_dir
        tok_path = str(zoo.tokenizer_dir)
        tok = load_tokenizer(tok_path)
        train_ex, eval_ex = _demo_examples(zoo.corpus(), c, domains)

    vocab = json.loads((Path(paths[0]) / "config.json").read_text()).get("vocab_size")
    if vocab is not None and len(tok) > int(vocab):
        raise ConfigError(f"tokenizer {tok_path} has {len(tok)} tokens but the specialists' vocab_size is "
                          f"{vocab} (specialists.tokenizer must be the specialists' own tokenizer)")

    # -- 3. render: every example in every specialist's template ---------------------------------------------
    S, Pmax = int(c.data.seq_len), int(c.data.max_prompt_len)
    templates = udata.templates_from_config(names, c.specialists.templates, bos=tok.bos_token_id is not None)

    def render():
        ev = dict(eval_ex)
        ev["mixed"] = udata.mixed_examples(eval_ex, tok, int(c.data.mixed_eval_examples), S - Pmax,
                                           int(c.data.seed) + 1)
        return ev, udata.render_sets(tok, train_ex, templates, S, Pmax), udata.render_sets(tok, ev, templates, S, Pmax)

    eval_ex, train_sets, eval_sets = run_dir.timed("render", render)
    eval_domains = domains + ["mixed"]

    # -- 4. load and stack the specialists on the mesh; train both stages ------------------------------------
    load_kw = {"dtype": str(c.specialists.dtype)}
    if str(c.specialists.param_dtype):
        load_kw["param_dtype"] = str(c.specialists.param_dtype)
    fm = run_dir.timed("load", lambda: load_specialists(paths, names, mesh=mesh, gate_hidden=int(c.gate_hidden),
                                                        key=jax.random.key(int(c.seed)), **load_kw))
    bs = int(c.eval.batch_size)

    def eval_before():   # specialists (and base) before fusion: each in its own template
        out: dict[str, dict[str, float]] = {}
        lm_ev = make_lm_eval(fm.graphdef)
        for k, n in enumerate(names):
            pk = fm.specialist_params(k)
            out[n] = {d: lm_loss(lm_ev, pk, udata.select(eval_sets[d], k), bs, mesh) for d in eval_domains}
        if base_path is not None:
            # on the run's mesh, like the batches it is evaluated on
            _, base_params = hf.load(base_path, mesh=mesh, **load_kw)
            base_t = PromptTemplate("base", prompt=BASE_TEMPLATE, bos=tok.bos_token_id is not None)
            out["base"] = {}
            for d in eval_domains:
                r = render_dataset(tok, [dict(e, domain=d) for e in eval_ex[d]], base_t, S, domains=(d,),
                                   max_prompt_len=Pmax)
                out["base"][d] = lm_loss(lm_ev, base_params, {k: r[k] for k in udata.BATCH_KEYS}, bs, mesh)
        return out

    eval_loss = run_dir.timed("eval_specialists", eval_before)
    log("eval before fusion: " + "; ".join(f"{m}: " + ", ".join(f"{d} {v:.3f}" for d, v in ev.items())
                                           for m, ev in eval_loss.items()))

    n_mon = int(c.eval.monitor_examples)
    monitor = (monitor_fn(fm, {d: {k: v[:n_mon] for k, v in a.items()} for d, a in eval_sets.items()}, c, mesh)
               if n_mon > 0 and int(c.trainer.eval_every) > 0 else None)
    curves = {}
    for stage in (1, 2):
        curves[f"stage{stage}"] = run_dir.timed(f"stage{stage}", lambda: run_stage(stage, fm, train_sets, c, mesh,
                                                                                    work, monitor))

    # -- 5. the fused model ------------------------------------------------------------------------------------
    def eval_fused():
        f_ev = uev.make_fused_eval(fm, int(c.loss_chunk))
        loss, weights = {}, {}
        for d in eval_domains:
            loss[d], weights[d] = uev.fused_loss_and_weights(f_ev, fm.train_params(), eval_sets[d], bs, mesh, names)
        return loss, weights

    eval_loss["fused"], gate_w = run_dir.timed("eval_fused", eval_fused)
    log("fused: " + ", ".join(f"{d} {v:.3f}" for d, v in eval_loss["fused"].items()))

    # -- 6. outputs ------------------------------------------------------------------------------------------
    formats = {n: str(c.specialists.templates[n]) for n in names}
    run_dir.timed("export", lambda: save_fused(fm, out_dir / "fused", templates=formats, tokenizer_dir=tok_path,
                                               extra={"seq_len": S, "max_prompt_len": Pmax,
                                                      "sources": dict(zip(names, paths))}))
    samples = []
    if int(c.eval.generate_examples) > 0 and jax.process_count() == 1:
        samples = run_dir.timed("generate", lambda: _samples(fm, tok, eval_ex, domains, templates, c))
    timings["total_s"] = run_dir.total_seconds()
    models = (["base"] if "base" in eval_loss else []) + ["fused"] + names
    report = {"eval_loss": {m: eval_loss[m] for m in models}, "gate_weights": gate_w}
    checks = ureport.checks(report, names, domains, ureport.heldout_curve(curves.get("stage2") or [], eval_domains))
    if is_main():
        zoo_curves = zoo.curves() if zoo is not None else {}
        ureport.write_all(out_dir, report, checks, timings, samples, curves, zoo_curves, c, names,
                          {"specialist_paths": dict(zip(names, paths)), "mesh": dict(mesh.shape),
                           "devices": [str(dv) for dv in jax.devices()], "process_count": jax.process_count()})
    barrier("ultrafuser-report")
    log(f"UltraFuser: wrote {out_dir} in {timings['total_s']:.0f}s; checks: "
        + ", ".join(f"{k}={'PASS' if v['pass'] else 'FAIL'}" for k, v in checks.items()))
    return {"report": report, "checks": checks, "timings": timings, "out_dir": str(out_dir), "model": fm}


def _samples(fm, tok, eval_ex, domains, templates, c) -> list[dict]:
    """A few greedy generations of the fused model (each prompt in every specialist's template)."""
    from fusion_jax.eval.generation import GenerationConfig, token_defaults
    metas = [(d, e["prompt"]) for d in domains for e in eval_ex[d][: int(c.eval.generate_examples)]]
    cfg = GenerationConfig(max_new_tokens=int(c.eval.max_new_tokens), **token_defaults(tok))
    outs = uev.fused_generate(fm, tok, [p for _, p in metas], templates, cfg)
    return [{"domain": d, "prompt": p, "output": o[0].text} for (d, p), o in zip(metas, outs)]
