"""The demo corpus: three domains of instruction/response examples, built offline and deterministically.

* ``text``: English prose from the standard library's ``pydoc_data.topics`` and the docstrings of
  standard-library modules (read with ``ast``, nothing imported), with code blocks, doctests and
  reST headings removed. Prompt ``Continue the passage: <first sentence>``; response: the rest.
* ``code``: functions and methods from the standard library's source files (``ast`` source segments).
  Prompt: ``Write the Python function `name(signature)`.`` plus the docstring's summary; response:
  the code.
* ``math``: generated word problems (:mod:`fusion_jax.data.math_problems`) with worked solutions that
  end in ``#### <answer>``.

Examples are ``{"domain", "prompt", "response", "source"}``. Train and eval are disjoint *by source*
(topic, module, file, generated question): all examples of one source land in one split. The result is a
pure function of ``(seed, sizes, Python version)``.

Layout written by :func:`write_demo_corpus`::

    out/text/train.jsonl  out/text/eval.jsonl   (likewise code/, math/)
    out/mixed/train.jsonl out/mixed/eval.jsonl  (all domains, interleaved)
    out/manifest.json     (seed, sizes, counts, Python version)

Command line: ``python -m fusion_jax.data.demo_corpus --out DIR [--seed 0 --train 2000 --eval 200]``.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import random
import re
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

from fusion_jax.data.math_problems import generate_problem
from fusion_jax.errors import DataError
from fusion_jax.utils.hashing import stable_hash

DOMAINS = ("text", "code", "math")

# ----------------------------------------------------------------------------------------------- helpers


def _stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages", "__pycache__",
              "ensurepip", "turtledemo", "tkinter", "pydoc_data", "config-3", "venv"}


def _stdlib_files() -> list[Path]:
    root = _stdlib_dir()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("config-", "test")))
        for f in sorted(filenames):
            if f.endswith(".py") and not f.startswith(("test_", "_test")):
                out.append(Path(dirpath) / f)
    return out


def _read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


# --------------------------------------------------------------------------------------------------- text

_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\"'][.!?])\s+(?=[A-Z(\"'])")


def _clean_prose(text: str) -> list[str]:
    """Paragraphs of plain prose: code blocks (indented), doctests, headings and tables removed."""
    paras, cur = [], []
    for line in text.splitlines() + [""]:
        stripped = line.strip()
        if not stripped:
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        indented = line.startswith((" ", "\t"))
        if (indented or stripped.startswith((">>>", "...", "*", "-", "+", "|", "=", "#", ".."))
                or re.fullmatch(r"[*=\-~^#+]{3,}", stripped)):
            if cur:  # a code block or list breaks a paragraph
                paras.append(" ".join(cur))
                cur = []
            continue
        cur.append(stripped)
    good = []
    for p in paras:
        p = re.sub(r"\s+", " ", p).strip()
        if p.endswith("::"):
            p = p[:-1]
        letters = sum(c.isalpha() for c in p)
        if len(p) >= 80 and letters > 0.7 * len(p.replace(" ", "")) and p[-1] in ".!?:)\"'":
            good.append(p)
    return good


_DOCSTRING_HEAD = re.compile(r'\A(?:[ \t]*(?:#[^\n]*)?\n)*[ \t]*([rRuU]?(?:"""|\'\'\'))')
_CLASS_DOC = re.compile(r'^class \w+[^\n]*:[ \t]*\n[ \t]+([rRuU]?(?:"""|\'\'\'))', re.M)


def _string_literal_at(src: str, start: int, quote_end: int) -> str | None:
    """The triple-quoted literal that opens at ``start`` (its quotes end at ``quote_end``), evaluated."""
    quote = src[quote_end - 3:quote_end]
    close = src.find(quote, quote_end)
    if close < 0:
        return None
    try:
        value = ast.literal_eval(src[start:close + 3])
    except (ValueError, SyntaxError):
        return None
    return inspect.cleandoc(value) if isinstance(value, str) else None


def _docstrings(src: str) -> list[str]:
    """The module docstring and top-level class docstrings, found without parsing the whole file
    (``ast.parse`` of the standard library takes many seconds; this takes milliseconds)."""
    out = []
    m = _DOCSTRING_HEAD.match(src)
    if m:
        out.append(_string_literal_at(src, m.start(1), m.end(1)) or "")
    for m in _CLASS_DOC.finditer(src):
        out.append(_string_literal_at(src, m.start(1), m.end(1)) or "")
    return out


def _hash_order(ids: list[str], seed: int, domain: str) -> list[str]:
    """Sources in the seeded order that :func:`split_by_source` uses (eval takes the first ones)."""
    return sorted(ids, key=lambda s: stable_hash(seed, domain, s))


def _text_sources(seed: int):
    """(source id, raw text) for every prose source, in the seeded source order (lazily read)."""
    import pydoc_data.topics as topics

    root = _stdlib_dir()
    files = {f"module:{p.relative_to(root).as_posix()}": p for p in _stdlib_files()}
    ids = [f"pydoc:{k}" for k in topics.topics] + list(files)
    for sid in _hash_order(ids, seed, "text"):
        if sid.startswith("pydoc:"):
            yield sid, topics.topics[sid[6:]]
            continue
        src = _read_source(files[sid])
        doc = "\n\n".join(d for d in _docstrings(src) if len(d) > 200) if src else ""
        if doc:
            yield sid, doc


def _text_examples(seed: int, limit: int) -> list[dict]:
    examples = []
    for source, raw in _text_sources(seed):
        if len(examples) >= limit:
            break
        paras = _clean_prose(raw)
        passage: list[str] = []
        for p in paras + [None]:
            if p is not None and sum(map(len, passage)) + len(p) < 700:
                passage.append(p)
                if sum(map(len, passage)) < 250:
                    continue
            if passage:
                text = "\n\n".join(passage)
                parts = _SENTENCE_END.split(text, maxsplit=1)
                if len(parts) == 2 and len(parts[0]) >= 20 and len(parts[1]) >= 80:
                    examples.append({"domain": "text",
                                     "prompt": f"Continue the passage: {parts[0]}",
                                     "response": parts[1],
                                     "source": source})
            passage = [p] if p is not None and len(p) < 700 else []
    return examples


# --------------------------------------------------------------------------------------------------- code


_DEF = re.compile(r"^( {0,4})(?:async\s+)?def (\w+)\(")
_CLASS = re.compile(r"^class (\w+)")


def _function_chunks(src: str):
    """(owner class or None, dedented source) of each top-level function and method, found by
    indentation (parsing only the small chunk later is far cheaper than parsing the whole file)."""
    lines = src.splitlines()
    owner = None
    for i, line in enumerate(lines):
        if line[:1] not in ("", " ", "#", "\t"):
            cm = _CLASS.match(line)
            owner = cm.group(1) if cm else None
        m = _DEF.match(line)
        if not m:
            continue
        ind = len(m.group(1))
        if ind == 4 and owner is None:
            continue
        j = i
        while j > 0 and lines[j - 1].startswith(" " * ind + "@"):
            j -= 1
        k = i + 1
        while k < len(lines):
            nxt = lines[k]
            body = nxt.strip()
            if body and len(nxt) - len(nxt.lstrip()) <= ind and not body.startswith((")", "]", "}", "#")):
                break
            k += 1
        while k > i + 1 and not lines[k - 1].strip():
            k -= 1
        yield (owner if ind == 4 else None), textwrap.dedent("\n".join(lines[j:k]))


def _code_examples(seed: int, limit: int, max_chars: int = 1400) -> list[dict]:
    examples = []
    root = _stdlib_dir()
    files = {f"file:{p.relative_to(root).as_posix()}": p for p in _stdlib_files()}
    for sid in _hash_order(list(files), seed, "code"):
        if len(examples) >= limit:
            break
        src = _read_source(files[sid])
        if not src:
            continue
        for owner, code in _function_chunks(src):
            if not (120 <= len(code) <= max_chars) or "\t" in code or ('"""' not in code and "\'\'\'" not in code):
                continue
            try:
                tree = ast.parse(code)
            except SyntaxError:
                continue
            if len(tree.body) != 1 or not isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            node = tree.body[0]
            doc = ast.get_docstring(node)
            if not doc or node.name.startswith("__") or len(node.body) < 2:
                continue
            summary = " ".join(doc.strip().split("\n\n")[0].split())
            if len(summary) < 15:
                continue
            sig = f"{node.name}({ast.unparse(node.args)})"
            kind = "method" if owner else "function"
            name = f"{owner}.{sig}" if owner else sig
            prompt = f"Write the Python {kind} `{name}`.\n{summary}"
            examples.append({"domain": "code", "prompt": prompt, "response": code.strip("\n"),
                             "source": sid})
    return examples


# --------------------------------------------------------------------------------------------------- math


def _math_examples(rng: random.Random, n: int) -> list[dict]:
    seen, examples = set(), []
    tries = 0
    while len(examples) < n and tries < 50 * n + 1000:
        tries += 1
        p = generate_problem(rng)
        if p["question"] in seen:
            continue
        seen.add(p["question"])
        examples.append({"domain": "math", "prompt": p["question"], "response": p["solution"],
                         "source": f"math:{p['template']}:{stable_hash(p['question']):016x}",
                         "answer": str(p["answer"])})
    return examples


# -------------------------------------------------------------------------------------------- splitting


def split_by_source(examples: list[dict], n_train: int, n_eval: int, seed: int, domain: str
                    ) -> tuple[list[dict], list[dict]]:
    """Deterministic train/eval split with no source on both sides.

    Sources are ordered by a seeded hash; the first ones go to eval until it holds ``n_eval`` examples
    (a source is never split), the rest to train. Each side is then shuffled and cut to its size.
    """
    by_source: dict[str, list[dict]] = {}
    for e in examples:
        by_source.setdefault(e["source"], []).append(e)
    if not by_source:
        raise DataError(f"demo corpus: domain {domain!r} produced no examples")
    order = _hash_order(list(by_source), seed, domain)
    eval_ex, train_ex = [], []
    for s in order:
        (eval_ex if len(eval_ex) < n_eval else train_ex).extend(by_source[s])
    rng = random.Random(stable_hash(seed, domain, "shuffle"))
    rng.shuffle(eval_ex)
    rng.shuffle(train_ex)
    return train_ex[:n_train], eval_ex[:n_eval]


def build_demo_corpus(seed: int = 0, n_train: int = 2000, n_eval: int = 200,
                      domains=DOMAINS) -> dict[str, dict[str, list[dict]]]:
    """``{domain: {"train": [...], "eval": [...]}}``. Text and code are capped by what the standard
    library holds (a few thousand examples each); math is generated to size."""
    out = {}
    for d in domains:
        if d == "text":
            ex = _text_examples(seed, n_train + n_eval)
        elif d == "code":
            ex = _code_examples(seed, n_train + n_eval)
        elif d == "math":
            ex = _math_examples(random.Random(stable_hash(seed, d)), n_train + n_eval)
        else:
            raise DataError(f"demo corpus: unknown domain {d!r} (known: {', '.join(DOMAINS)})")
        train, ev = split_by_source(ex, n_train, n_eval, seed, d)
        if not train or not ev:
            raise DataError(f"demo corpus: domain {d!r} has too few examples ({len(ex)}) for a split")
        out[d] = {"train": train, "eval": ev}
    return out


def interleave(lists: list[list[dict]]) -> list[dict]:
    """Round-robin over the lists (the mixed sets): d0[0], d1[0], d2[0], d0[1], ..."""
    out = []
    for i in range(max(map(len, lists), default=0)):
        out.extend(lst[i] for lst in lists if i < len(lst))
    return out


def write_jsonl(path: str | os.PathLike, rows) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_demo_corpus(out_dir: str | os.PathLike, seed: int = 0, n_train: int = 2000, n_eval: int = 200,
                      domains=DOMAINS) -> dict:
    """Build the corpus and write it as JSONL under ``out_dir``; returns the manifest."""
    t0 = time.perf_counter()
    corpus = build_demo_corpus(seed, n_train, n_eval, domains)
    out = Path(out_dir)
    for d, splits in corpus.items():
        for split, rows in splits.items():
            write_jsonl(out / d / f"{split}.jsonl", rows)
    for split in ("train", "eval"):
        write_jsonl(out / "mixed" / f"{split}.jsonl", interleave([corpus[d][split] for d in corpus]))
    manifest = {
        "seed": seed, "n_train": n_train, "n_eval": n_eval, "domains": list(corpus),
        "counts": {d: {s: len(v) for s, v in sp.items()} for d, sp in corpus.items()},
        "python": sys.version.split()[0],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Write the demo corpus (text/code/math JSONL).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=2000, help="train examples per domain (at most)")
    ap.add_argument("--eval", type=int, default=200, help="eval examples per domain (at most)")
    a = ap.parse_args(argv)
    print(json.dumps(write_demo_corpus(a.out, a.seed, a.train, a.eval), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
