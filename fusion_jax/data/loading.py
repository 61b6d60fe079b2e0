"""Reading instruction/response examples with Hugging Face ``datasets``.

:func:`load_examples` reads a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file, a directory of
them (sorted by name; only the requested split's files when they are named for splits), or, for users with a network, a Hub dataset name (passed to
``datasets.load_dataset(name, split=split)``). It returns plain dicts::

    {"prompt": str, "response": str, "domain": str}                       # prompt/response rows
    {"prompt": str, "response": str, "domain": str, "messages": [...]}   # chat rows

Chat rows hold ``{"messages": [{"role": ..., "content": ...}, ...]}``: the **last assistant turn** is the
response; the turns before it are the prompt context, kept as ``messages`` (for chat templates), and the
last user turn among them is also given as ``prompt`` (for single-turn prompt templates). A row is read as
chat when it has no ``prompt_field`` value but has ``messages_field``.

Every failure a user can cause raises :class:`~fusion_jax.errors.DataError` naming the file, the row
(counted from 1, i.e. the line of a ``.jsonl`` without blank lines) and the field: a missing file, an
unreadable or empty file, a missing or non-text field, a conversation without an assistant turn.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from fusion_jax.errors import DataError

# file suffix -> datasets builder
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_examples(source: str | os.PathLike, *, split: str = "train", domain: str | None = None,
                  prompt_field: str = "prompt", response_field: str = "response",
                  messages_field: str = "messages", domain_field: str = "domain",
                  limit: int | None = None, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Examples from a local file, a directory of files, or a Hub dataset name (see the module doc).

    ``domain`` labels every example; without it each row's ``domain_field`` is used. ``split`` selects
    the split of a Hub dataset or of a directory with split-named files (a single file is one split). ``limit`` keeps the first ``limit`` examples.
    ``cache_dir``: where ``datasets`` keeps its Arrow cache (default: its own).
    """
    if limit is not None and limit < 0:
        raise DataError(f"{source}: limit must be >= 0, got {limit}")
    fields = dict(prompt_field=prompt_field, response_field=response_field, messages_field=messages_field,
                  domain_field=domain_field, domain=domain)
    src = os.fspath(source)
    out: list[dict] = []
    for where, rows in _tables(src, split, cache_dir):
        for i, row in enumerate(rows, start=1):
            if limit is not None and len(out) >= limit:
                return out
            out.append(_example(row, f"{where}: row {i}", **fields))
    if not out and limit != 0:
        raise DataError(f"{src}: no rows")
    return out


def jsonl_rows(path: str | os.PathLike, lines: Iterable[str]) -> Iterator[tuple[int, Any]]:
    """``(line number counted from 1, parsed value)`` for every non-blank line of a JSON-lines file; a line
    that is not JSON is a DataError naming ``path`` and the line."""
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not JSON ({e.msg})") from None


def examples_from_config(data: Any, domains: Sequence[str], *, eval_required: bool = True
                         ) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """``(train, eval)``, each ``{domain: examples}``, from a method config's ``data`` group: per domain
    ``train_files[d]`` / ``eval_files[d]`` read with ``prompt_field`` / ``response_field``, capped at
    ``max_train_examples`` / ``max_eval_examples`` (0 = all). A domain without a train file is a DataError
    naming the option; so is one without an eval file, unless ``eval_required`` is false (it is then left
    out of ``eval``)."""
    out: dict[str, dict[str, list[dict]]] = {"train": {}, "eval": {}}
    for split in ("train", "eval"):
        cap = int(data.max_train_examples if split == "train" else data.max_eval_examples)
        for d in domains:
            src = str(data[f"{split}_files"].get(d, ""))
            if not src:
                if split == "eval" and not eval_required:
                    continue
                raise DataError(f"data.{split}_files.{d}: domain {d!r} has no {split} data (give a file for "
                                "every domain)")
            out[split][d] = load_examples(src, split=split, domain=d, prompt_field=str(data.prompt_field),
                                          response_field=str(data.response_field), limit=cap or None)
    return out["train"], out["eval"]


def group_by_domain(examples: Sequence[dict], domains: Sequence[str]) -> dict[str, list[dict]]:
    """``{domain: examples}`` in ``domains`` order; a domain with no examples raises DataError, and so
    does an example whose domain is not listed."""
    out: dict[str, list[dict]] = {d: [] for d in domains}
    for j, e in enumerate(examples):
        d = e.get("domain")
        if d not in out:
            raise DataError(f"example {j}: domain {d!r} is not one of {list(domains)}")
        out[d].append(e)
    for d, lst in out.items():
        if not lst:
            raise DataError(f"domain {d!r} has no examples")
    return out


# ------------------------------------------------------------------------------------ sources ----

_SPLIT_NAMES = ("train", "validation", "valid", "eval", "dev", "test")
_SPLIT_RE = re.compile(r"^(%s)(?:$|[-._ ]\w*)" % "|".join(_SPLIT_NAMES), re.IGNORECASE)


def local_files(path: str | os.PathLike, split: str = "train") -> list[Path]:
    """The data files a local path names: the file itself, or a directory's supported files by name.

    In a directory whose files are named after splits (``train.jsonl``, ``test-00000-of-00002.parquet``,
    ``eval_math.json``...), only the files of ``split`` are read, as ``datasets`` does; a directory of
    other names is one split.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in FORMATS)
        if not files:
            raise DataError(f"{p}: directory holds no {'/'.join(FORMATS)} files")
        by_split: dict[str, list[Path]] = {}
        for f in files:
            m = _SPLIT_RE.match(f.stem)
            if m:
                by_split.setdefault(m.group(1).lower(), []).append(f)
        if by_split:
            if split.lower() not in by_split:
                raise DataError(f"{p}: no files of split {split!r} (files are named for splits "
                                f"{', '.join(sorted(by_split))})")
            return by_split[split.lower()]
        return files
    if p.suffix.lower() not in FORMATS:
        raise DataError(f"{p}: unsupported file type {p.suffix!r} (expected one of {', '.join(FORMATS)})")
    return [p]


def _is_local(src: str) -> bool:
    # "org/name" is a Hub name unless such a path exists; a known suffix or an explicit path prefix
    # means the user meant a file, so a missing one is reported as such
    return (os.path.exists(os.path.expanduser(src)) or Path(src).suffix.lower() in FORMATS
            or src.startswith(("/", ".", "~")))


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """``datasets`` without its progress bars and log records: a file it cannot read becomes one DataError
    of ours, and its own ERROR record of the same failure would be a second message (printed wherever
    logging is configured, e.g. once lm-eval is imported)."""
    import logging

    import datasets

    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield datasets
    finally:
        logger.setLevel(level)
        if was:
            datasets.enable_progress_bars()


def _tables(src: str, split: str, cache_dir) -> Iterator[tuple[str, Any]]:
    """``(where, rows)`` per file (or one for a Hub dataset); rows iterate as dicts."""
    cache = None if cache_dir is None else os.fspath(cache_dir)
    if not _is_local(src):
        with _quiet_datasets() as datasets:
            try:
                ds = datasets.load_dataset(src, split=split, cache_dir=cache)
            except Exception as e:  # noqa: BLE001 - the hub and its builders raise many types
                raise DataError(f"{src}: not a local file, and cannot load it from the Hugging Face Hub "
                                f"(split {split!r}): {type(e).__name__}: {_first_line(e)}") from e
        yield f"{src}[{split}]", ds
        return
    for f in local_files(src, split):
        if f.stat().st_size == 0:
            raise DataError(f"{f}: file is empty")
        builder = FORMATS[f.suffix.lower()]
        with _quiet_datasets() as datasets:
            try:
                ds = datasets.load_dataset(builder, data_files=[str(f)], split="train", cache_dir=cache)
            except Exception as e:  # noqa: BLE001 - pyarrow/pandas/json raise many types for bad input
                raise DataError(f"{f}: cannot read as {builder}: {type(e).__name__}: {_first_line(e)}") from e
        if len(ds) == 0:
            raise DataError(f"{f}: no rows")
        yield str(f), ds


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else ""


# --------------------------------------------------------------------------------------- rows ----

def _text(value: Any, where: str, field: str) -> str:
    if value is None or (isinstance(value, float) and value != value):  # None, or NaN from a CSV cell
        raise DataError(f"{where}: field {field!r} is missing")
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a numeric answer column
    if isinstance(value, list) and all(isinstance(p, dict) and isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)  # content given as [{"type": "text", "text": ...}, ...]
    raise DataError(f"{where}: field {field!r} must be text, got {type(value).__name__}")


def _example(row: dict, where: str, *, prompt_field: str, response_field: str, messages_field: str,
             domain_field: str, domain: str | None) -> dict:
    if domain is None:
        if row.get(domain_field) is None:
            raise DataError(f"{where}: field {domain_field!r} is missing (or pass domain=...)")
        dom = _text(row[domain_field], where, domain_field)
    else:
        dom = domain
    if row.get(prompt_field) is None and row.get(messages_field) is not None:
        return dict(_chat(row[messages_field], where, messages_field), domain=dom)
    if prompt_field not in row and messages_field not in row:
        raise DataError(f"{where}: field {prompt_field!r} is missing (and there is no {messages_field!r}); "
                        f"fields are {sorted(row)}")
    return {"prompt": _text(row.get(prompt_field), where, prompt_field),
            "response": _text(row.get(response_field), where, response_field), "domain": dom}


def _chat(messages: Any, where: str, field: str) -> dict:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of {{role, content}} turns")
    turns = []
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise DataError(f"{where}: {field}[{j}] must be a {{'role', 'content'}} mapping")
        turns.append({"role": m["role"], "content": _text(m.get("content"), where, f"{field}[{j}].content")})
    last = max((j for j, t in enumerate(turns) if t["role"] == "assistant"), default=None)
    if last is None:
        raise DataError(f"{where}: field {field!r} has no assistant turn to train on")
    context = turns[:last]
    users = [t for t in context if t["role"] == "user"]
    if not users:
        raise DataError(f"{where}: field {field!r} has no user turn before the last assistant turn")
    return {"prompt": users[-1]["content"], "response": turns[last]["content"], "messages": context}
