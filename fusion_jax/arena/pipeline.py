"""``run(config)``: the fusion arena (``fusion-jax arena`` / ``python train.py --config=configs/arena.py``).

1. Validate the config; resolve every contestant (a method whose wing is not installed is "missing").
2. The demo zoo of the UltraFuser config (built once and cached, shared with the main job).
3. For each contestant: build it (``Run.stage("build_<name>")``: resumable per method; merged and
   trained models under ``<run>/work/contestants/<name>/``), then evaluate it
   (``Run.stage("eval_<name>_<evalhash>")``, item outputs in ``<run>/outputs/<name>/``). A failure of one
   contestant (a bug in a wing, a broken model) is recorded in the table and the arena goes on.
4. Write ``<output_dir>/<name>/``: ``report.json``, ``report.md`` (one table), ``arena.png``, ``run.json``.
"""
from __future__ import annotations

import hashlib
import json
import time
import traceback

from fusion_jax.arena import config as acfg
from fusion_jax.arena import report as areport
from fusion_jax.arena.contestants import CONTESTANTS, Budget, Context, Entry, resolve
from fusion_jax.errors import FusionError
from fusion_jax.train.run import Run, is_main, log, quiet_orbax


def _eval_sets(family, u, c, tok) -> dict:
    """The held-out sets (the UltraFuser report's: same examples, same mixed set), math problems and code
    tasks."""
    from fusion_jax.data.code_tasks import code_tasks
    from fusion_jax.eval.tasks import math_problems_from
    from fusion_jax.ultrafuser import data as udata
    corpus = family.corpus()
    domains = list(u.data.domains)
    n = int(c.eval.loss_examples)
    ev = {d: corpus[d]["eval"][:n] for d in domains}
    S, P = int(u.data.seq_len), int(u.data.max_prompt_len)
    # the UltraFuser pipeline draws the mixed set from its (max_eval_examples-capped) eval sets
    pool = {d: corpus[d]["eval"][: int(u.data.max_eval_examples) or None] for d in domains}
    ev["mixed"] = udata.mixed_examples(pool, tok, int(u.data.mixed_eval_examples), S - P,
                                       int(u.data.seed) + 1)[: int(c.eval.mixed_examples)]
    math = [{"id": f"math/{i}", "question": e["prompt"], "answer": e["answer"]}
            for i, e in enumerate(corpus["math"]["eval"][: int(c.eval.math_problems)])] if "math" in corpus else []
    return {"loss": ev, "math": math_problems_from(math) if math else [],
            "code": code_tasks(int(c.eval.code_tasks), seed=int(c.seed)) if int(c.eval.code_tasks) else []}


def _eval_hash(c) -> str:
    return hashlib.sha256(json.dumps(c.eval.to_dict(), sort_keys=True).encode()).hexdigest()[:8]


def run(config) -> dict:
    c = acfg.validate(config)
    quiet_orbax()
    from fusion_jax import sharding
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.eval.models import load_eval_model
    from fusion_jax.ultrafuser.config import zoo_specs
    from fusion_jax.zoo import build_family

    u = acfg.ultrafuser_config(c)
    names = list(c.contestants)
    resolved = {n: resolve(n) for n in names}
    run_dir = Run.open(c, fingerprint=acfg.fingerprint(c))
    mesh = sharding.make_mesh()
    spec, corpus_spec = zoo_specs(u)
    family = run_dir.timed("zoo", lambda: build_family(spec, corpus_spec, cache_dir=str(u.zoo.cache_dir),
                                                       mesh=mesh, trainer_cfg=u.trainer, log=log))
    tok = load_tokenizer(family.tokenizer_dir)
    domains = tuple(u.data.domains)
    formats = {d: str(u.specialists.templates[d]) for d in domains}
    budget = Budget(steps=int(u.stage1.steps) + int(u.stage2.steps),
                    batch_per_domain=int(u.stage2.batch_per_domain),
                    train_examples=int(u.data.max_train_examples))
    sets = _eval_sets(family, u, c, tok)
    eh = _eval_hash(c)
    S, P = int(u.data.seq_len), int(u.data.max_prompt_len)

    rows: dict[str, dict] = {}
    for name in names:
        family_name, _, what = CONTESTANTS[name]
        fn, why = resolved[name]
        row = {"family": family_name, "what": what}
        rows[name] = row
        if fn is None:
            row.update(status="missing", reason=why)
            log(f"{name}: missing ({why})")
            continue
        ctx = Context(family=family, domains=domains, formats=formats, seq_len=S, max_prompt_len=P, budget=budget,
                      mesh=mesh, trainer=c.trainer, config=c, ultrafuser_config=u, run=run_dir, log=log, name=name)
        try:
            log(f"{name}: build")
            entry = Entry(**run_dir.stage(f"build_{name}", lambda: fn(ctx).to_json()))
            row.update(entry.to_json())

            def evaluate():
                from fusion_jax.arena.evaluate import evaluate_contestant
                t = time.perf_counter()
                model = load_eval_model(entry.path)
                if model.tokenizer is None:
                    model.tokenizer = tok
                out = evaluate_contestant(model, entry.template, sets, run_dir.out_dir / "outputs" / name, c,
                                          domains, formats, S, P)
                out["eval_s"] = time.perf_counter() - t
                return out

            log(f"{name}: evaluate ({entry.template} template)")
            row.update(run_dir.stage(f"eval_{name}_{eh}", evaluate))
            row["build_s"] = run_dir.timings.get(f"build_{name}_s", 0.0)
            row["status"] = "ok"
            log(f"{name}: " + areport.summary(row))
        except FusionError as e:
            row.update(status="failed", reason=f"{type(e).__name__}: {e}")
            log(f"{name}: FAILED: {e}")
        except Exception as e:   # a bug in one wing must not cost the other contestants' results
            row.update(status="failed", reason=f"{type(e).__name__}: {e}")
            log(f"{name}: FAILED with a bug:\n{traceback.format_exc()}")
    timings = dict(run_dir.timings, total_s=run_dir.total_seconds())
    report = {"contestants": rows, "domains": list(domains) + ["mixed"], "budget": budget.__dict__,
              "zoo": str(family.root)}
    if is_main():
        areport.write_all(run_dir.out_dir, report, timings, c, u)
    log(f"arena: wrote {run_dir.out_dir} in {timings['total_s']:.0f}s")
    return {"report": report, "timings": timings, "out_dir": str(run_dir.out_dir)}
