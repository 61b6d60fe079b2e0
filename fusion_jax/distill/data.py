"""One corpus of texts in every model's tokenization: the sequences the teachers read and the student
trains on.

Two layouts (what the official code feeds each method, reference sections 3.1 and 3.2):

* ``"document"`` (FuseLLM): plain texts (``prompt + "\\n" + response`` for prompt/response data),
  ``[bos] + tokens + [eos]`` as the demo zoo pre-trains; every token after the first is a target.
  A text longer than ``seq_len`` in ANY tokenizer is cut (at a character offset where every
  tokenizer fits, as FuseLLM's ``split_long_text`` does) into several texts.
* ``"response"`` (FuseChat): one prompt format for every model (``template``, ``{prompt}`` marks the
  prompt) followed by the response and eos; prompt and response are tokenized apart (so the response's
  tokens never depend on the template, :mod:`fusion_jax.data.templates`); the response tokens and the
  eos are the targets. An example too long for ``seq_len`` in any tokenizer is dropped.

``loss_mask[t] = 1`` when token t is a target (predicted from the positions before it), the package's
convention; the teacher pass computes a sequence's cross-entropy over the predictions of targets.

The corpus fingerprint hashes the texts, the layout and the template (not a tokenizer), so stores of
every teacher and the student's arrays can be checked to come from one corpus.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Sequence

import numpy as np

from fusion_jax.errors import DataError

LAYOUTS = ("document", "response")


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Texts at the level every tokenizer shares. ``records``: ``{"domain", "text"}`` (document layout)
    or ``{"domain", "prompt", "response"}`` (response layout)."""

    records: tuple
    layout: str
    template: str = "{prompt}\n"

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise DataError(f"corpus layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
        if not self.records:
            raise DataError("the distillation corpus is empty")

    def __len__(self) -> int:
        return len(self.records)

    @property
    def domains(self) -> list[str]:
        return [r["domain"] for r in self.records]

    def fingerprint(self) -> str:
        h = hashlib.sha256(json.dumps({"layout": self.layout, "template": self.template}).encode())
        keys = ("domain", "text") if self.layout == "document" else ("domain", "prompt", "response")
        for r in self.records:
            h.update(b"\x1e" + json.dumps([r[k] for k in keys], ensure_ascii=False).encode())
        return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Tokenized:
    """A corpus in one tokenizer: per sequence ``ids`` int32 and ``loss_mask`` int8 (targets)."""

    ids: tuple
    loss_mask: tuple

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.ids), np.int64, len(self.ids))

    def padded(self, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
        """``input_ids`` / ``attention_mask`` / ``loss_mask`` ``[N, seq_len]`` int32 (right padding)."""
        n = len(self.ids)
        ids = np.full((n, seq_len), pad_id, np.int32)
        am = np.zeros((n, seq_len), np.int32)
        lm = np.zeros((n, seq_len), np.int32)
        for i, (x, m) in enumerate(zip(self.ids, self.loss_mask)):
            if len(x) > seq_len:
                raise DataError(f"sequence {i} has {len(x)} tokens, more than seq_len={seq_len}")
            ids[i, :len(x)] = x
            am[i, :len(x)] = 1
            lm[i, :len(x)] = m
        return {"input_ids": ids, "attention_mask": am, "loss_mask": lm}


def _special(tok, name: str) -> list[int]:
    i = getattr(tok, f"{name}_token_id")
    return [] if i is None else [int(i)]


def tokenize(tok, corpus: Corpus) -> Tokenized:
    """``corpus`` in ``tok`` (module docstring)."""
    from fusion_jax.data.templates import PromptTemplate, encode_prompts, encode_responses
    if corpus.layout == "document":
        bos, eos = _special(tok, "bos"), _special(tok, "eos")
        enc = tok([r["text"] for r in corpus.records], add_special_tokens=False)["input_ids"]
        ids = [np.asarray(bos + list(x) + eos, np.int32) for x in enc]
        masks = [np.r_[0, np.ones(len(x) - 1)].astype(np.int8) for x in ids]
    else:
        t = PromptTemplate("distill", prompt=corpus.template, bos=tok.bos_token_id is not None,
                           eos=tok.eos_token_id is not None)
        ps = encode_prompts(tok, t, [r["prompt"] for r in corpus.records])
        rs = encode_responses(tok, t, [r["response"] for r in corpus.records])
        ids = [np.asarray(p + r, np.int32) for p, r in zip(ps, rs)]
        masks = [np.r_[np.zeros(len(p)), np.ones(len(r))].astype(np.int8) for p, r in zip(ps, rs)]
    return Tokenized(tuple(ids), tuple(masks))


def documents(examples: Sequence[dict]) -> list[dict]:
    """Prompt/response examples as plain documents ``prompt + "\\n" + response`` (how the zoo
    pre-trains), or their ``text`` when they have one."""
    return [{"domain": e.get("domain", ""), "text": e["text"] if "text" in e else e["prompt"] + "\n" + e["response"]}
            for e in examples]


def split_long_texts(records: Sequence[dict], tokenizers: Sequence, max_tokens: int) -> list[dict]:
    """Cut every text that has more than ``max_tokens`` tokens in any tokenizer into consecutive pieces
    that fit all of them (cut at the start of the first token that does not fit, in whichever tokenizer
    needs the earliest cut, with a margin of two tokens for re-tokenization at the cut)."""
    if max_tokens < 8:
        raise DataError(f"split_long_texts: max_tokens={max_tokens} is too small")
    out = []
    for r in records:
        text = r["text"]
        while text:
            cut = len(text)
            for tok in tokenizers:
                off = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
                if len(off) > max_tokens - 2:
                    cut = min(cut, int(off[max_tokens - 2][0]))
            if cut <= 0:   # a single token longer than the budget cannot happen for real text; guard
                cut = len(text)
            out.append(dict(r, text=text[:cut]))
            text = text[cut:]
    return out


def cut_responses(corpus: Corpus, tokenizers: Sequence, seq_len: int) -> Corpus:
    """Response layout: every response cut (at a character offset) so that prompt + response + eos fits
    ``seq_len`` in every tokenizer; an example whose prompt alone leaves fewer than 8 tokens is dropped.
    All models then read the same (cut) text, so their losses per byte compare."""
    from fusion_jax.data.templates import PromptTemplate, encode_prompts
    recs = list(corpus.records)
    keep = np.ones(len(recs), bool)
    cuts = [len(r["response"]) for r in recs]
    for tok in tokenizers:
        t = PromptTemplate("distill", prompt=corpus.template, bos=tok.bos_token_id is not None)
        plen = [len(p) for p in encode_prompts(tok, t, [r["prompt"] for r in recs])]
        enc = tok([r["response"] for r in recs], add_special_tokens=False, return_offsets_mapping=True)
        for j, (p, off) in enumerate(zip(plen, enc["offset_mapping"])):
            budget = seq_len - p - 1 - 1   # eos, and one token of margin for re-tokenization at the cut
            if budget < 8:
                keep[j] = False
            elif len(off) > budget:
                cuts[j] = min(cuts[j], int(off[budget][0]))
    out = tuple(dict(r, response=r["response"][:c]) for r, c, k in zip(recs, cuts, keep) if k and c > 0)
    if not out:
        raise DataError(f"no example fits seq_len={seq_len} in every tokenizer")
    return Corpus(out, corpus.layout, corpus.template)


def fit(corpus: Corpus, tokenizers: Sequence, seq_len: int) -> Corpus:
    """``corpus`` with every sequence fitting ``seq_len`` in every tokenizer (module docstring): long
    documents are split, long responses cut; then anything still too long is dropped."""
    if corpus.layout == "document":
        recs = split_long_texts(corpus.records, tokenizers, seq_len - 2)   # bos and eos
        corpus = Corpus(tuple(r for r in recs if r["text"].strip()), corpus.layout, corpus.template)
    else:
        corpus = cut_responses(corpus, tokenizers, seq_len)
    keep = np.ones(len(corpus), bool)
    for tok in tokenizers:
        keep &= tokenize(tok, corpus).lengths <= seq_len
    recs = tuple(r for r, k in zip(corpus.records, keep) if k)
    if not recs:
        raise DataError(f"no sequence fits seq_len={seq_len} in every tokenizer")
    return Corpus(recs, corpus.layout, corpus.template)


def response_bytes(corpus: Corpus) -> np.ndarray:
    """UTF-8 bytes of each record's targets (its response, or its text for documents)."""
    key = "text" if corpus.layout == "document" else "response"
    return np.fromiter((len(r[key].encode("utf-8")) for r in corpus.records), np.int64, len(corpus))


def check_same_text(student_tok, teacher_tok, student: Tokenized, teacher: Tokenized, what: str) -> None:
    """A DataError unless every sequence spells the same text in both tokenizations (special tokens and
    spaces aside): a teacher whose tokenizer normalizes the text (lower-cases it, drops accents, maps
    characters to an unknown token) cannot be aligned to the student."""
    from fusion_jax.distill.markers import check_same_text as same, detect_marker
    sm, tm = detect_marker(student_tok), detect_marker(teacher_tok)
    s_special, t_special = set(student_tok.all_special_ids), set(teacher_tok.all_special_ids)
    for i, (a, b) in enumerate(zip(student.ids, teacher.ids)):
        sp = student_tok.convert_ids_to_tokens([int(x) for x in a if int(x) not in s_special])
        tp = teacher_tok.convert_ids_to_tokens([int(x) for x in b if int(x) not in t_special])
        try:
            same(sp, tp, sm, tm)
        except DataError as e:
            raise DataError(f"{what}: sequence {i}: {e}") from None
