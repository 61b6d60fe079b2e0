"""``run(config)``: FuseLLM and FuseChat end to end (``python train.py --config=configs/fusellm.py`` or
``configs/fusechat.py``).

Stages (each resumable: a rerun of the same command skips what is done):

1. models: the student (FuseChat: the pivot) and the teachers (the sources), HF directories of any
   architecture :mod:`fusion_jax.hf` loads, or the demo zoo's families (built once, cached);
2. corpus: one set of texts in every tokenization (:mod:`fusion_jax.distill.data`; FuseLLM documents,
   FuseChat prompt + response in one template), every tokenizer checked to spell the same text;
3. teacher passes: each teacher's (and, with ``distill.with_ref_model``, the student's own) top-k and
   cross-entropies in a store (:mod:`fusion_jax.distill.teacher_pass`, resumable by shard);
4. alignment: each teacher's store moved to the student's positions and vocabulary
   (:mod:`fusion_jax.distill.aligned`);
5. training (Orbax checkpoints, resume): FuseLLM one student on all teachers at once; FuseChat one
   pairwise target per source (the pivot's own distribution vs that source, response tokens only),
   then the targets merged (:func:`fusion_jax.merging.merge`, VaRM or SCE); the baseline is the same
   student trained with the CLM term only on the same batches and steps;
6. evaluation: per domain, held-out response loss in nats per byte (comparable across tokenizers) of
   every model, and the report (``report.json``, ``report.md``, plots).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fusion_jax.distill import config as dcfg
from fusion_jax.distill import data as dd
from fusion_jax.errors import ConfigError
from fusion_jax.train.run import Run, barrier, init_distributed, is_main, log, quiet_orbax

STUDENT = "student"


@dataclasses.dataclass
class Model:
    name: str
    dir: Path
    tokenizer_dir: Path
    tok: Any = None

    def load_tokenizer(self) -> "Model":
        from fusion_jax.data.tokenizer import load_tokenizer
        self.tok = load_tokenizer(self.tokenizer_dir)
        return self


# -- 1. models ---------------------------------------------------------------------------------------------
def zoo_specs(c):
    """The demo zoo's families: ``{name: FamilySpec}`` (student first) and the corpus spec."""
    from fusion_jax.zoo import CorpusSpec, spec_from_config
    S = int(c.data.seq_len)
    specs = {STUDENT: spec_from_config(c.zoo.student, seq_len=S, max_prompt_len=S // 2)}
    for n in c.teachers.names:
        specs[str(n)] = spec_from_config(c.zoo.teachers[str(n)], seq_len=S, max_prompt_len=S // 2)
    specs = {n: dataclasses.replace(s, seed=int(c.zoo.seed)) for n, s in specs.items()}
    corpus = CorpusSpec(seed=int(c.data.seed), n_train=int(c.data.n_train), n_eval=int(c.data.n_eval),
                        domains=tuple(c.data.domains))
    return specs, corpus


def resolve_models(c, run: Run | None, mesh) -> tuple[Model, list[Model], dict, dict | None]:
    """(student, teachers, zoo curves, demo corpus or None); checks every model's vocabulary and word-start
    marker before any work."""
    from fusion_jax.distill.markers import detect_marker
    from fusion_jax.distill.teacher_pass import check_vocabulary
    names = [str(n) for n in c.teachers.names]
    curves, corpus = {}, None
    if str(c.student.path):
        student = Model(STUDENT, Path(str(c.student.path)).expanduser(),
                        Path(str(c.student.tokenizer or c.student.path)).expanduser())
        toks = list(c.teachers.tokenizers) or list(c.teachers.paths)
        teachers = [Model(n, Path(str(p)).expanduser(), Path(str(t or p)).expanduser())
                    for n, p, t in zip(names, c.teachers.paths, toks)]
    else:
        from fusion_jax.zoo import build_family
        specs, corpus_spec = zoo_specs(c)

        def build():
            return {n: build_family(s, corpus_spec, cache_dir=str(c.zoo.cache_dir), mesh=mesh, trainer_cfg=c.trainer,
                                    log=log, name=f"demo zoo ({n})") for n, s in specs.items()}

        fams = run.timed("zoo", build) if run is not None else build()
        student = Model(STUDENT, fams[STUDENT].base_dir, fams[STUDENT].tokenizer_dir)
        teachers = [Model(n, fams[n].base_dir, fams[n].tokenizer_dir) for n in names]
        curves = {n: f.curves().get("base", []) for n, f in fams.items()}
        corpus = fams[STUDENT].corpus()
    for m in [student] + teachers:
        if not (m.dir / "config.json").is_file():
            raise ConfigError(f"{'student' if m.name == STUDENT else 'teacher ' + m.name}: {m.dir} is not a "
                              "checkpoint directory (no config.json)")
        what = "student" if m.name == STUDENT else f"teacher {m.name}"
        m.load_tokenizer()
        check_vocabulary(m.dir, m.tok, what)
        try:   # a tokenizer without a known word-start marker cannot be aligned
            detect_marker(m.tok)
        except ConfigError as e:
            raise ConfigError(f"{what}: tokenizer {m.tokenizer_dir}: {e}") from None
        _check_shipped_tokenizer(m, what)
    return student, teachers, curves, corpus


def _check_shipped_tokenizer(m: Model, what: str) -> None:
    """A tokenizer given apart from a checkpoint that ships its own must be the same vocabulary."""
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.distill.vocab_map import tokenizer_fingerprint
    if m.tokenizer_dir.resolve() == m.dir.resolve() or not (m.dir / "tokenizer.json").is_file():
        return
    if tokenizer_fingerprint(load_tokenizer(m.dir)) != tokenizer_fingerprint(m.tok):
        raise ConfigError(f"{what}: the tokenizer {m.tokenizer_dir} is not the one {m.dir} ships with (another "
                          "vocabulary); the teacher's logits are over its own")


# -- 2. corpus ---------------------------------------------------------------------------------------------
def _examples(c, demo_corpus) -> tuple[dict, dict]:
    domains = list(c.data.domains)
    cap_t, cap_e = int(c.data.max_train_examples) or None, int(c.data.max_eval_examples) or None
    if demo_corpus is not None:
        return ({d: demo_corpus[d]["train"][:cap_t] for d in domains},
                {d: demo_corpus[d]["eval"][:cap_e] for d in domains})
    from fusion_jax.data.loading import examples_from_config
    return examples_from_config(c.data, domains, eval_required=False)


@dataclasses.dataclass
class Corpora:
    train: dd.Corpus
    eval: dd.Corpus
    train_tok: dict            # model name -> dd.Tokenized
    eval_tok: dict

    @property
    def fingerprint(self) -> str:
        return self.train.fingerprint()


def build_corpora(c, models: list[Model], demo_corpus) -> Corpora:
    """The training and evaluation texts fitted to every tokenizer, tokenized by each; every teacher's
    tokenization checked to spell the student's text."""
    train_ex, eval_ex = _examples(c, demo_corpus)
    toks = [m.tok for m in models]
    layout = "document" if c.method == "fusellm" else "response"
    recs = [dict(e, domain=d) for d, exs in train_ex.items() for e in exs]
    train = dd.Corpus(tuple(dd.documents(recs) if layout == "document" else
                            [{"domain": r["domain"], "prompt": r["prompt"], "response": r["response"]} for r in recs]),
                      layout, str(c.data.template))
    train = dd.fit(train, toks, int(c.data.seq_len))
    ev = [{"domain": d, "prompt": e["prompt"], "response": e["response"]} for d, exs in eval_ex.items() for e in exs]
    evc = dd.fit(dd.Corpus(tuple(ev), "response", str(c.data.template)), toks, int(c.data.eval_seq_len)) if ev else None
    train_tok = {m.name: dd.tokenize(m.tok, train) for m in models}
    eval_tok = {m.name: dd.tokenize(m.tok, evc) for m in models} if evc is not None else {}
    student = models[0]
    for m in models[1:]:
        dd.check_same_text(student.tok, m.tok, train_tok[student.name], train_tok[m.name],
                           f"teacher {m.name} ({m.tokenizer_dir}) vs the student's tokenizer")
    return Corpora(train, evc, train_tok, eval_tok)


# -- 3-4. teacher passes and alignment --------------------------------------------------------------------
def store_root(c, run: Run) -> Path:
    return Path(str(c.teacher_pass.store_dir)).expanduser() if str(c.teacher_pass.store_dir) else run.work / "stores"


def teacher_stores(c, run: Run, student: Model, teachers: list[Model], corpora: Corpora, mesh) -> dict:
    """``{name: Store}``: each teacher's pass (and the student's own as ``"ref"`` with
    ``distill.with_ref_model``), each a stage of ``run``."""
    from fusion_jax.distill.store import Store
    from fusion_jax.distill.teacher_pass import run_teacher_pass, store_summary
    from fusion_jax.distill.vocab_map import tokenizer_fingerprint
    tp = c.teacher_pass
    todo = ([("ref", student)] if bool(c.distill.with_ref_model) else []) + [(m.name, m) for m in teachers]
    out, made = {}, {}   # made: the stores this process computed (opened and checked by the pass itself)
    for name, m in todo:
        fps = {"corpus": corpora.fingerprint, "tokenizer": tokenizer_fingerprint(m.tok)}
        path = store_root(c, run) / name

        def one(name=name, m=m, fps=fps, path=path):
            s = made[name] = run_teacher_pass(m.dir, m.tok, corpora.train_tok[m.name], path, fingerprints=fps, k=int(tp.top_k),
                                 batch_per_device=int(tp.batch_per_device), shard_sequences=int(tp.shard_sequences),
                                 pad_multiple=int(tp.pad_multiple), logit_format=str(tp.logit_format),
                                 logit_chunk=int(tp.logit_chunk), dtype=str(tp.dtype),
                                 shard_params=bool(tp.shard_params), mesh=mesh,
                                 progress=bool(c.trainer.progress), desc=f"teacher pass ({name})", log=log)
            return store_summary(s)

        run.stage(f"teacher_pass_{name}", one)
        # a store from an earlier run is opened (and its shards' hashes checked) once, here
        out[name] = made.get(name) or Store.open(
            path, {"fingerprints.corpus": fps["corpus"], "fingerprints.tokenizer": fps["tokenizer"]},
            f"teacher store ({name})")
    return out


def aligned_stores(c, run: Run, student: Model, teachers: list[Model], corpora: Corpora, stores: dict
                   ) -> tuple[dict, dict]:
    """``({teacher name: aligned Store}, {teacher name: position shares})``, each a stage of ``run``."""
    from fusion_jax.distill.aligned import AlignOptions, align_teacher, position_stats
    from fusion_jax.distill.store import Store
    from fusion_jax.distill.vocab_map import tokenizer_fingerprint
    opts = AlignOptions(**c.align.to_dict())
    out, stats, made = {}, {}, {}
    for m in teachers:
        path = run.work / "aligned" / m.name
        fps = {"corpus": corpora.fingerprint, "student_tokenizer": tokenizer_fingerprint(student.tok)}

        def one(m=m, path=path, fps=fps):
            a = made[m.name] = align_teacher(student.tok, m.tok, corpora.train_tok[STUDENT], corpora.train_tok[m.name],
                              stores[m.name], path, opts, fingerprints=fps, student_vocab_size=_vocab(student),
                              log=log, desc=f"align ({m.name})")
            return dict(position_stats(a), bytes_per_token=a.bytes_per_token)

        stats[m.name] = run.stage(f"align_{m.name}", one)
        out[m.name] = made.get(m.name) or Store.open(path, {"fingerprints.corpus": fps["corpus"]},
                                                     f"aligned store ({m.name})")
    return out, stats


def _vocab(m: Model) -> int:
    from fusion_jax import hf
    return int(hf.read_config(m.dir).vocab_size)


# -- 5. training --------------------------------------------------------------------------------------------
def train_arrays(c, corpora: Corpora) -> dict:
    """``{domain: {input_ids, attention_mask, loss_mask, fusion_mask, row}}`` of the student's sequences."""
    student_tok = corpora.train_tok[STUDENT]
    arr = student_tok.padded(int(c.data.seq_len), 0)
    if c.method == "fusellm":   # every real position (FuseLLM's attention_mask)
        fm = arr["attention_mask"].astype(np.float32)
    else:                       # positions whose NEXT token is a response token
        fm = np.concatenate([arr["loss_mask"][:, 1:], np.zeros_like(arr["loss_mask"][:, :1])], 1).astype(np.float32)
    arr["fusion_mask"] = fm
    arr["row"] = np.arange(len(student_tok), dtype=np.int32)
    doms = np.asarray(corpora.train.domains)
    return {d: {k: v[doms == d] for k, v in arr.items()} for d in c.data.domains if (doms == d).any()}


def _run_cfg(c, n_rows: dict):
    t = c.train
    steps = int(t.steps)
    if steps == 0:   # one epoch over the largest domain at `batch` rows of each domain per step
        steps = max(1, math.ceil(max(n_rows.values()) / int(t.batch)))
    warm = int(t.warmup_steps) or int(math.ceil(float(t.warmup_ratio) * steps))
    from fusion_jax.zoo import LMRun
    return LMRun(steps, int(t.batch), float(t.learning_rate), warm)


def train_student(c, run: Run, student: Model, name: str, arrays: dict, mesh, *, lam: float, candidates=None,
                  out: Path) -> list:
    """Train (or resume) the student into ``out`` (an HF directory); returns the metrics rows."""
    from flax import nnx

    from fusion_jax import hf
    from fusion_jax import sharding as shd
    from fusion_jax.distill.loss import make_distill_loss
    from fusion_jax.models import abstract_model, param_logical_axes
    from fusion_jax.train.run import train_on_arrays
    kw = {"dtype": str(c.student.dtype)}
    if str(c.student.param_dtype):
        kw["param_dtype"] = str(c.student.param_dtype)
    cfg, params = hf.load(student.dir, **kw)
    graphdef = nnx.split(abstract_model(cfg), nnx.Param)[0]
    d = c.distill
    loss = make_distill_loss(graphdef, lam=lam, method=str(d.fusion), temperature=float(d.temperature),
                             chunk=int(d.loss_chunk), reward_precision=str(d.reward_precision))
    t = c.train
    run_cfg = _run_cfg(c, {k: len(v["row"]) for k, v in arrays.items()})
    params, rows = train_on_arrays(loss, params, param_logical_axes(cfg), arrays, run_cfg, run.work / name, mesh,
                                   int(c.seed), c.trainer, name, grad_clip=float(t.grad_clip) or None,
                                   schedule=str(t.schedule), end_lr_ratio=float(t.end_lr_ratio),
                                   weight_decay=float(t.weight_decay), betas=(0.9, float(t.b2)),
                                   batch_fn=None if candidates is None else candidates.batch_fn, meta={"run": name})
    params = shd.host_tree(params)
    if is_main():
        hf.save(params, cfg, out, source_dir=student.tokenizer_dir, overwrite=True)
    barrier(f"saved-{name}")
    return [{k: v for k, v in r.items() if isinstance(v, (int, float))} for r in rows]


def merge_targets(c, pivot: Model, targets: dict, out: Path) -> dict:
    """FuseChat's merge of the pairwise targets (mergekit-style config through :func:`fusion_jax.merging.
    merge`), the pivot as the base of the deltas."""
    from fusion_jax.merging import merge
    cfg = {"merge_method": str(c.merge.method), "base_model": str(pivot.dir),
           "models": [{"model": str(p)} for p in targets.values()], "dtype": str(c.merge.dtype),
           "tokenizer_source": "base"}
    if str(c.merge.method) in ("sce", "sce_fusechat"):
        cfg["parameters"] = {"select_topk": float(c.merge.select_topk)}
    if str(c.merge.method) == "linear":
        cfg["models"] = [{"model": str(p), "parameters": {"weight": 1.0}} for p in targets.values()]
        cfg.pop("base_model")
    if is_main():
        merge(cfg, out, overwrite=True, quiet=True)
    barrier("merged")
    return cfg


# -- 6. evaluation ------------------------------------------------------------------------------------------
def evaluate(c, models: dict, corpora: Corpora, mesh) -> dict:
    """``{model: {domain: {"nll", "tokens", "bytes"}}}``: held-out response NLL sums (each model in its
    own tokenizer, every model on the same cut texts)."""
    from flax import nnx

    from fusion_jax import hf
    from fusion_jax.eval.loss import make_lm_eval, sum_over_batches
    from fusion_jax.models import abstract_model
    doms = np.asarray(corpora.eval.domains)
    nbytes = dd.response_bytes(corpora.eval)
    out = {}
    for label, (m, tok_name) in models.items():
        cfg, params = hf.load(m, mesh=mesh, dtype=str(c.student.dtype))
        ev = make_lm_eval(nnx.split(abstract_model(cfg), nnx.Param)[0])
        arr = corpora.eval_tok[tok_name].padded(int(c.data.eval_seq_len), 0)
        out[label] = {}
        for d in c.data.domains:
            sel = doms == d
            if not sel.any():
                continue
            nll, tokens = sum_over_batches(ev, params, {k: v[sel] for k, v in arr.items()}, int(c.eval.batch_size),
                                           mesh)[:2]
            out[label][d] = {"nll": float(nll), "tokens": float(tokens), "bytes": int(nbytes[sel].sum())}
        log(f"eval {label}: " + ", ".join(f"{d} {v['nll'] / v['bytes']:.4f}" for d, v in out[label].items())
            + " nats/byte")
    return out


def mince_choices(stores: list, names: list[str], precision: str) -> dict[str, float]:
    """Share of training sequences whose MinCE candidate is each of ``names`` (first max wins)."""
    import jax.numpy as jnp

    from fusion_jax.distill.fusion import rewards
    ce = np.stack([s.seq_ce for s in stores], 1)
    pick = np.asarray(jnp.argmax(rewards(ce, precision), axis=1))
    return {n: float((pick == i).mean()) for i, n in enumerate(names)}


# -- the job ---------------------------------------------------------------------------------------------
def prepare(c, run: Run, mesh):
    """Stages 1-3 (shared by the pipeline and ``fusion-jax teacher-pass``): models, corpora, stores."""
    student, teachers, zoo_curves, demo = resolve_models(c, run, mesh)
    corpora = run.timed("corpus", lambda: build_corpora(c, [student] + teachers, demo))
    log(f"corpus: {len(corpora.train)} training sequences ({corpora.fingerprint}), "
        f"{len(corpora.eval) if corpora.eval is not None else 0} evaluation examples; tokens per sequence: "
        + ", ".join(f"{n} {t.lengths.mean():.1f}" for n, t in corpora.train_tok.items()))
    stores = teacher_stores(c, run, student, teachers, corpora, mesh)
    return student, teachers, zoo_curves, corpora, stores


def start(config) -> tuple[Any, Any, Run]:
    """``(validated config, mesh, run directory)``: what every entry point of the wing does first (this
    pipeline and ``fusion-jax teacher-pass``, which must find the same run directory)."""
    from fusion_jax import sharding
    c = dcfg.validate(config)
    quiet_orbax()
    init_distributed(c.distributed)
    mesh = sharding.make_mesh(c.mesh.to_dict())
    return c, mesh, Run.open(c, fingerprint=dcfg.fingerprint(c))


def run(config) -> dict:
    from fusion_jax.distill import report as drep
    from fusion_jax.distill.aligned import Candidates
    c, mesh, run_dir = start(config)
    out_dir = run_dir.out_dir
    student, teachers, zoo_curves, corpora, stores = prepare(c, run_dir, mesh)
    aligned, align_stats = aligned_stores(c, run_dir, student, teachers, corpora, stores)
    arrays = train_arrays(c, corpora)
    S = int(c.data.seq_len)
    lam = float(c.distill.lam)
    ref = stores.get("ref")
    curves: dict[str, list] = {}
    eval_models: dict[str, tuple] = {}
    cand_names = (["ref"] if ref is not None else []) + [m.name for m in teachers]
    info: dict[str, Any] = {"candidates": cand_names}
    if c.method == "fusellm":
        cands = Candidates([ref] + [aligned[m.name] for m in teachers], S)
        info["mince_choice"] = mince_choices(cands.stores, cand_names, str(c.distill.reward_precision))
        curves["distilled"] = run_dir.stage("train_distilled", lambda: train_student(
            c, run_dir, student, "distilled", arrays, mesh, lam=lam, candidates=cands, out=out_dir / "distilled"))
        eval_models["distilled"] = (out_dir / "distilled", STUDENT)
    else:
        targets = {}
        for m in teachers:
            cands = Candidates([ref, aligned[m.name]], S)
            info.setdefault("mince_choice", {})[m.name] = mince_choices(cands.stores, ["pivot", m.name],
                                                                        str(c.distill.reward_precision))
            targets[m.name] = out_dir / "targets" / m.name
            curves[f"target_{m.name}"] = run_dir.stage(f"train_target_{m.name}", lambda m=m, cands=cands: train_student(
                c, run_dir, student, f"target_{m.name}", arrays, mesh, lam=lam, candidates=cands, out=targets[m.name]))
        info["merge_config"] = run_dir.stage("merge", lambda: merge_targets(c, student, targets, out_dir / "merged"))
        eval_models["merged"] = (out_dir / "merged", STUDENT)
        for n, p in targets.items():
            eval_models[f"target_{n}"] = (p, STUDENT)
    if bool(c.baseline):
        curves["baseline"] = run_dir.stage("train_baseline", lambda: train_student(
            c, run_dir, student, "baseline", arrays, mesh, lam=1.0, out=out_dir / "baseline"))
        eval_models["baseline"] = (out_dir / "baseline", STUDENT)
    eval_models[STUDENT if c.method == "fusellm" else "pivot"] = (student.dir, STUDENT)
    for m in teachers:
        eval_models[m.name] = (m.dir, m.name)
    results = run_dir.stage("eval", lambda: evaluate(c, eval_models, corpora, mesh)) if corpora.eval is not None else {}
    run_dir.timings["total_s"] = run_dir.total_seconds()
    info["stores"] = {n: {"bytes_per_token": round(s.bytes_per_token, 3), "n_tokens": s.n_tokens,
                          "mean_seq_ce": float(np.mean(s.seq_ce))} for n, s in stores.items()}
    info["aligned"] = align_stats
    report = drep.build(c, results, info, [m.name for m in teachers])
    if is_main():
        drep.write_all(out_dir, c, report, curves, zoo_curves, run_dir.timings,
                       {"mesh": dict(mesh.shape), "devices": [str(d) for d in jax.devices()],
                        "process_count": jax.process_count(),
                        "models": {k: str(v[0]) for k, v in eval_models.items()}})
    barrier("distill-report")
    log(f"{c.method}: wrote {out_dir} in {run_dir.timings['total_s']:.0f}s; checks: "
        + ", ".join(f"{k}={'PASS' if v['pass'] else 'FAIL'}" for k, v in report["checks"].items()))
    return {"report": report, "timings": run_dir.timings, "out_dir": str(out_dir)}
