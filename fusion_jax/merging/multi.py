"""Several merges in one YAML file (mergekit-multi): each document a merge, later ones naming earlier
outputs by their ``name`` where a model path goes.

The document without a ``name`` is the output (at most one); if every document is named, the last one
is. Documents run in dependency order (a document may come before the ones it uses; cycles are an
error). Every document is validated before any merge runs. All merges are written under one staging
directory beside the output and moved into place only when every one has succeeded, so a failure
leaves nothing at the output (nor in ``intermediate_dir``); named outputs are kept only when
``intermediate_dir`` is given (as ``intermediate_dir/<name>``), as mergekit-multi's ``-I`` does.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from fusion_jax.errors import ConfigError, FusionError
from fusion_jax.merging.config import MergeConfig, load_config, read_documents
from fusion_jax.utils.atomic import atomic_directory


def _model_slots(raw: dict):
    """(container, key) of every place in a document that holds a model reference."""
    for k in ("base_model", "tokenizer_source"):
        if isinstance(raw.get(k), str):
            yield raw, k
    for m in raw.get("models") or []:
        if isinstance(m, dict):
            yield m, "model"
    for sl in raw.get("slices") or []:
        if isinstance(sl, dict):
            if isinstance(sl.get("base_model"), str):
                yield sl, "base_model"
            for src in sl.get("sources") or []:
                if isinstance(src, dict):
                    yield src, "model"
    tok = raw.get("tokenizer")
    if isinstance(tok, dict):
        if isinstance(tok.get("source"), str):
            yield tok, "source"
        for spec in (tok.get("tokens") or {}).values():
            if isinstance(spec, dict):
                src = spec.get("source")
                if isinstance(src, str):
                    yield spec, "source"
                elif isinstance(src, dict) and isinstance(src.get("model"), str):
                    yield src, "model"


def _substitute(raw: dict, paths: dict) -> dict:
    import copy
    raw = copy.deepcopy(raw)
    for holder, key in _model_slots(raw):
        if holder[key] in paths:
            holder[key] = str(paths[holder[key]])
    return raw


def parse(path) -> tuple[list[tuple[str | None, dict]], Path]:
    """The documents of ``path`` as (name, document), checked: unique names, at most one unnamed."""
    docs = read_documents(path)
    root = Path(path).absolute().parent
    entries, seen = [], set()
    for i, d in enumerate(docs, 1):
        if not isinstance(d, dict):
            raise ConfigError(f"{path}: document {i}: expected a mapping, got {type(d).__name__}")
        d = dict(d)
        name = d.pop("name", None)
        if name is not None and (not isinstance(name, str) or not name.strip() or "/" in name
                                 or name in (".", "..")):
            raise ConfigError(f"{path}: document {i}: 'name' must be a plain directory name, got {name!r}")
        if name in seen:
            raise ConfigError(f"{path}: document {i}: " + (f"duplicate merge name {name!r}" if name else
                                                           "more than one document without a 'name'"))
        seen.add(name)
        entries.append((name, d))
    return entries, root


def _order(entries, deps) -> list[int]:
    """Document indices in dependency order (file order among independent ones)."""
    done, order = set(), []
    while len(order) < len(entries):
        ready = [i for i in range(len(entries)) if i not in done and deps[i] <= {entries[j][0] for j in done}]
        if not ready:
            left = [entries[i][0] or f"document {i + 1}" for i in range(len(entries)) if i not in done]
            raise ConfigError(f"merge documents depend on each other in a cycle: {', '.join(left)}")
        done.add(ready[0])
        order.append(ready[0])
    return order


def validate(path):
    """Every document of ``path`` parsed and validated (a named output, which does not exist yet, stands
    in as a placeholder path): (entries, root, configs, dependencies by document, run order)."""
    entries, root = parse(path)
    names = {n for n, _ in entries if n}
    cfgs: list[MergeConfig] = []
    for i, (name, raw) in enumerate(entries, 1):
        try:
            cfgs.append(load_config(_substitute(raw, {n: root / n for n in names}), root))
        except ConfigError as e:
            raise ConfigError(f"{path}: document {i}{f' ({name})' if name else ''}: {e}") from None
    deps = [{m for _, m in ((h, h[k]) for h, k in _model_slots(raw)) if m in names} for _, raw in entries]
    return entries, root, cfgs, deps, _order(entries, deps)


def merge_documents(path, out_dir, *, intermediate_dir=None, overwrite: bool = False, **merge_kw) -> dict:
    """Run every document of a multi-document merge file (see the module docstring)."""
    from fusion_jax.merging.executor import check_output_path, merge

    entries, root, cfgs, deps, order = validate(path)
    names = {n for n, _ in entries if n}
    unnamed = [i for i, (n, _) in enumerate(entries) if n is None]
    final = unnamed[0] if unnamed else len(entries) - 1
    if intermediate_dir is None:  # only what the output needs
        need, stack = set(), [final]
        while stack:
            i = stack.pop()
            if i not in need:
                need.add(i)
                stack.extend(j for j, (n, _) in enumerate(entries) if n in deps[i])
        order = [i for i in order if i in need]
    out = Path(out_dir)
    kept = [(Path(intermediate_dir) / entries[i][0]) for i in order
            if intermediate_dir is not None and i != final]
    for p in [out, *kept]:
        if p.exists() and not overwrite:
            raise FusionError(f"output path {p} already exists")
    inputs = {cfgs[i].resolve_path(m) for i in order for m in cfgs[i].referenced_models() if m not in names}
    for p in [out, *kept]:
        check_output_path(p, sorted(inputs))

    out.absolute().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.multi-", dir=out.absolute().parent))
    t0 = time.perf_counter()
    try:
        built, stats = {}, None
        for i in order:
            name, raw = entries[i]
            target = staging / (name or ".output")
            try:
                stats = merge(load_config(_substitute(raw, built), root), target, **merge_kw)
            except FusionError as e:
                raise type(e)(f"{path}: document {i + 1}{f' ({name})' if name else ''}: {e}") from None
            if name:
                built[name] = target
        for i in order:  # everything succeeded: move the outputs into place
            name = entries[i][0]
            if i == final:
                dst = out
            elif intermediate_dir is not None:
                dst = Path(intermediate_dir) / name
            else:
                continue
            with atomic_directory(dst, overwrite=overwrite) as tmp:
                # move the files in (the temporary directory holds atomic_directory's own marker)
                for child in (staging / (name or ".output")).iterdir():
                    os.rename(child, tmp / child.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dict(stats, seconds=time.perf_counter() - t0, documents=len(order))
