"""Math answers: extraction (GSM8K ``####``, ``\\boxed{}``, "the answer is", else the last number),
normalisation, equality with tolerance, majority vote; and ToRA-style tool use as a pure loop over a
``generate_fn`` and the sandbox.

Normalisation turns an answer span into a number where it is one: thousands separators (``1,234``,
``1{,}234``, ``1\\,234``), signs (``-``, ``+``, the Unicode minus), decimals (``.5``, ``2.50``),
fractions (``3/4``, ``\\frac{3}{4}``, ``\\dfrac34``, mixed ``2 1/2``), scientific ``1.5e3``; currency
(``$``, ``\\$``, ``€``, ``£``), percent signs (``50%`` is 50, GSM8K's convention), ``\\text{...}`` and
trailing unit words are stripped. Numbers are compared as exact fractions first, then with a relative
tolerance (``numbers_equal``). A span that is not a number (``x^2 + 1``) is compared as normalised text.

This is the one implementation for the package (``fusion_jax.data.math_problems`` makes the problems).
"""
from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from typing import Callable, Sequence

# -- numbers -------------------------------------------------------------------------------------------
_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
# a number in running text: a sign only where it cannot be a binary minus ("3-5" is not -5)
_NUM_IN_TEXT = re.compile(r"(?:(?<![\w)\]}.])[-+])?(?<![\w.])(?:" + _NUM + r")(?:/(?:" + _NUM + r"))?")
_FULL = re.compile(r"^([-+])?(" + _NUM + r")(?:\s*/\s*(" + _NUM + r"))?$")
_MIXED = re.compile(r"^([-+])?(\d+)\s+(\d+)\s*/\s*(\d+)$")
_LATEX_FRAC = re.compile(r"\\[dt]?frac\s*(?:\{([^{}]*)\}|(\d))\s*(?:\{([^{}]*)\}|(\d))")
_CURRENCY = re.compile(r"\\\$|\$|€|£|¥|\bUSD\b|\bdollars?\b|\bcents?\b", re.I)


def _clean(s: str) -> str:
    """Strip the wrapping and formatting that never changes a number's value."""
    s = s.replace("\u2212", "-").replace("\u2013", "-")
    s = re.sub(r"\\(?:left|right|displaystyle|,|!|;|:)", "", s)
    s = s.replace("{,}", "")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r" \1 ", s)
    s = s.replace("\\%", "%").replace("^\\circ", "").replace("^{\\circ}", "").replace("°", "")
    s = _CURRENCY.sub("", s)
    # a fraction \frac{a}{b} of plain numbers -> a/b; a mixed 2\frac{1}{2} -> 2 1/2
    def frac(m):
        mixed = m.start() > 0 and m.string[m.start() - 1].isdigit()
        return f"{' ' if mixed else ''}{(m.group(1) or m.group(2)).strip()}/{(m.group(3) or m.group(4)).strip()}"

    s = _LATEX_FRAC.sub(frac, s)
    return s.strip()


def _to_fraction(text: str) -> Fraction | None:
    try:
        return Fraction(text.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def parse_number(s: str | None) -> Fraction | None:
    """The number a whole answer span states (see the module docstring), exactly; None if it is not one.

    ``"$1,234.50"`` -> 2469/2, ``"\\frac{3}{4}"`` -> 3/4, ``"50%"`` -> 50, ``"2 1/2"`` -> 5/2,
    ``"18 apples"`` -> 18 (one number followed by unit words), ``"x + 1"`` -> None.
    """
    if s is None:
        return None
    t = _clean(str(s)).strip().rstrip(".").strip()
    t = re.sub(r"\s*%$", "", t)
    t = re.sub(r"^\{(.*)\}$|^\((.*)\)$", lambda m: m.group(1) or m.group(2) or "", t).strip()
    t = re.sub(r"\s+[A-Za-z][A-Za-z\s.]*$", "", t)       # trailing unit words: "18 apples", "5 cm"
    t = re.sub(r"\s*%$", "", t).strip()
    m = _MIXED.match(t)
    if m:
        sign = -1 if m.group(1) == "-" else 1
        return sign * (int(m.group(2)) + Fraction(int(m.group(3)), int(m.group(4)))) if int(m.group(4)) else None
    m = _FULL.match(t)
    if not m:
        return None
    num = _to_fraction(m.group(2))
    den = _to_fraction(m.group(3)) if m.group(3) else Fraction(1)
    if num is None or den is None or den == 0:
        return None
    value = num / den
    return -value if m.group(1) == "-" else value


def format_number(x: Fraction) -> str:
    """Canonical text of a number: an integer as ``18``, anything else as up to 10 significant digits."""
    if x.denominator == 1:
        return str(x.numerator)
    return f"{float(x):.10g}"


def numbers_equal(a, b, rel_tol: float = 1e-4, abs_tol: float = 1e-8) -> bool:
    """Exact for equal fractions; else ``|a - b| <= max(rel_tol * max(|a|, |b|), abs_tol)``."""
    if a is None or b is None:
        return False
    if isinstance(a, Fraction) and isinstance(b, Fraction) and a == b:
        return True
    a, b = float(a), float(b)
    return abs(a - b) <= max(rel_tol * max(abs(a), abs(b)), abs_tol)


# -- extraction ----------------------------------------------------------------------------------------
def _boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        m = re.match(r"\\boxed\s+(\S+)", text[start:])        # "\boxed 5"
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def _numbers(text: str) -> list[str]:
    return _NUM_IN_TEXT.findall(_clean(text))


def _from_span(span: str, first_number: bool = True) -> str | None:
    """A span that should hold the answer: the whole span if it is a number, else (``first_number``) its
    first number, else the span itself as normalised text (non-numeric answers)."""
    value = parse_number(span)
    if value is not None:
        return format_number(value)
    nums = _numbers(span) if first_number else []
    if nums:
        v = parse_number(nums[0])
        return format_number(v) if v is not None else nums[0]
    t = normalize_text(span)
    return t or None


def normalize_text(s: str) -> str:
    """Non-numeric answers: drop ``\\text{}``/``\\left``/``\\right``, spaces, a final period, wrapping ``$``."""
    t = _clean(s)
    t = re.sub(r"\s+", "", t).strip(".").strip()
    return t


_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?", re.I)


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalised (:func:`format_number` for numbers), or None.

    In order: the text after the last ``####`` (GSM8K), the last ``\\boxed{}`` (MATH, ToRA), the text
    after the last "answer is" / "answer:", else the last number anywhere.
    """
    if text is None:
        return None
    if "####" in text:
        span = text.rsplit("####", 1)[1].strip().split("\n", 1)[0]
        return _from_span(span) if span.strip() else None
    box = _boxed(text)
    if box is not None:
        return _from_span(box, first_number=False)    # a box holds the whole answer, numeric or not
    found = list(_ANSWER_IS.finditer(text))
    if found:
        span = text[found[-1].end():].strip().split("\n", 1)[0]
        if _numbers(span):
            return _from_span(span)
    nums = _numbers(text)
    if not nums:
        return None
    v = parse_number(nums[-1])
    return format_number(v) if v is not None else None


def answers_match(pred: str | None, gold: str | None, rel_tol: float = 1e-4) -> bool:
    """Two extracted answers: numerically with tolerance when both are numbers, else as text."""
    if pred is None or gold is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return numbers_equal(a, b, rel_tol)
    return normalize_text(pred) == normalize_text(gold)


def is_correct(solution: str, gold, rel_tol: float = 1e-4) -> bool:
    """Does a generated ``solution`` reach ``gold`` (a number, an answer string or a GSM8K solution)?"""
    g = gold if not isinstance(gold, str) or "####" not in gold else extract_answer(gold)
    if isinstance(g, (int, float, Fraction)):
        g = format_number(Fraction(g)) if not isinstance(g, float) else repr(g)
    else:
        g = _from_span(g, first_number=False) if g is not None else None
    return answers_match(extract_answer(solution), g, rel_tol)


def majority_vote(answers: Sequence[str | None], rel_tol: float = 1e-4) -> tuple[str | None, int]:
    """The most common answer among k samples (None = no answer, never wins) and its count. Answers that
    :func:`answers_match` count as one; a tie goes to the answer seen first."""
    groups: list[list] = []   # [representative, count]
    for a in answers:
        if a is None:
            continue
        for grp in groups:
            if answers_match(a, grp[0], rel_tol):
                grp[1] += 1
                break
        else:
            groups.append([a, 1])
    if not groups:
        return None, 0
    best = max(groups, key=lambda g: g[1])  # max keeps the first of equal counts
    return best[0], best[1]


# -- ToRA-style tool use -------------------------------------------------------------------------------
_PROGRAM = re.compile(r"```(?:python|py|python3)[ \t]*\n(.*?)```", re.S)
OUTPUT_STOP = "```output"


def extract_program(text: str) -> str | None:
    """The last fenced ```python block (closed) of ``text``, or None."""
    found = _PROGRAM.findall(text)
    return found[-1] if found else None


def _ends_with_program(text: str) -> bool:
    """The completion stopped right after a closed python block: the model now waits for its output."""
    found = list(_PROGRAM.finditer(text))
    return bool(found) and not text[found[-1].end():].strip()


def format_output(result, max_chars: int = 800) -> str:
    """What the model sees after its program ran (ToRA's convention): stdout, or the error's last line;
    long output keeps its head and tail."""
    if result.status == "ok":
        out = result.stdout.strip()
    elif result.status == "timeout":
        out = "TimeoutError: the program ran out of time"
    else:
        out = result.reason or result.stderr.strip().splitlines()[-1:] or result.status
        out = out if isinstance(out, str) else out[0]
    if len(out) > max_chars:
        out = out[:max_chars // 2] + "\n...\n" + out[-max_chars // 2:]
    return f"{OUTPUT_STOP}\n{out}\n```\n"


@dataclasses.dataclass
class ToolTrace:
    """One problem's tool-use episode: the full completion (model text and program outputs), the
    programs run and their sandbox results, and the extracted answer."""

    text: str
    programs: list[str]
    results: list
    answer: str | None


def tool_use(prompts: Sequence[str], generate_fn: Callable[[list[str]], list[str]],
             run_fn: Callable[[list[str]], list] | None = None, max_rounds: int = 4,
             max_output_chars: int = 800) -> list[ToolTrace]:
    """ToRA's loop for many problems at once, as a pure function of two callbacks.

    Each round, ``generate_fn(prompts_so_far) -> completions`` continues every open problem (it should
    stop at ``"```output"``; text from that marker on is dropped anyway). A completion that ends with a
    closed ```python block has that program run by ``run_fn(programs) -> sandbox Results`` (default:
    :func:`fusion_jax.eval.sandbox.run_programs` with default limits); its output is appended as
    ```output ...``` and the problem goes on to the next round; any other completion ends the problem.
    At most ``max_rounds`` programs run per problem (then one last continuation writes the answer).
    """
    if run_fn is None:
        from fusion_jax.eval.sandbox import run_programs
        run_fn = run_programs
    texts = ["" for _ in prompts]
    programs: list[list[str]] = [[] for _ in prompts]
    results: list[list] = [[] for _ in prompts]
    open_ = list(range(len(prompts)))
    for rnd in range(max_rounds + 1):
        if not open_:
            break
        outs = generate_fn([prompts[i] + texts[i] for i in open_])
        if len(outs) != len(open_):
            raise ValueError(f"generate_fn returned {len(outs)} completions for {len(open_)} prompts")
        run_ids, run_codes = [], []
        for i, out in zip(open_, outs):
            out = out.split(OUTPUT_STOP, 1)[0]
            texts[i] += out
            if rnd < max_rounds and _ends_with_program(out):
                run_ids.append(i)
                run_codes.append(extract_program(out))
        for i, code, res in zip(run_ids, run_codes, run_fn(run_codes) if run_codes else []):
            programs[i].append(code)
            results[i].append(res)
            texts[i] += ("" if texts[i].endswith("\n") else "\n") + format_output(res, max_output_chars)
        open_ = run_ids
    return [ToolTrace(t, p, r, extract_answer(t)) for t, p, r in zip(texts, programs, results)]
