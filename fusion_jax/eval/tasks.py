"""Evaluation tasks on an :class:`~fusion_jax.eval.models.EvalModel`, with results written as they come.

- :func:`loss_task`: held-out response loss and perplexity per domain (prompt/response examples).
- :func:`math_task`: math answer accuracy, GSM8K format (:mod:`fusion_jax.eval.answers`), with chain of
  thought or ToRA-style tool use (``tool_rounds > 0``: programs run in the sandbox), and majority vote
  over ``num_samples`` samples.
- :func:`code_task`: pass@k of HumanEval-format problems (:mod:`fusion_jax.eval.code`) in the sandbox.

**Incremental results.** Every task appends one JSON line per finished item (a domain, a problem) to its
:class:`Records` file and skips the items already there, so a rerun after an interruption continues where
it stopped and loses nothing. A generated program that misbehaves is stopped by the sandbox and scored
as a failure; the run goes on. Metrics are computed from the records.

**Templates.** ``template``: ``"auto"`` (a fused model: each specialist's own template, one per view; a
plain model: the raw text), ``"raw"`` (the text as it is, with the tokenizer's own special tokens, e.g.
BOS), ``"chat"`` (the tokenizer's chat template), a format string with ``{prompt}``, a
``PromptTemplate``, or one per view.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from fusion_jax.errors import ConfigError, DataError
from fusion_jax.eval import answers as ans
from fusion_jax.eval.generation import Completion, GenerationConfig, encode, generate


# -- incremental records ---------------------------------------------------------------------------------
class Records:
    """One JSON object per finished item in ``path`` (append-only, flushed and fsynced per block); a torn
    last line (a run killed mid-write) is ignored and rewritten on the next run."""

    def __init__(self, path: str | Path, key: str = "id"):
        self.path = Path(path)
        self.key = key
        self.rows: dict[str, dict] = {}
        if self.path.is_file():
            good = []
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                self.rows[str(row[key])] = row
                good.append(line)
            self.path.write_text("".join(g + "\n" for g in good))   # drop a torn line before appending

    def __contains__(self, item_id) -> bool:
        return str(item_id) in self.rows

    def add(self, rows: Iterable[dict]) -> None:
        rows = list(rows)
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for r in rows:
                f.write(json.dumps(r, default=_json_default) + "\n")
                self.rows[str(r[self.key])] = r
            f.flush()
            os.fsync(f.fileno())

    def ordered(self, ids: Sequence) -> list[dict]:
        return [self.rows[str(i)] for i in ids if str(i) in self.rows]


def _json_default(x):
    if isinstance(x, (np.floating, np.integer, np.bool_)):
        return x.item()
    raise TypeError(f"not JSON-serializable: {type(x).__name__}")


# -- prompts --------------------------------------------------------------------------------------------
def resolve_templates(model, template: Any = "auto"):
    """What :func:`fusion_jax.eval.generation.encode` takes for ``model``: None (raw), a template, or one
    per view (see the module docstring)."""
    from fusion_jax.data.templates import CHAT, PromptTemplate, template_from_format
    if isinstance(template, (list, tuple)):
        if len(template) != model.views:
            raise ConfigError(f"{len(template)} templates for a model with {model.views} views")
        return [resolve_templates(model, t) for t in template]
    if isinstance(template, PromptTemplate):
        t = template
    elif template in (None, "raw"):
        t = None
    elif template == "auto":
        if model.views > 1:
            if not model.templates:
                raise ConfigError(f"{model.path}: the fused model records no specialist templates; "
                                  "give --template")
            return list(model.templates)
        t = None
    elif template == "chat":
        t = CHAT
    elif isinstance(template, str) and "{prompt}" in template:
        t = template_from_format("custom", template, bos=model.tokenizer is None
                                 or model.tokenizer.bos_token_id is not None)
    else:
        raise ConfigError(f"template {template!r}: expected auto, raw, chat or a format with {{prompt}}")
    return t if model.views == 1 else [t] * model.views


def encode_prompts(model, prompts: Sequence, template: Any = "auto") -> list:
    """Token ids of ``prompts`` for ``model`` (K views each for a fused model)."""
    tok = model.require_tokenizer()
    t = resolve_templates(model, template)
    if isinstance(t, list) and all(x is None for x in t):   # raw text in every view
        ids = encode(tok, prompts, None)
        return [[list(x)] * len(t) for x in ids]
    return encode(tok, prompts, t)


def generate_texts(model, prompts: Sequence, config: GenerationConfig, template: Any = "auto", *,
                   progress: bool = False) -> list[list[Completion]]:
    return generate(model.decoder, model.params, encode_prompts(model, prompts, template), config,
                    tokenizer=model.require_tokenizer(), progress=progress)


def _bar(total: int, desc: str, progress: bool):
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="item")


def _blocks(items: Sequence, size: int):
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + size]


# -- loss -------------------------------------------------------------------------------------------------
def loss_task(model, examples: Mapping[str, Sequence[dict]], records: Records, *, template: Any = "auto",
              seq_len: int = 512, max_prompt_len: int | None = None, batch_size: int = 8,
              progress: bool = False) -> dict[str, dict]:
    """``{domain: {"loss", "ppl", "tokens", "examples"}}``: mean response-token NLL of each domain's
    examples (prompt/response rows), rendered in ``template`` (one per view for a fused model)."""
    from fusion_jax.data.templates import PromptTemplate, render_dataset
    from fusion_jax.eval.scoring import response_loss
    tok = model.require_tokenizer()
    t = resolve_templates(model, template)
    tmpls = t if isinstance(t, list) else [t]
    bos = tok.bos_token_id is not None
    tmpls = [x if x is not None else PromptTemplate("raw", bos=bos) for x in tmpls]
    todo = [d for d in examples if d not in records]
    bar = _bar(len(todo), "loss", progress)
    for d in todo:
        exs = [dict(e, domain=d) for e in examples[d]]
        r = render_dataset(tok, exs, tmpls if model.views > 1 else tmpls[0], seq_len, domains=(d,),
                           max_prompt_len=max_prompt_len)
        res = response_loss(model.decoder, model.params, r, batch_size)
        records.add([{"id": d, **res, "examples": len(r["loss_mask"])}])
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {d: {k: v for k, v in records.rows[d].items() if k != "id"} for d in examples}


# -- math -------------------------------------------------------------------------------------------------
TORA_INSTRUCTION = ("Solve the problem. You may write Python in a ```python block; its output will be shown "
                    "in an ```output block. End with the final answer after ####.\n\n")


def math_problems_from(rows: Sequence[dict], *, question_field: str = "question",
                       answer_field: str = "answer", id_field: str = "id") -> list[dict]:
    """``[{"id", "question", "answer"}]`` from GSM8K-style rows (the answer: a number, or a solution whose
    final answer follows ``####``)."""
    out = []
    for i, r in enumerate(rows):
        q, a = r.get(question_field), r.get(answer_field)
        if not isinstance(q, str) or a is None:
            raise DataError(f"math problem {i + 1}: needs a {question_field!r} string and an {answer_field!r}")
        gold = ans.extract_answer(a) if isinstance(a, str) and "####" in a else str(a)
        out.append({"id": str(r.get(id_field, i)), "question": q, "answer": gold})
    return out


def math_task(model, problems: Sequence[dict], records: Records, config: GenerationConfig, *,
              template: Any = "auto", tool_rounds: int = 0, instruction: str = "", block: int = 32,
              run_fn: Callable | None = None, progress: bool = False) -> dict:
    """Answer accuracy of ``config.num_samples`` samples per problem (``accuracy``: mean over samples;
    ``maj@k``: the majority answer's accuracy when k > 1; ``answered``: samples with any final answer).
    ``tool_rounds > 0``: ToRA-style (programs run in the sandbox, output appended, up to that many
    rounds); ``instruction`` is put before each question."""
    todo = [p for p in problems if p["id"] not in records]
    bar = _bar(len(todo), "math" + (" (tools)" if tool_rounds else ""), progress)
    k = int(config.num_samples)
    for blk in _blocks(todo, block):
        questions = [instruction + p["question"] for p in blk]
        if tool_rounds > 0:
            texts = _tool_samples(model, questions, config, template, tool_rounds, run_fn)
        else:
            outs = generate_texts(model, questions, config, template)
            texts = [[c.text or "" for c in o] for o in outs]
        rows = []
        for p, samples in zip(blk, texts):
            preds = [ans.extract_answer(s) for s in samples]
            correct = [ans.answers_match(x, p["answer"]) for x in preds]
            maj, _ = ans.majority_vote(preds)
            rows.append({"id": p["id"], "answer": p["answer"], "predictions": preds, "correct": correct,
                         "majority": maj, "majority_correct": ans.answers_match(maj, p["answer"]),
                         "outputs": samples})
        records.add(rows)
        if bar is not None:
            bar.update(len(blk))
    if bar is not None:
        bar.close()
    done = records.ordered([p["id"] for p in problems])
    out = {"problems": len(done), "samples": k,
           "accuracy": float(np.mean([np.mean(r["correct"]) for r in done])) if done else 0.0,
           "answered": float(np.mean([np.mean([x is not None for x in r["predictions"]]) for r in done]))
           if done else 0.0}
    if k > 1:
        out[f"maj@{k}"] = float(np.mean([r["majority_correct"] for r in done])) if done else 0.0
    return out


def _tool_samples(model, questions, config: GenerationConfig, template, rounds: int, run_fn):
    """ToRA's loop (:func:`fusion_jax.eval.answers.tool_use`) for ``num_samples`` samples of each question:
    each round continues the text so far (prompt in the template + the model's text + program outputs)."""
    import dataclasses
    k = int(config.num_samples)
    one = dataclasses.replace(config, num_samples=1, stop=tuple(config.stop) + (ans.OUTPUT_STOP,))
    tok = model.require_tokenizer()
    views = encode_prompts(model, questions, template)                # [q][K] ids (or [q] ids)
    # tool_use hands back "prompt + text so far"; each prompt is a marker naming its row
    rows = [(qi, s) for qi in range(len(questions)) for s in range(k)]
    markers = [f"\x00{j}\x00" for j in range(len(rows))]

    def generate_fn(texts: list[str]) -> list[str]:
        prompts = []
        for t in texts:
            j = int(t[1:t.index("\x00", 1)])
            so_far = t[t.index("\x00", 1) + 1:]
            cont = tok(so_far, add_special_tokens=False)["input_ids"] if so_far else []
            base = views[rows[j][0]]
            prompts.append(list(base) + list(cont) if model.views == 1 else [list(v) + list(cont) for v in base])
        cfg = dataclasses.replace(one, seed=int(config.seed) + len(texts))
        outs = generate(model.decoder, model.params, prompts, cfg, tokenizer=tok)
        return [o[0].text or "" for o in outs]

    traces = ans.tool_use(markers, generate_fn, run_fn, max_rounds=rounds)
    return [[traces[qi * k + s].text for s in range(k)] for qi in range(len(questions))]


# -- code -------------------------------------------------------------------------------------------------
def code_task(model, problems: Sequence[dict], records: Records, config: GenerationConfig, *,
              ks: Sequence[int] = (1,), template: Any = "auto", block: int = 32, limits=None,
              progress: bool = False) -> dict:
    """pass@k (unbiased) of ``config.num_samples`` samples per HumanEval-format problem, each program run
    in the sandbox. A problem with an ``instruction`` field is asked in words (rendered in ``template``)
    and the sample is the whole function; otherwise the model completes ``prompt`` (raw code) and the
    completion is cut at HumanEval's stop sequences."""
    from fusion_jax.eval import code as ec
    todo = [p for p in problems if p["task_id"] not in records]
    bar = _bar(len(todo), "code", progress)
    kw = {"limits": limits} if limits is not None else {}
    for blk in _blocks(todo, block):
        instr = [p for p in blk if p.get("instruction")]
        plain = [p for p in blk if not p.get("instruction")]
        samples: dict[str, list[str]] = {}
        if instr:
            outs = generate_texts(model, [p["instruction"] for p in instr], config, template)
            for p, o in zip(instr, outs):
                samples[p["task_id"]] = [c.text or "" for c in o]
        if plain:
            import dataclasses
            cfg = dataclasses.replace(config, stop=tuple(dict.fromkeys(tuple(config.stop) + ec.HUMANEVAL_STOP)))
            outs = generate_texts(model, [p["prompt"] for p in plain], cfg, "raw")
            for p, o in zip(plain, outs):
                samples[p["task_id"]] = [ec.truncate_completion(c.text or "") for c in o]
        pairs = [(t, c) for p in blk for t, c in [(p["task_id"], s) for s in samples[p["task_id"]]]]
        checked = ec.check_samples(blk, pairs, **kw)
        rows = {p["task_id"]: {"task_id": p["task_id"], "completions": [], "passed": [], "statuses": []}
                for p in blk}
        for (tid, c), (_, ok, res) in zip(pairs, checked):
            rows[tid]["completions"].append(c)
            rows[tid]["passed"].append(bool(ok))
            rows[tid]["statuses"].append(res.status)
        records.add(rows.values())
        if bar is not None:
            bar.update(len(blk))
    if bar is not None:
        bar.close()
    done = records.ordered([p["task_id"] for p in problems])
    n = np.array([len(r["passed"]) for r in done])
    c = np.array([sum(r["passed"]) for r in done])
    out: dict[str, Any] = {"problems": len(done), "samples": int(config.num_samples)}
    for kk in ks:
        if len(done) and int(kk) <= n.min():
            out[f"pass@{int(kk)}"] = float(ec.pass_at_k(n, c, int(kk)).mean())
    statuses: dict[str, int] = {}
    for r in done:
        for s in r["statuses"]:
            statuses[s] = statuses.get(s, 0) + 1
    out["statuses"] = statuses
    return out
