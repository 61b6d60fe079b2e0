"""Math answer extraction against a table of tricky cases, equality, majority vote, program extraction
and the ToRA tool-use loop (with scripted generate_fn and both a fake and the real sandbox)."""
from __future__ import annotations

from fractions import Fraction

import pytest

from fusion_jax.eval import answers as A

CASES = [
    ("She has 5 + 3 = 8 apples.\n#### 8", "8"),
    ("#### 1,234", "1234"),
    ("#### $1,234.50", "1234.5"),
    ("#### -3", "-3"),
    ("#### 3/4", "0.75"),
    ("#### 0.50", "0.5"),
    ("#### 18\nThe end: 99", "18"),                     # only the line after ####
    ("He has 2 1/2 pies.\n#### 2 1/2", "2.5"),           # a mixed number in an answer span
    ("The answer is \\boxed{\\frac{3}{4}}.", "0.75"),
    ("\\boxed{\\dfrac{1}{2}}", "0.5"),
    ("\\boxed{\\frac34}", "0.75"),
    ("\\boxed{-\\frac{2}{3}}", "-0.6666666667"),
    ("first \\boxed{1} then \\boxed{1{,}000}", "1000"),  # the last box; LaTeX thousands
    ("\\boxed{1\\,000}", "1000"),
    ("\\boxed{12\\%}", "12"),
    ("\\boxed{\\left( 3 \\right)}", "3"),
    ("\\boxed{\\text{(B)}}", "(B)"),                      # not a number: normalised text
    ("\\boxed{x^2 + 1}", "x^2+1"),
    ("So the total is 50%.", "50"),                       # percent: GSM8K writes 50
    ("The answer is: 18 apples.", "18"),
    ("The answer is .5", "0.5"),
    ("The answer is 7.\n\nCheck: 3 + 4 = 7 and 10 - 3 = 7, so 2 steps", "7"),
    ("The answer is 10 cm.", "10"),
    ("Answer: 42", "42"),
    ("The answer is $\\frac{7}{2}$", "3.5"),
    ("It costs $12.00 in total.", "12"),
    ("The price is \\$5.50 each, so 3 cost \\$16.50.", "16.5"),
    ("Tom ran 3-5 miles on Monday and 6 miles on Tuesday; 6-5", "5"),   # a range/difference is not -5
    ("x = \u22127", "-7"),                                 # Unicode minus
    ("The temperature is -12 degrees", "-12"),
    ("1,000,000 people came", "1000000"),
    ("Items: 1,2,3", "3"),                                 # a list, not a thousands separator
    ("Result: 1.5e3", "1500"),
    ("The angle is 45^\\circ", "45"),
    ("v2 of the model scores 10", "10"),
    ("It is +5", "5"),
    ("No numbers here", None),
    ("", None),
]


@pytest.mark.parametrize("text,want", CASES)
def test_extract_answer_table(text, want):
    assert A.extract_answer(text) == want


def test_parse_number_exact_fractions():
    assert A.parse_number("$1,234.50") == Fraction(2469, 2)
    assert A.parse_number("\\frac{3}{4}") == Fraction(3, 4)
    assert A.parse_number("-2 1/2") == Fraction(-5, 2)
    assert A.parse_number("18 apples") == 18
    assert A.parse_number("1/0") is None and A.parse_number("x + 1") is None and A.parse_number(None) is None


def test_equality_with_tolerance():
    assert A.numbers_equal(Fraction(1, 3), 0.33333)
    assert not A.numbers_equal(Fraction(1, 3), 0.333)
    assert A.numbers_equal(0.0, 1e-10) and not A.numbers_equal(0.0, 1e-6)
    assert A.is_correct("so she pays $1234.\n#### 1234", "Work...\n#### 1,234")
    assert A.is_correct("The answer is \\boxed{\\frac{1}{4}}", 0.25)
    assert A.is_correct("The answer is 18", 18) and not A.is_correct("The answer is 17", 18)
    assert A.is_correct("\\boxed{x^2+1}", "x^2 + 1")
    assert not A.is_correct("no answer", 3)


def test_majority_vote():
    assert A.majority_vote(["18", "17", "18.0", None, "17", "1.8e1"]) == ("18", 3)
    assert A.majority_vote(["3", "4"]) == ("3", 1)                     # a tie: the first seen
    assert A.majority_vote([None, None]) == (None, 0)
    samples = ["... #### 5", "The answer is 6", "\\boxed{5}"]
    assert A.majority_vote([A.extract_answer(s) for s in samples]) == ("5", 2)


def test_extract_program_takes_the_last_closed_python_block():
    text = "```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\nand ```python\nprint(3)"  # last is open
    assert A.extract_program(text) == "print(2)\n"
    assert A.extract_program("no code") is None


class _Res:
    def __init__(self, status, stdout="", reason=""):
        self.status, self.stdout, self.reason, self.stderr = status, stdout, reason, ""


def test_tool_use_loop_with_scripted_model():
    """Problem 0 writes two programs, then answers; problem 1 answers at once; problem 2 never stops
    writing programs and is cut after max_rounds."""
    seen = []

    def generate_fn(prompts):
        seen.append(list(prompts))
        outs = []
        for p in prompts:
            if p.startswith("P0"):
                n = p.count("```output")
                outs.append(["Let me compute.\n```python\nprint(6 * 7)\n```\n```output\nFAKE",
                             "Check.\n```python\nprint(42 + 0)\n```",
                             "So the answer is \\boxed{42}."][n])
            elif p.startswith("P1"):
                outs.append("Easy: 2 + 2 = 4. The answer is 4.")
            else:
                outs.append("```python\nwhile True: pass\n```")
        return outs

    calls = []

    def run_fn(codes):
        calls.append(list(codes))
        return [_Res("ok", "42\n") if "print" in c else _Res("timeout", reason="wall time limit") for c in codes]

    traces = A.tool_use(["P0: q", "P1: q", "P2: q"], generate_fn, run_fn, max_rounds=2)
    t0, t1, t2 = traces
    assert t0.answer == "42" and t0.programs == ["print(6 * 7)\n", "print(42 + 0)\n"]
    # the model's own "```output" (a hallucinated result) is dropped and replaced by the real one
    assert "FAKE" not in t0.text and t0.text.count("```output\n42\n```") == 2
    assert t1.answer == "4" and t1.programs == [] and len(seen[1]) == 2   # round 2: P0 and P2 only
    assert len(t2.programs) == 2 and "TimeoutError" in t2.text
    assert [len(c) for c in calls] == [2, 2]
    # each continuation sees its prompt + everything so far
    assert seen[1][0].startswith("P0: qLet me compute.") and seen[1][0].endswith("```output\n42\n```\n")


def test_tool_use_with_the_real_sandbox():
    def generate_fn(prompts):
        return ["```python\nfrom fractions import Fraction\nprint(Fraction(1, 3) + Fraction(1, 6))\n```"
                if "```output" not in p else "The answer is \\boxed{\\frac{1}{2}}" for p in prompts]

    from functools import partial
    from fusion_jax.eval.sandbox import run_programs
    (trace,) = A.tool_use(["Q: "], generate_fn, partial(run_programs, timeout_s=5, site_packages=False))
    assert trace.results[0].status == "ok" and "```output\n1/2\n```" in trace.text
    assert trace.answer == "0.5" and A.is_correct(trace.text, 0.5)


def test_demo_math_solutions_extract_to_their_answers():
    """The reference: the demo corpus's generated GSM8K-style problems know their answers."""
    import random
    from fusion_jax.data.math_problems import generate_problem
    rng = random.Random(0)
    for _ in range(300):
        p = generate_problem(rng)
        assert A.extract_answer(p["solution"]) == str(p["answer"])
        assert A.is_correct(p["solution"], p["answer"]) and A.is_correct(p["solution"], p["solution"])
        assert not A.is_correct(p["solution"], p["answer"] + 1)
