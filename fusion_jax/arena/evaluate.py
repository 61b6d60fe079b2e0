"""How the arena measures a contestant, the same way for every one.

- **Eval loss per domain**: mean response-token cross-entropy on the held-out sets of the UltraFuser
  report (each domain's first ``eval.loss_examples`` eval examples of the demo corpus, and the same mixed
  set: responses that switch domain mid-answer), rendered with the same sequence length and prompt cut.
  Each contestant is rendered under its template policy (:mod:`fusion_jax.arena.contestants`).
- **Math**: greedy answer accuracy on the demo corpus's held-out math problems (numeric answers after
  ``####``, :func:`fusion_jax.eval.answers.extract_answer`), and the share of outputs with any answer.
- **Code**: pass@1 (greedy) of tiny generated function + test tasks (:mod:`fusion_jax.data.code_tasks`)
  run in the sandbox, and the share of outputs that parse as Python.

Every item's output is kept in ``<run>/outputs/<contestant>/`` (:class:`fusion_jax.eval.tasks.Records`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

BASE_FORMAT = "{prompt}\n"   # the demo base was pre-trained on "prompt\nresponse" documents


def templates_for(policy: str, model, domain: str, domains, formats: dict, bos: bool):
    """What :mod:`fusion_jax.eval.tasks` takes as ``template`` for ``domain`` under ``policy``."""
    from fusion_jax.data.templates import template_from_format
    if policy == "fused":
        return "auto"
    if policy == "base":
        return template_from_format("base", BASE_FORMAT, bos=bos)
    if policy.startswith("own:"):
        name = policy.split(":", 1)[1]
        return template_from_format(name, formats[name], bos=bos)
    if policy == "domain":
        d = domain if domain in formats else domains[0]
        return template_from_format(d, formats[d], bos=bos)
    raise ValueError(f"unknown template policy {policy!r}")


def evaluate_contestant(model, policy: str, sets: dict, out_dir: Path, c, domains, formats,
                        seq_len: int, max_prompt_len: int) -> dict:
    """``{"loss": {domain: loss}, "math": {...}, "code": {...}}`` of one loaded model."""
    from fusion_jax.eval import tasks as T
    from fusion_jax.eval.generation import GenerationConfig
    tok = model.require_tokenizer()
    bos = tok.bos_token_id is not None
    ev = c.eval
    out_dir.mkdir(parents=True, exist_ok=True)
    loss_rec = T.Records(out_dir / "loss.jsonl")
    loss = {}
    for d, exs in sets["loss"].items():
        t = templates_for(policy, model, d, domains, formats, bos)
        loss[d] = T.loss_task(model, {d: exs}, loss_rec, template=t, seq_len=seq_len,
                              max_prompt_len=max_prompt_len, batch_size=int(ev.batch_size))[d]["loss"]
    result = {"loss": loss}
    defaults = model.generation_defaults()
    if sets["math"]:
        cfg = GenerationConfig(max_new_tokens=int(ev.math_max_new_tokens), batch_size=int(ev.batch_size),
                               **defaults)
        result["math"] = T.math_task(model, sets["math"], T.Records(out_dir / "math.jsonl"), cfg,
                                     template=templates_for(policy, model, "math", domains, formats, bos))
    if sets["code"]:
        cfg = GenerationConfig(max_new_tokens=int(ev.code_max_new_tokens), batch_size=int(ev.batch_size),
                               **defaults)
        rec = T.Records(out_dir / "code.jsonl", key="task_id")
        r = T.code_task(model, sets["code"], rec, cfg, ks=(1,),
                        template=templates_for(policy, model, "code", domains, formats, bos))
        comps = [x for row in rec.ordered([p["task_id"] for p in sets["code"]]) for x in row["completions"]]
        r["parses"] = float(np.mean([_parses(x) for x in comps])) if comps else 0.0
        result["code"] = r
    return result


def _parses(code: str) -> bool:
    try:
        ast.parse(code)
    except (SyntaxError, ValueError):
        return False
    return bool(code.strip())
