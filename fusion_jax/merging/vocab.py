"""The output vocabulary of a merge (mergekit's ``tokenizer_source`` and ``tokenizer:`` block), each
input's embedding rows aligned to it, and the output's chat template.

Follows mergekit 0.1.5 ``tokenizer/build.py``, ``tokenizer/embed.py`` and ``merge.py`` step by step:

- the base tokenizer (``base_model``, else the first model) is stripped of tokens whose id is not
  below its model's ``vocab_size`` (BPE tokenizers only, as mergekit);
- ``source: base`` keeps it, a model path takes that model's tokenizer, ``union`` adds every model's
  tokens (plain tokens first, then added tokens with their settings). mergekit adds the union's new
  tokens in the iteration order of Python dicts built from Rust hash maps, which changes from process
  to process: the union's *ids* of new tokens differ between two mergekit runs. fusion-jax adds them
  in model order, then token id order: the same tokens, the same rows for each token, deterministic ids;
- ``tokens:`` adds tokens that are missing and says where a token's row comes from (a model's row,
  a given token of a model, zeros) and whether to ``force`` it where the model has its own;
- the default rule for a token some model lacks: the only model that has it, else the base model's
  row, else the mean of the models that have it (zeros and a warning if none has it);
- ``pad_to_multiple_of`` pads the vocabulary; padding rows are the mean of the real rows.

Rows are averaged in the merge dtype as mergekit does (every partial sum rounded).
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import json
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fusion_jax.errors import ConfigError
from fusion_jax.hf.files import TOKENIZER_FILES
from fusion_jax.merging.precision import NP_DTYPES, dtype_name

#: chat templates mergekit knows by name (``chat_template: chatml``); see :func:`named_template`
TEMPLATE_NAMES = ("alpaca", "chatml", "exaone", "llama3", "mistral")


@dataclasses.dataclass
class VocabPlan:
    tokenizer: Any  # the transformers tokenizer to save
    vocab: dict  # token -> output id
    size: int  # output rows (the vocabulary, padded)
    perms: dict  # model index -> int64 [len(vocab)]: the model's row for each output id, or -1
    original: dict  # model index -> that model's token -> id
    tokens: dict  # token -> TokenSpec (the config's ``tokens:``)
    model_index: dict  # model name -> model index (for TokenSpec.model)


def _load(model):
    import transformers
    try:
        return transformers.AutoTokenizer.from_pretrained(str(model.path))
    except Exception as e:  # noqa: BLE001  (transformers raises many kinds)
        raise ConfigError(f"tokenizer: cannot load the tokenizer of {model.name!r}: {e}") from None


def _has_tokenizer(model) -> bool:
    return any((Path(model.path) / f).is_file() for f in TOKENIZER_FILES)


def _vocab_size(model, tok) -> int:
    v = model.config.get("vocab_size")
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else len(tok.get_vocab())


def _stripped(model, tok):
    """mergekit ``get_stripped_tokenizer``: drop tokens whose id is not below the model's vocab_size."""
    import tokenizers
    size = _vocab_size(model, tok)
    unused = {t for t, i in tok.get_vocab().items() if i >= size}
    if not unused:
        return tok
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"tokenizer: {model.name!r} has tokens beyond its vocab_size ({size}) and no fast "
                          "tokenizer to strip them from")
    d = json.loads(tok._tokenizer.to_str())
    if d["model"]["type"] != "BPE":
        raise ConfigError(f"tokenizer: {model.name!r} has tokens beyond its vocab_size ({size}); only BPE "
                          f"tokenizers can be stripped of them (this one is {d['model']['type']})")
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < size]
    for t in unused:
        d["model"]["vocab"].pop(t, None)

    def keep(m):
        toks = m.split(" ") if isinstance(m, str) else m
        return not any(t in unused for t in toks)

    d["model"]["merges"] = [m for m in d["model"]["merges"] if keep(m)]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return tok


def _union(base_tok, toks: dict, models):
    """mergekit ``build_union_tokenizer``, with a deterministic order for the new tokens."""
    import tempfile

    import transformers
    plain, added = [], {}
    seen = set()
    for i, tok in toks.items():
        size = _vocab_size(models[i], tok)
        specials = tok.added_tokens_decoder
        contents = {a.content for a in specials.values()}
        for t, k in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if k < size and t not in contents and t not in seen:
                seen.add(t)
                plain.append(t)
        for k, info in sorted(specials.items()):
            if k < size and info.content not in added:
                added[info.content] = info
    with tempfile.TemporaryDirectory() as d:  # a copy, so the base tokenizer is not mutated (as mergekit)
        base_tok.save_pretrained(d)
        out = transformers.AutoTokenizer.from_pretrained(d)
    base_vocab = base_tok.get_vocab()
    new_plain = [t for t in plain if t not in added and t not in base_vocab]
    if new_plain:
        out.add_tokens(new_plain)
    new_added = [info for t, info in added.items() if t not in out.get_vocab()]
    if new_added:
        out.add_tokens(new_added)
    return out


def build(cfg, models, base_index: int) -> VocabPlan:
    """The output tokenizer and each model's permutation (mergekit ``build_tokenizer``)."""
    spec = cfg.tokenizer
    source = cfg.vocab_source
    base_m = models[base_index]
    if not _has_tokenizer(base_m):
        raise ConfigError(f"tokenizer: the base model {base_m.name!r} has no tokenizer files")
    toks = {base_index: _stripped(base_m, _load(base_m))}
    for i, m in enumerate(models):
        if i == base_index:
            continue
        if _has_tokenizer(m):
            toks[i] = _load(m)
        else:  # mergekit: a model whose tokenizer cannot be loaded shares the base model's
            warnings.warn(f"tokenizer: {m.name!r} has no tokenizer files; assuming it shares the base model's "
                          f"({base_m.name!r})", stacklevel=2)
    index = {m.name: i for i, m in enumerate(models)}
    if source == "base":
        out = toks[base_index]
    elif source == "union":
        out = _union(toks[base_index], toks, models)
    else:
        if source in index:
            src = models[index[source]]
        else:
            from fusion_jax.merging.executor import _open_model
            src = _open_model(source, cfg.resolve_path(source))
        out = _load(src)
    tokens = dict(spec.tokens) if spec else {}
    existing = set(out.get_vocab())
    for t in tokens:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    perms, original = {}, {}
    for i, m in enumerate(models):
        mv = (toks.get(i) or toks[base_index]).get_vocab()
        size = _vocab_size(m, toks.get(i) or toks[base_index])
        p = np.full(len(vocab), -1, np.int64)
        for t, new in vocab.items():
            o = mv.get(t)
            if o is not None and o < size:
                p[new] = o
        perms[i] = p
        original[i] = mv
    size = len(vocab)
    pad = spec.pad_to_multiple_of if spec else None
    if pad and size % pad:
        size += pad - size % pad
    for t, ts in tokens.items():
        if ts.model is not None and ts.model not in index:
            raise ConfigError(f"tokenizer.tokens[{t!r}]: model {ts.model!r} is not one of the merged models")
    return VocabPlan(out, vocab, size, perms, original, tokens, index)


def _rounder(dtype: str):
    d = NP_DTYPES[dtype_name(dtype)]
    if d.itemsize >= 4:
        return lambda x: x.astype(np.float32)
    return lambda x: x.astype(d).astype(np.float32)


def permute(name: str, arrays: list, models: list[int], plan: VocabPlan, base_model: int | None,
            dtype: str) -> list[np.ndarray]:
    """Each input's rows aligned to the output vocabulary (mergekit ``PermutedVocabulary``), float32
    holding values of the merge ``dtype``. ``models[i]`` is input i's model index, ``base_model`` the
    base's (or None)."""
    R = _rounder(dtype)
    V = len(plan.vocab)
    rows = [R(np.asarray(a, np.float32)) for a in arrays]
    shape = rows[0].shape[1:]
    P = np.stack([plan.perms[m] for m in models])  # [inputs, V]
    present = P >= 0
    count = present.sum(0)
    base_i = models.index(base_model) if base_model in models else None
    defaults: dict[int, np.ndarray] = {}  # output id -> the row every model lacking the token gets
    forced = set()
    for tok, tid in plan.vocab.items():
        cfg = plan.tokens.get(tok)
        if cfg is not None:  # the config's own rule for this token
            if cfg.force:
                forced.add(tid)
            elif count[tid] == len(models):
                continue
            defaults[tid] = _configured_row(tok, tid, cfg, rows, P, models, plan, name)
            continue
        if count[tid] == len(models):
            continue
        have = np.nonzero(present[:, tid])[0]
        if len(have) == 0:
            warnings.warn(f"token {tok!r} is in no model; its row in {name!r} is zeros", stacklevel=2)
            defaults[tid] = np.zeros(shape, np.float32)
        elif len(have) == 1:
            defaults[tid] = rows[have[0]][P[have[0], tid]]
        elif base_i is not None and present[base_i, tid]:
            defaults[tid] = rows[base_i][P[base_i, tid]]
        else:  # the mean of the models that have it, in the merge dtype
            acc = np.zeros(shape, np.float32)
            for h in have:
                acc = R(acc + rows[h][P[h, tid]])
            defaults[tid] = R(acc / np.float32(len(have)))
    out = []
    for i in range(len(models)):
        new = np.zeros((plan.size,) + shape, np.float32)
        own = present[i].copy()
        own[list(forced)] = False
        ids = np.nonzero(own)[0]
        new[ids] = rows[i][P[i, ids]]
        for tid, row in defaults.items():
            if not own[tid]:
                new[tid] = row
        if plan.size > V:  # mergekit: padding rows are the mean of the real ones
            new[V:] = R(new[:V].mean(axis=0, dtype=np.float32))
        out.append(new)
    return out


def _configured_row(tok, tid, cfg, rows, P, models, plan, name):
    where = f"tokenizer.tokens[{tok!r}]"
    if cfg.kind == "zero":
        return np.zeros(rows[0].shape[1:], np.float32)
    if cfg.kind is None:
        raise ConfigError(f"{where}: some models lack this token (or it is forced), so it needs a 'source'")
    m = plan.model_index[cfg.model]
    if m not in models:
        raise ConfigError(f"{where}: its row comes from {cfg.model!r}, which has no input to tensor {name!r}")
    i = models.index(m)
    if cfg.kind == "model":
        if P[i, tid] < 0:
            raise ConfigError(f"{where}: model {cfg.model!r} has no token {tok!r}")
        return rows[i][P[i, tid]]
    src = cfg.token_id
    if src is None:
        if cfg.token not in plan.original[m]:
            raise ConfigError(f"{where}: model {cfg.model!r} has no token {cfg.token!r}")
        src = plan.original[m][cfg.token]
    if not 0 <= src < rows[i].shape[0]:
        raise ConfigError(f"{where}: token id {src} is out of range for {cfg.model!r} "
                          f"({rows[i].shape[0]} rows in {name!r})")
    return rows[i][src]


# -- chat templates ----------------------------------------------------------------------------------

def named_template(name: str) -> str | None:
    """The Jinja text of a chat template mergekit knows by name. Read from the installed mergekit
    (so the saved tokenizer is byte-identical to mergekit's); fusion-jax's own equivalent otherwise
    (:mod:`.chat_templates`, which renders the same conversations)."""
    if name not in TEMPLATE_NAMES:
        return None
    try:
        f = importlib.resources.files("mergekit._data.chat_templates").joinpath(name + ".jinja")
        if f.is_file():
            return f.read_text()
    except (ModuleNotFoundError, OSError):
        pass
    from fusion_jax.merging.chat_templates import TEMPLATES
    return TEMPLATES[name]


def resolve_chat_template(value: str | None, models) -> str | None:
    """mergekit ``_set_chat_template``: "auto" = the most common template among the models (None if
    none has one), a known name, or a Jinja string (at least 20 characters with a ``{``)."""
    if not value:
        return None
    if value == "auto":
        found = []
        for m in models:
            if not _has_tokenizer(m):
                continue
            t = _load(m).chat_template
            if isinstance(t, dict):
                t = t.get("default")
            if t:
                found.append(t.strip())
        return Counter(found).most_common(1)[0][0] if found else None
    if len(value) < 256 and "\n" not in value and "{" not in value:
        t = named_template(value)
        if t is not None:
            return t
    if len(value) < 20 or "{" not in value:
        raise ConfigError(f"chat_template: {value!r} is neither 'auto', a known template "
                          f"({', '.join(TEMPLATE_NAMES)}) nor a Jinja template")
    return value
