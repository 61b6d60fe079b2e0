"""``run(config)``: XFT end to end (``python train.py --config=configs/xft.py``), and the arena's entry.

1. Validate everything checkable before training (config, model directory, every domain's data): errors
   are ConfigError / CheckpointError / DataError naming the option or file.
2. The dense model: ``model.path``, or the demo zoo's base (built once, cached; the UltraFuser demo's
   family). Each domain's examples rendered in its prompt template, loss on response tokens only.
3. Stages, each resumable (rerun the same command after a crash):
   ``upcycle`` (pure: recomputed, its summary kept) -> ``moe_sft`` (Trainer, Orbax) -> ``merge`` (Trainer:
   alpha only) -> ``export`` (the merged dense HF checkpoint) -> ``dense_sft`` (the baseline: Trainer, the
   same batches and step count as moe_sft + merge) -> ``eval`` (held-out loss per domain of the base, the
   dense SFT, the MoE, XFT's merge with the learned alpha and with the fixed alpha = ones, router load).
4. Write ``<output_dir>/<name>/``: ``merged/`` (HF, base architecture), ``alpha.npy``, ``report.json``,
   ``report.md``, ``loss_curves.png``, ``expert_load.png``, ``alpha.png``, ``eval_loss.png``, ``run.json``.

:func:`arena_contestant` runs the same stages on a zoo family within a step budget and returns the merged
model's directory (``fusion_jax.xft.arena.xft`` hands it to the arena).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from fusion_jax.data.loading import examples_from_config
from fusion_jax.errors import CheckpointError, DataError
from fusion_jax.train.run import Run, barrier, init_distributed, is_main, log, quiet_orbax
from fusion_jax.xft import config as xcfg
from fusion_jax.xft import report as xreport
from fusion_jax.xft import training as xtrain


# -- inputs ------------------------------------------------------------------------------------------------
def _check_model_dir(path: str):
    from fusion_jax import hf
    d = Path(path).expanduser()
    if not d.is_dir():
        raise CheckpointError(f"model.path: directory {d} does not exist")
    if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
        raise CheckpointError(f"model.path: {d} has no *.safetensors (or *.bin) weight files")
    cfg = hf.read_config(d)
    if cfg.is_moe:
        raise CheckpointError(f"model.path: {d} is already a mixture of experts ({cfg.architecture}); XFT "
                              "upcycles a dense model")
    return d



def render_sets(tok, examples: Mapping[str, list], formats: Mapping[str, str], seq_len: int, max_prompt_len: int
                ) -> dict[str, dict[str, np.ndarray]]:
    """``{domain: {input_ids, attention_mask, loss_mask [N, S]}}``: each domain in its own template."""
    from fusion_jax.data.templates import render_dataset, template_from_format
    out = {}
    for d, exs in examples.items():
        if not exs:
            raise DataError(f"domain {d!r} has no examples")
        t = template_from_format(d, formats[d], bos=tok.bos_token_id is not None)
        r = render_dataset(tok, [dict(e, domain=d) for e in exs], t, seq_len, domains=(d,),
                           max_prompt_len=max_prompt_len)
        out[d] = {k: r[k] for k in xtrain.BATCH_KEYS}
    return out


def _packed(sets: Mapping[str, Mapping[str, np.ndarray]], seq_len: int, pad_id: int) -> dict:
    """Each domain's rows packed end to end (``concat``): router statistics over real tokens only."""
    from fusion_jax.data.packing import pack_sequences
    out = {}
    for d, a in sets.items():
        seqs = [ids[m > 0].tolist() for ids, m in zip(a["input_ids"], a["attention_mask"])]
        out[d] = pack_sequences(seqs, seq_len, pad_id, mode="concat")
    return out


# -- the method's stages -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Trained:
    """What XFT's stages produce (host arrays)."""

    dense_config: Any
    moe_config: Any
    moe_params: dict
    alpha: np.ndarray
    curves: dict                    # {"moe_sft": rows, "merge": rows}

    def merged(self, shared_weight: float, alpha=None) -> dict:
        from fusion_jax.xft.merge import merge_back
        a = self.alpha if alpha is None else alpha
        return merge_back(self.moe_params, self.moe_config, a, shared_weight)[1]


def _monitor(config, sets, c, mesh, merge_of=None) -> Callable | None:
    """The Trainer's ``eval_fn`` of a stage: held-out loss of the ``config`` model on a fixed subset of
    every domain; ``merge_of``: the MoE config whose ``{"alpha", "moe"}`` params are merged first."""
    n = int(c.eval.monitor_examples)
    if n <= 0 or int(c.trainer.eval_every) <= 0 or sets is None:
        return None
    sub = {d: {k: v[:n] for k, v in a.items()} for d, a in sets.items()}
    ev, bs = xtrain.lm_evaluator(config), int(c.eval.batch_size)
    if merge_of is None:
        return lambda params: xtrain.heldout_losses(ev, params, sub, bs, mesh)
    lam = float(c.merge.shared_weight)
    merge = jax.jit(lambda p: xtrain.merged_params(merge_of, p, lam))
    return lambda params: xtrain.heldout_losses(ev, merge(params), sub, bs, mesh)


def _get(group, name: str, default):
    """``group[name]`` of a config group of unknown type (a ConfigDict, a mapping, an object) or ``default``."""
    try:
        return group[name]
    except (KeyError, AttributeError, TypeError):
        return getattr(group, name, default)


def train_xft(dense_config, dense_params, train_sets, c, mesh, work: Path, *, monitor_sets=None,
              timed: Callable = lambda name, fn: fn(), stage: Callable | None = None,
              log_fn: Callable[[str], None] = log) -> Trained:
    """Upcycle -> MoE SFT -> alpha training; each training stage resumes from its checkpoints under ``work``.
    ``timed(name, fn)`` / ``stage(name, fn)``: a :class:`Run`'s, for wall times and the upcycle record."""
    from fusion_jax.xft.merge import init_alpha
    from fusion_jax.xft.upcycle import upcycle
    u, seed = c.upcycle, int(c.seed)
    moe_config, moe_params = upcycle(dense_params, dense_config, experts=int(u.experts), top_k=int(u.top_k),
                                     routing=str(u.routing), key=jax.random.key(seed), noise=bool(u.noise),
                                     router_std=float(u.router_std), layout="fusion")
    moe_config = moe_config.replace(router_noise_eps=float(u.noise_eps), balance_loss_coef=float(u.balance_loss_coef))
    if stage is not None:   # a record of what was upcycled (the upcycle itself is recomputed: it is pure)
        stage("upcycle", lambda: {"architecture": moe_config.architecture, "experts": moe_config.num_experts,
                                  "top_k": moe_config.num_experts_per_tok, "router": moe_config.router,
                                  "params": moe_config.num_params(),
                                  "active_params": moe_config.num_params(active=True),
                                  "dense_params": dense_config.num_params()})
    gd_moe, axes_moe = xtrain.graph(moe_config)
    gd_dense, _ = xtrain.graph(dense_config)
    sft, mg = c.sft, c.merge
    log_fn(f"MoE SFT: {int(sft.steps)} steps x {int(sft.batch_per_domain)} examples per domain, "
        f"{sft.optimizer} lr {float(sft.learning_rate):g}; {moe_config.num_experts} experts, top-"
        f"{moe_config.num_experts_per_tok}{' + shared expert 0' if moe_config.router == 'xft' else ''}")
    moe_params, rows_sft, _ = timed("moe_sft", lambda: xtrain.train_stage(
        "moe_sft", xtrain.moe_sft_loss(gd_moe), moe_params, axes_moe, train_sets, steps=int(sft.steps),
        batch_per_domain=int(sft.batch_per_domain), optimizer=xcfg.stage_optimizer(sft), workdir=work / "moe_sft",
        mesh=mesh, seed=seed + 1, data_seed=seed, trainer_cfg=c.trainer,
        eval_fn=_monitor(moe_config, monitor_sets, c, mesh), log=log_fn))

    log_fn(f"merge back: {int(mg.steps)} steps, alpha only ({'x'.join(map(str, init_alpha(moe_config).shape))}), "
        f"lambda {float(mg.shared_weight):g}, {mg.optimizer} lr {float(mg.learning_rate):g}")
    params = {"alpha": np.asarray(init_alpha(moe_config)), "moe": moe_params}
    axes = {"alpha": ("layers", None), "moe": axes_moe}
    trained, rows_merge, _ = timed("merge", lambda: xtrain.train_stage(
        "merge", xtrain.merge_loss(gd_dense, moe_config, float(mg.shared_weight)), params, axes, train_sets,
        steps=int(mg.steps), batch_per_domain=int(mg.batch_per_domain), optimizer=xcfg.stage_optimizer(mg),
        workdir=work / "merge", mesh=mesh, seed=seed + 2, data_seed=seed, start_step=int(sft.steps),
        trainer_cfg=c.trainer, trainable=xtrain.ALPHA_TRAINABLE,
        # the frozen MoE is the moe_sft stage's result, restored from its checkpoint on a rerun
        save_frozen=False, eval_fn=_monitor(dense_config, monitor_sets, c, mesh, merge_of=moe_config), log=log_fn))
    return Trained(dense_config=dense_config, moe_config=moe_config, moe_params=moe_params,
                   alpha=np.asarray(trained["alpha"]), curves={"moe_sft": rows_sft, "merge": rows_merge})


def train_dense_baseline(dense_config, dense_params, train_sets, c, mesh, work: Path, *, monitor_sets=None):
    """The dense SFT baseline: the MoE SFT's optimizer over the batches of MoE SFT + merge together."""
    from fusion_jax.train.losses import nnx_causal_lm_loss
    sft, mg = c.sft, c.merge
    steps = int(sft.steps) + int(mg.steps)
    log(f"dense SFT (baseline): {steps} steps x {int(sft.batch_per_domain)} examples per domain (= MoE SFT + "
        "merge steps, the same batches)")
    gd, axes = xtrain.graph(dense_config)
    return xtrain.train_stage(
        "dense_sft", nnx_causal_lm_loss(gd), dense_params, axes, train_sets, steps=steps,
        batch_per_domain=int(sft.batch_per_domain),
        optimizer=xcfg.stage_optimizer(sft, warmup_extra=int(mg.warmup_steps)), workdir=work / "dense_sft",
        mesh=mesh, seed=int(c.seed) + 3, data_seed=int(c.seed), trainer_cfg=c.trainer,
        eval_fn=_monitor(dense_config, monitor_sets, c, mesh), log=log)[:2]


def evaluate(t: Trained, dense_params, dense_sft_params, eval_sets, c, mesh, pad_id: int) -> dict:
    """Held-out loss per domain (and their mean) of every model, the learned merge, router load."""
    from fusion_jax.xft.merge import init_alpha, merge_coefficients
    bs, lam = int(c.eval.batch_size), float(c.merge.shared_weight)
    ev_dense, ev_moe = xtrain.lm_evaluator(t.dense_config), xtrain.lm_evaluator(t.moe_config)

    def dense(p):
        return xtrain.heldout_losses(ev_dense, xtrain.place(p, t.dense_config, mesh), eval_sets, bs, mesh)

    losses = {"base": dense(dense_params)}
    if dense_sft_params is not None:
        losses["dense_sft"] = dense(dense_sft_params)
    moe_placed = xtrain.place(t.moe_params, t.moe_config, mesh)
    losses["moe"] = xtrain.heldout_losses(ev_moe, moe_placed, eval_sets, bs, mesh)
    losses["xft"] = dense(t.merged(lam))
    losses["xft_fixed"] = dense(t.merged(lam, np.asarray(init_alpha(t.moe_config))))
    for v in losses.values():
        v["mean"] = float(np.mean([v[d] for d in eval_sets]))
    packed = _packed(eval_sets, int(c.data.seq_len), pad_id)
    load = {d: xtrain.expert_load(t.moe_config, moe_placed, packed[d], bs, mesh).tolist() for d in eval_sets}
    coef = np.asarray(merge_coefficients(t.moe_config, t.alpha, lam))
    return {"eval_loss": losses, "expert_load": load, "experts": expert_divergence(t.moe_params, dense_params),
            "alpha": {"softmax": np.asarray(jax.nn.softmax(t.alpha, axis=-1)).tolist(),
                      "coefficients": coef.tolist(),
                      "max_abs_change": float(np.abs(t.alpha - 1.0).max())}}


def router_summary(t: Trained) -> dict:
    """The MoE SFT's ``router_agreement`` at its first and last logged steps, and its value when the
    noise alone chooses (k of the n routed experts at random)."""
    rows = [r for r in t.curves.get("moe_sft") or [] if "router_agreement" in r]
    c = t.moe_config
    noisy = bool(c.router_noise) and bool(rows)
    return {"noise": bool(c.router_noise),
            "agreement_first": rows[0]["router_agreement"] if noisy else None,
            "agreement_last": rows[-1]["router_agreement"] if noisy else None,
            "agreement_random": c.num_experts_per_tok / c.num_routed_experts}


def expert_divergence(moe_params, dense_params) -> dict:
    """Per layer, how far MoE SFT moved the experts from the dense FFN they were copied from and apart from
    each other (Frobenius norms relative to the dense weights', averaged over gate, up and down):
    ``shared_drift`` = |W_0 - W|, ``routed_drift`` = |mean_i W_i - W|, ``routed_spread`` = the RMS over i of
    |W_i - mean_i W_i|. Experts that specialise spread apart; a spread far below the drift means the routed
    experts learned one common update (and merging them back loses little)."""
    rows = {"shared_drift": [], "routed_drift": [], "routed_spread": []}
    for k in ("gate_proj", "up_proj", "down_proj"):
        W = np.asarray(moe_params["layers"]["mlp"]["experts"][k]["kernel"], np.float64)       # [L, E, ...]
        W0 = np.asarray(dense_params["layers"]["mlp"][k]["kernel"], np.float64)               # [L, ...]
        axes = tuple(range(1, W0.ndim))
        norm = np.sqrt((W0 ** 2).sum(axes))
        mean = W[:, 1:].mean(1)
        rows["shared_drift"].append(np.sqrt(((W[:, 0] - W0) ** 2).sum(axes)) / norm)
        rows["routed_drift"].append(np.sqrt(((mean - W0) ** 2).sum(axes)) / norm)
        rows["routed_spread"].append(np.sqrt(((W[:, 1:] - mean[:, None]) ** 2).sum(tuple(range(2, W.ndim))).mean(1))
                                     / norm)
    return {k: np.mean(v, axis=0).tolist() for k, v in rows.items()}


# -- the job -------------------------------------------------------------------------------------------------
def run(config) -> dict:
    c = xcfg.validate(config)
    quiet_orbax()
    init_distributed(c.distributed)
    from fusion_jax import hf, sharding
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.xft.merge import save_merged

    domains = list(c.data.domains)
    mesh = sharding.make_mesh(c.mesh.to_dict())
    formats = {d: str(c.data.templates[d]) for d in domains}

    # -- 1. everything checkable before training ---------------------------------------------------------------
    path = str(c.model.path)
    if path:
        base_dir = _check_model_dir(path)
        train_ex, eval_ex = examples_from_config(c.data, domains)
    run_dir = Run.open(c, fingerprint=xcfg.training_fingerprint(c))
    out_dir, work = run_dir.out_dir, run_dir.work

    # -- 2. the dense model and the data ---------------------------------------------------------------------------
    zoo = None
    if not path:
        from fusion_jax.zoo import build_family
        spec, corpus_spec = xcfg.zoo_specs(c)
        zoo = run_dir.timed("zoo", lambda: build_family(spec, corpus_spec, cache_dir=str(c.zoo.cache_dir),
                                                        mesh=mesh, trainer_cfg=c.trainer, log=log))
        base_dir = zoo.base_dir
        corpus = zoo.corpus()
        cap_t, cap_e = int(c.data.max_train_examples), int(c.data.max_eval_examples)
        train_ex = {d: corpus[d]["train"][:cap_t or None] for d in domains}
        eval_ex = {d: corpus[d]["eval"][:cap_e or None] for d in domains}
    tok = load_tokenizer(base_dir)
    S, P = int(c.data.seq_len), int(c.data.max_prompt_len)
    train_sets, eval_sets = run_dir.timed("render", lambda: (render_sets(tok, train_ex, formats, S, P),
                                                              render_sets(tok, eval_ex, formats, S, P)))
    load_kw = {"dtype": str(c.model.dtype)}
    if str(c.model.param_dtype):
        load_kw["param_dtype"] = str(c.model.param_dtype)
    dense_config, dense_params = run_dir.timed("load", lambda: hf.load(base_dir, **load_kw))
    dense_params = sharding.host_tree(dense_params)
    log(f"dense model: {dense_config.architecture} {dense_config.num_params() / 1e6:.2f}M params ({base_dir}); "
        + ", ".join(f"{d} {len(train_sets[d]['input_ids'])}/{len(eval_sets[d]['input_ids'])}" for d in domains)
        + " train/eval examples")

    # -- 3. XFT: upcycle -> MoE SFT -> merge; export; the dense baseline -------------------------------------------
    t = train_xft(dense_config, dense_params, train_sets, c, mesh, work, monitor_sets=eval_sets,
                  timed=run_dir.timed, stage=run_dir.stage)
    lam = float(c.merge.shared_weight)

    def export():
        out = save_merged(t.moe_params, t.moe_config, out_dir / "merged", t.alpha, shared_weight=lam,
                          source_dir=base_dir, dtype=str(c.export.dtype) or None, overwrite=True)
        np.save(out_dir / "alpha.npy", t.alpha)
        return str(out)

    merged_dir = run_dir.stage("export", lambda: export() if is_main() else str(out_dir / "merged"))
    dense_sft_params, rows_dense = None, []
    if bool(c.baseline.enabled):
        dense_sft_params, rows_dense = run_dir.timed("dense_sft", lambda: train_dense_baseline(
            dense_config, dense_params, train_sets, c, mesh, work, monitor_sets=eval_sets))

    # -- 4. evaluation and report -------------------------------------------------------------------------------
    results = run_dir.stage("eval", lambda: evaluate(t, dense_params, dense_sft_params, eval_sets, c, mesh,
                                                     tok.pad_token_id if tok.pad_token_id is not None else 0))
    ev = results["eval_loss"]
    log("held-out loss (mean over domains): " + ", ".join(f"{m} {v['mean']:.4f}" for m, v in ev.items()))
    curves = dict(t.curves, dense_sft=rows_dense)
    steps = {"moe_sft": int(c.sft.steps), "merge": int(c.merge.steps),
             "dense_sft": int(c.sft.steps) + int(c.merge.steps) if bool(c.baseline.enabled) else 0}
    report = dict(results, steps=steps, domains=domains, router=router_summary(t))
    checks = xreport.checks(report)
    timings = dict(run_dir.timings, total_s=run_dir.total_seconds())
    if is_main():
        xreport.write_all(out_dir, report, checks, timings, curves, c, {
            "merged_dir": merged_dir, "base_dir": str(base_dir), "mesh": dict(mesh.shape),
            "devices": [str(dv) for dv in jax.devices()], "process_count": jax.process_count(),
            "zoo": str(zoo.root) if zoo is not None else None})
    barrier("xft-report")
    log(f"XFT: wrote {out_dir} in {timings['total_s']:.0f}s; checks: "
        + ", ".join(f"{k}={'PASS' if v['pass'] else 'FAIL'}" for k, v in checks.items()))
    return {"report": report, "checks": checks, "timings": timings, "out_dir": str(out_dir),
            "merged_dir": merged_dir}


# -- the arena -----------------------------------------------------------------------------------------------
def arena_contestant(family, *, steps: int, batch_per_domain: int, work_dir: str | Path,
                     domains: tuple[str, ...] = xcfg.DOMAINS, formats: Mapping[str, str] | None = None,
                     seq_len: int = 96, max_prompt_len: int = 40, train_examples: int = 0, mesh=None,
                     trainer_cfg=None, seed: int = 0, log_fn: Callable[[str], None] = log) -> Path:
    """XFT on a zoo ``family`` (``base_dir``, ``tokenizer_dir``, ``corpus()``) within ``steps`` optimizer
    steps of ``batch_per_domain`` examples of each domain (the first ``train_examples`` per domain; 0 = all),
    each domain in ``formats[d]`` (default: the demo templates). The steps split as the reference's epochs:
    4/5 MoE SFT, 1/5 merge; the demo preset's optimizer, lr and warmup ratios. Returns the merged dense HF
    directory ``<work_dir>/model`` (reused when it exists; the training stages resume under ``work_dir``)."""
    import ml_collections as mlc

    from fusion_jax import hf, sharding
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.xft.merge import save_merged
    work = Path(work_dir)
    out = work / "model"
    if (out / "config.json").is_file():
        return out
    c = xcfg.get_config("demo")
    c.seed = int(seed)
    c.data.domains = tuple(domains)
    c.data.templates = mlc.ConfigDict(dict(formats or xcfg.DEMO_TEMPLATES))
    c.data.seq_len, c.data.max_prompt_len = int(seq_len), int(max_prompt_len)
    moe_steps = max(1, round(0.8 * int(steps)))
    for g, n in ((c.sft, moe_steps), (c.merge, max(1, int(steps) - moe_steps))):
        g.warmup_steps = round(int(g.warmup_steps) * n / int(g.steps))
        g.steps, g.batch_per_domain = n, int(batch_per_domain)
    if trainer_cfg is not None:
        for k in ("save_every", "keep_checkpoints", "log_every", "progress", "async_checkpointing"):
            c.trainer[k] = _get(trainer_cfg, k, c.trainer[k])
    c.trainer.eval_every = 0
    c = xcfg.validate(c)
    mesh = mesh if mesh is not None else sharding.make_mesh()
    tok = load_tokenizer(family.tokenizer_dir)
    corpus = family.corpus()
    train = {d: corpus[d]["train"][: int(train_examples) or None] for d in domains}
    sets = render_sets(tok, train, c.data.templates, int(seq_len), int(max_prompt_len))
    config, params = hf.load(family.base_dir)
    log_fn(f"xft: {c.sft.steps} MoE SFT + {c.merge.steps} merge steps x {batch_per_domain} per domain")
    t = train_xft(config, sharding.host_tree(params), sets, c, mesh, work, log_fn=log_fn)
    if is_main():
        save_merged(t.moe_params, t.moe_config, out, t.alpha, shared_weight=float(c.merge.shared_weight),
                    source_dir=family.base_dir, overwrite=True)
    barrier("xft-arena")
    return out
