"""Packing several token sequences per row (for pretraining the base model and the specialists).

:func:`pack_sequences` returns arrays of shape [rows, S]:

* ``input_ids``; ``segment_ids``: 1, 2, ... for the sequences in a row, 0 on padding (pass to the model
  so attention stays within a segment); ``attention_mask = segment_ids > 0``.
* ``positions``: restart at 0 at the start of every segment.
* ``loss_mask[t]`` is 1 when token ``t`` is a target: it is not the first token of its segment (so
  it is predicted from earlier tokens of the same sequence), times the caller's per-token mask if
  given (so packed SFT examples keep response-only losses). This is the convention of
  :mod:`fusion_jax.train.losses` and :mod:`fusion_jax.data.templates`; packed batches go straight into
  ``nnx_causal_lm_loss`` (which passes ``segment_ids`` and ``positions`` to the model).

Modes: ``"greedy"`` puts sequences in order into the current row while they fit and starts a new row
otherwise (a sequence longer than S is cut into S-token pieces, each its own segment); ``"concat"``
fills every row to the brim, cutting sequences at row ends (no padding but the last row's; the cut
continuation starts a new segment in the next row).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from fusion_jax.errors import DataError


def encode_documents(tokenizer, texts: Sequence[str], add_bos: bool = True, add_eos: bool = True
                     ) -> list[list[int]]:
    """``[bos] + tokens + [eos]`` per text (plain documents for pretraining)."""
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    return [bos + list(x) + eos for x in enc]


def pack_sequences(seqs: Sequence[Sequence[int]], seq_len: int, pad_id: int = 0,
                   token_masks: Sequence[Sequence[int]] | None = None, mode: str = "greedy"
                   ) -> dict[str, np.ndarray]:
    """Pack ``seqs`` into rows of ``seq_len`` tokens (see the module docstring)."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len} is too short to pack")
    seqs = [list(s) for s in seqs if len(s) > 0]
    if not seqs:
        raise DataError("pack_sequences: no non-empty sequences")
    masks = [list(m) for m in token_masks] if token_masks is not None else [[1] * len(s) for s in seqs]
    if token_masks is not None and [len(m) for m in masks] != [len(s) for s in seqs]:
        raise DataError("pack_sequences: token_masks must match the sequences' lengths")
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    if mode == "greedy":
        for ids, m in zip(seqs, masks):
            for start in range(0, len(ids), seq_len):
                piece, pm = ids[start:start + seq_len], m[start:start + seq_len]
                if used + len(piece) > seq_len:
                    rows.append([])
                    used = 0
                rows[-1].append((piece, pm))
                used += len(piece)
    elif mode == "concat":
        for ids, m in zip(seqs, masks):
            start = 0
            while start < len(ids):
                if used == seq_len:
                    rows.append([])
                    used = 0
                take = min(seq_len - used, len(ids) - start)
                rows[-1].append((ids[start:start + take], m[start:start + take]))
                used += take
                start += take
    else:
        raise DataError(f"pack_sequences: mode={mode!r}; expected 'greedy' or 'concat'")
    n = len(rows)
    ids = np.full((n, seq_len), pad_id, np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    pos = np.zeros((n, seq_len), np.int32)
    tok_mask = np.zeros((n, seq_len), np.int32)
    for r, row in enumerate(rows):
        t = 0
        for s, (piece, pm) in enumerate(row, start=1):
            L = len(piece)
            ids[r, t:t + L] = piece
            seg[r, t:t + L] = s
            pos[r, t:t + L] = np.arange(L)
            tok_mask[r, t:t + L] = pm
            t += L
    # a token is a target when its predecessor is in the same segment (pos > 0 inside a segment)
    loss_mask = ((seg > 0) & (pos > 0) & (tok_mask > 0)).astype(np.int32)
    return {"input_ids": ids, "segment_ids": seg, "positions": pos,
            "attention_mask": (seg > 0).astype(np.int32), "loss_mask": loss_mask}


def pack_rendered(arrays: dict[str, np.ndarray], seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Pack single-template SFT rows (from :func:`~fusion_jax.data.templates.render_dataset`) keeping
    their response-only losses: each row's real tokens become one segment."""
    seqs, masks = [], []
    for ids, am, lm in zip(arrays["input_ids"], arrays["attention_mask"], arrays["loss_mask"]):
        real = np.nonzero(am)[0]
        seqs.append(ids[real].tolist())
        masks.append(lm[real].tolist())
    return pack_sequences(seqs, seq_len, pad_id, masks, mode="greedy")
