"""Vocabulary maps ``[V_teacher] -> V_base`` (int32), and how a teacher's top-k becomes a sparse
distribution over the base (student) vocabulary.

Three maps (``reference/fusellm_fusechat.md`` section 2). Pieces are the tokenizers' raw tokens by id
(:func:`vocab_pieces`); "swapped" means the teacher's word-start marker replaced by the base's.

* ``"exact"`` (FuseLLM "hard"): the base id of the swapped piece, -1 if the base vocabulary lacks it.
* ``"mined"`` (FuseLLM "soft", MinED): exact if possible, else the base token nearest to the swapped
  piece by Levenshtein distance over the *whole* base vocabulary (markers not stripped, as the
  original), the lowest base id among ties (the original scans ``get_vocab()`` of a slow tokenizer, in
  id order, and Python's ``min`` keeps the first). :func:`fusion_jax.distill.edit_distance.nearest`
  computes it with a compiled bit-parallel kernel and length-bound pruning (``BENCHMARKS.md``).
* ``"statistics"`` (FuseChat-2.0's "default"/MS): from co-occurrence counts of aligned pairs
  (:class:`PairCounts`, sparse): exact if possible (the apply rule of the original: in-vocabulary first),
  else among the base tokens ever aligned to the teacher token the one minimising
  ``Levenshtein(a, b) * w * sigmoid(count)`` (``a``/``b`` = the pieces without their markers, or if
  either is then empty, the swapped teacher piece and the raw base piece; ``w = 0.1`` when one is a
  substring of the other), the lowest base id among ties; never aligned: the base unk id (eos if none);
  teacher bos/eos map to base bos/eos.

Where the releases differ (reference file sections 1.2, 2.3): FuseChat-2.0's own "soft" (MinED) path is
broken as released (``editdistance.eval`` of a string against a NumPy array is one number, so every
inexact token maps to the first vocabulary entry); ``"mined"`` is FuseLLM's working version. The
statistics map compares raw pieces (FuseChat-2.0 at bc5545d); its byte-string replacements ("âĢĻ" ->
"’", ...) and the Llama-3 -> Mistral special-token renaming are not applied: they only move a few
distances between byte-level and SentencePiece spellings. FuseChat-2.0 at HEAD aligns ``decode([id])``
strings instead of pieces: pass such strings as pieces (with either marker; they contain none) to get it.

A :class:`VocabMap` is built once, saved (``table.npz`` + ``manifest.json`` with both tokenizers'
fingerprints), loaded (refusing other tokenizers) and applied under ``jax.jit`` by :func:`map_topk`.

**The top-k contract** (what the loss consumes, :func:`map_topk`): a teacher's top-k at one aligned base
position is ``ids int32 [..., k]`` and ``logits float [..., k]`` in descending-logit order (as
``top_k`` returns them). Mapped, it is again ``ids int32 [..., k]`` and ``logits [..., k]`` of the
same width: slot ``s`` holds ``table[teacher_ids[s]]`` and the teacher's raw logit, unless the slot is
dropped, then its id is -1 and its logit ``-inf``. A slot is dropped when the map has no target (-1,
only with "exact"), or when an earlier slot (higher logit) already maps to the same base id: duplicate
targets keep the first (highest-logit) entry, as the original does. The target distribution is
``softmax(logits / T)`` over the kept slots (renormalised over what the teacher's top-k kept; the mass
outside it is dropped, as in the original). All slots dropped means no teacher distribution at this
position (the original then uses the base model's own top-k there).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from fusion_jax.distill import edit_distance
from fusion_jax.distill.align import Alignment
from fusion_jax.distill.markers import check_marker, detect_marker
from fusion_jax.errors import ConfigError, DataError
from fusion_jax.utils.atomic import atomic_directory

KINDS = ("exact", "mined", "statistics")
FORMAT = "fusion-jax vocab map v1"


def vocab_pieces(tokenizer) -> list[str]:
    """The tokenizer's pieces by id (``convert_ids_to_tokens`` of every id; "" where an id has none)."""
    vocab = tokenizer.get_vocab()
    n = max(vocab.values()) + 1 if vocab else 0
    pieces = [""] * n
    for piece, i in vocab.items():
        pieces[i] = piece
    return pieces


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's pieces by id and its marker: equal for the same vocabulary."""
    h = hashlib.sha256()
    h.update(detect_marker(tokenizer).encode("utf-8"))
    for p in vocab_pieces(tokenizer):
        h.update(b"\x00" + p.encode("utf-8"))
    return h.hexdigest()


def _first_index(pieces: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i, p in enumerate(pieces):
        out.setdefault(p, i)  # the lowest id of a piece spelled twice
    return out


def exact_map(teacher_pieces: Sequence[str], base_pieces: Sequence[str], *, teacher_marker: str,
              base_marker: str) -> np.ndarray:
    """``int32 [V_teacher]``: the base id of each marker-swapped teacher piece, -1 where there is none."""
    check_marker(teacher_marker, "teacher_marker")
    check_marker(base_marker, "base_marker")
    index = _first_index(base_pieces)
    return np.fromiter((index.get(p.replace(teacher_marker, base_marker), -1) if p else -1
                        for p in teacher_pieces), dtype=np.int32, count=len(teacher_pieces))


def mined_map(teacher_pieces: Sequence[str], base_pieces: Sequence[str], *, teacher_marker: str,
              base_marker: str, progress: bool = False) -> np.ndarray:
    """``int32 [V_teacher]``: FuseLLM's MinED map (module docstring). An id without a piece ("") maps to
    the nearest base token of the empty string like any other (the shortest base piece)."""
    table = exact_map(teacher_pieces, base_pieces, teacher_marker=teacher_marker, base_marker=base_marker)
    todo = np.flatnonzero(table < 0)
    queries = [teacher_pieces[i].replace(teacher_marker, base_marker) for i in todo]
    _, idx = edit_distance.nearest(queries, list(base_pieces), progress=progress)
    table[todo] = idx
    return table


class PairCounts:
    """Sparse co-occurrence counts of aligned (base id, teacher id) pairs, FuseChat-2.0's alignment
    matrix without the dense ``[V_base, V_teacher]`` array: sorted int64 keys ``base * V_teacher +
    teacher`` and their counts.

    :meth:`add` counts, for every base position ``j`` with base id ``b``, each distinct teacher id among
    its aligned teacher positions once (the original's ``C[b, ids] += 1`` with numpy fancy indexing
    does the same).
    """

    def __init__(self, base_vocab_size: int, teacher_vocab_size: int):
        self.base_vocab_size = int(base_vocab_size)
        self.teacher_vocab_size = int(teacher_vocab_size)
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)

    def add(self, base_ids, teacher_ids, alignment: Alignment) -> None:
        base_ids = np.asarray(base_ids, dtype=np.int64)
        teacher_ids = np.asarray(teacher_ids, dtype=np.int64)
        if len(base_ids) != alignment.n_base or len(teacher_ids) != alignment.n_teacher:
            raise DataError(f"PairCounts.add: {len(base_ids)} base / {len(teacher_ids)} teacher ids for an "
                            f"alignment of {alignment.n_base} x {alignment.n_teacher} positions")
        for ids, v, what in ((base_ids, self.base_vocab_size, "base"),
                             (teacher_ids, self.teacher_vocab_size, "teacher")):
            if ids.size and (ids.min() < 0 or ids.max() >= v):
                raise DataError(f"PairCounts.add: a {what} id is outside the vocabulary of {v}")
        offsets, positions = alignment.csr()
        pos_of = np.repeat(np.arange(alignment.n_base), np.diff(offsets))
        keys = base_ids[pos_of] * self.teacher_vocab_size + teacher_ids[positions]
        keys = np.unique(np.stack([pos_of, keys]), axis=1)[1]  # each teacher id once per base position
        self._merge(*np.unique(keys, return_counts=True))

    def _merge(self, keys: np.ndarray, counts: np.ndarray) -> None:
        all_keys = np.concatenate([self.keys, keys])
        all_counts = np.concatenate([self.counts, counts.astype(np.int64)])
        self.keys, inverse = np.unique(all_keys, return_inverse=True)
        self.counts = np.bincount(inverse, weights=all_counts, minlength=len(self.keys)).astype(np.int64)

    def merge(self, other: "PairCounts") -> "PairCounts":
        if (other.base_vocab_size, other.teacher_vocab_size) != (self.base_vocab_size, self.teacher_vocab_size):
            raise DataError("PairCounts.merge: counts over different vocabularies")
        self._merge(other.keys, other.counts)
        return self

    def pairs(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(base_ids, teacher_ids, counts)`` of every nonzero entry, sorted by (base, teacher)."""
        return (self.keys // self.teacher_vocab_size, self.keys % self.teacher_vocab_size, self.counts)

    def save(self, path: str | os.PathLike) -> None:
        from fusion_jax.utils.atomic import atomic_file
        with atomic_file(path, "wb") as f:
            np.savez(f, keys=self.keys, counts=self.counts,
                     shape=np.asarray([self.base_vocab_size, self.teacher_vocab_size], dtype=np.int64))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PairCounts":
        import zipfile
        try:
            with np.load(path) as z:
                shape, keys, counts = z["shape"], z["keys"], z["counts"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{path}: not a pair-count file, or a damaged one ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None
        if shape.shape != (2,) or shape.dtype.kind not in "iu" or keys.shape != counts.shape or keys.ndim != 1:
            raise DataError(f"{path}: malformed pair counts (shape {shape.tolist()}, keys {keys.shape}, "
                            f"counts {counts.shape})")
        out = cls(*shape.tolist())
        out.keys, out.counts = keys, counts
        return out


def statistics_map(counts: PairCounts, teacher_pieces: Sequence[str], base_pieces: Sequence[str], *,
                   teacher_marker: str, base_marker: str, base_unk_id: int | None = None,
                   base_eos_id: int | None = None, special_pairs: Sequence[tuple[int, int]] = ()) -> np.ndarray:
    """``int32 [V_teacher]``: FuseChat-2.0's statistics-based map (module docstring).

    ``base_unk_id`` (or ``base_eos_id`` when there is no unk) is the target of teacher tokens never
    aligned; ``special_pairs`` = ``[(teacher_bos, base_bos), (teacher_eos, base_eos)]`` overrides.
    """
    check_marker(teacher_marker, "teacher_marker")
    check_marker(base_marker, "base_marker")
    if counts.teacher_vocab_size != len(teacher_pieces) or counts.base_vocab_size != len(base_pieces):
        raise DataError(f"statistics_map: counts are over {counts.base_vocab_size} x "
                        f"{counts.teacher_vocab_size} but the vocabularies have {len(base_pieces)} x "
                        f"{len(teacher_pieces)} entries")
    default = base_unk_id if base_unk_id is not None else base_eos_id
    if default is None:
        raise ConfigError("statistics_map: the base tokenizer has neither an unk nor an eos token to "
                          "map never-aligned teacher tokens to")
    table = np.full(len(teacher_pieces), default, dtype=np.int32)
    b, t, c = counts.pairs()
    if len(b):
        a_str, b_str = [], []
        for ti, bi in zip(t.tolist(), b.tolist()):
            tp, bp = teacher_pieces[ti], base_pieces[bi]
            aa, bb = tp.replace(teacher_marker, ""), bp.replace(base_marker, "")
            if not aa or not bb:
                aa, bb = tp.replace(teacher_marker, base_marker), bp
            a_str.append(aa)
            b_str.append(bb)
        dist = edit_distance.paired(a_str, b_str).astype(np.float64)
        sub = np.fromiter(((x in y) or (y in x) for x, y in zip(a_str, b_str)), dtype=bool, count=len(a_str))
        dist = np.where(sub, dist * 0.1, dist)
        score = dist * (1.0 / (1.0 + np.exp(-c.astype(np.float64))))
        order = np.lexsort((b, score, t))  # per teacher id: smallest score, then smallest base id
        first = np.ones(len(order), dtype=bool)
        first[1:] = t[order][1:] != t[order][:-1]
        table[t[order][first]] = b[order][first]
    for teacher_id, base_id in special_pairs:
        if teacher_id is not None and base_id is not None:
            table[teacher_id] = base_id
    # FuseChat-2.0 applies the map only to pieces the base vocabulary lacks: fold that rule in.
    exact = exact_map(teacher_pieces, base_pieces, teacher_marker=teacher_marker, base_marker=base_marker)
    return np.where(exact >= 0, exact, table).astype(np.int32)


@dataclass(frozen=True, eq=False)
class VocabMap:
    """``table``: ``int32 [V_teacher]`` -> base id (-1: no target, "exact" only). ``kind``: one of
    :data:`KINDS`. Fingerprints (:func:`tokenizer_fingerprint`) tie it to its two tokenizers."""

    table: np.ndarray
    kind: str
    teacher_marker: str
    base_marker: str
    base_vocab_size: int
    teacher_fingerprint: str = ""
    base_fingerprint: str = ""

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write ``out_dir/table.npz`` and ``out_dir/manifest.json`` atomically."""
        with atomic_directory(out_dir, overwrite=True) as tmp:
            np.savez(tmp / "table.npz", table=self.table.astype(np.int32))
            manifest = {"format": FORMAT, "kind": self.kind, "teacher_vocab_size": int(self.table.shape[0]),
                        "base_vocab_size": self.base_vocab_size, "teacher_marker": self.teacher_marker,
                        "base_marker": self.base_marker, "teacher_fingerprint": self.teacher_fingerprint,
                        "base_fingerprint": self.base_fingerprint,
                        "mapped": int((self.table >= 0).sum())}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
        return Path(out_dir)

    @classmethod
    def load(cls, path: str | os.PathLike, teacher=None, base=None) -> "VocabMap":
        """Load a saved map; with ``teacher`` / ``base`` tokenizers given, a ``DataError`` unless their
        fingerprints are the ones it was built for."""
        import zipfile
        p = Path(path)
        try:
            manifest = json.loads((p / "manifest.json").read_text(encoding="utf-8"))
            with np.load(p / "table.npz") as z:
                table = z["table"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise DataError(f"{p}: not a vocabulary map directory, or a damaged one ({type(e).__name__}: "
                            f"{str(e)[:200]})") from None
        fields = {"kind": str, "teacher_marker": str, "base_marker": str, "teacher_fingerprint": str,
                  "base_fingerprint": str, "teacher_vocab_size": int, "base_vocab_size": int}
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise DataError(f"{p}/manifest.json: not a {FORMAT!r} manifest")
        for key, typ in fields.items():
            if not isinstance(manifest.get(key), typ) or isinstance(manifest.get(key), bool):
                raise DataError(f"{p}/manifest.json: {key} is {manifest.get(key)!r}, expected a {typ.__name__}")
        if (table.dtype.kind not in "iu" or table.shape != (manifest["teacher_vocab_size"],)
                or (table.size and not (-1 <= table.min() and table.max() < manifest["base_vocab_size"]))):
            raise DataError(f"{p}/table.npz: a {table.dtype} {table.shape} table, the manifest describes "
                            f"{manifest['teacher_vocab_size']} ids in [-1, {manifest['base_vocab_size']})")
        table = table.astype(np.int32)
        for tok, key, what in ((teacher, "teacher_fingerprint", "teacher"), (base, "base_fingerprint", "base")):
            if tok is not None and tokenizer_fingerprint(tok) != manifest[key]:
                raise DataError(f"{p}: this vocabulary map was built for another {what} tokenizer "
                                f"(fingerprint {manifest[key][:12]}...); rebuild it")
        return cls(table, manifest["kind"], manifest["teacher_marker"], manifest["base_marker"],
                   manifest["base_vocab_size"], manifest["teacher_fingerprint"], manifest["base_fingerprint"])


def build_vocab_map(teacher, base, kind: str = "mined", counts: PairCounts | None = None,
                    progress: bool = True) -> VocabMap:
    """Build a :class:`VocabMap` between two transformers fast tokenizers (``counts`` for "statistics";
    "mined" shows a progress bar: minutes for 100k-token vocabularies on a CPU, see ``BENCHMARKS.md``)."""
    if kind not in KINDS:
        raise ConfigError(f"vocab map kind={kind!r}: expected one of {', '.join(KINDS)}")
    tm, bm = detect_marker(teacher), detect_marker(base)
    tp, bp = vocab_pieces(teacher), vocab_pieces(base)
    if kind == "exact":
        table = exact_map(tp, bp, teacher_marker=tm, base_marker=bm)
    elif kind == "mined":
        table = mined_map(tp, bp, teacher_marker=tm, base_marker=bm, progress=progress)
    else:
        if counts is None:
            raise ConfigError("vocab map kind='statistics' needs the co-occurrence counts (PairCounts)")
        table = statistics_map(counts, tp, bp, teacher_marker=tm, base_marker=bm,
                               base_unk_id=base.unk_token_id, base_eos_id=base.eos_token_id,
                               special_pairs=[(teacher.bos_token_id, base.bos_token_id),
                                              (teacher.eos_token_id, base.eos_token_id)])
    return VocabMap(table, kind, tm, bm, len(bp), tokenizer_fingerprint(teacher), tokenizer_fingerprint(base))


def map_topk(teacher_ids, teacher_logits, table):
    """Map a teacher's top-k into the base vocabulary (the contract in the module docstring); works
    under ``jax.jit`` (a gather and a ``k x k`` comparison per position).

    ``teacher_ids``: ``int [..., k]``; ``teacher_logits``: ``float [..., k]``; ``table``: ``int32
    [V_teacher]``. Returns ``(ids int32 [..., k], logits [..., k])``: dropped slots have id -1 and logit
    ``-inf``.
    """
    import jax.numpy as jnp

    table = jnp.asarray(table)
    ids = jnp.take(table, jnp.asarray(teacher_ids), axis=0)
    k = ids.shape[-1]
    same = ids[..., :, None] == ids[..., None, :]  # [..., k, k]
    earlier = jnp.tril(jnp.ones((k, k), dtype=bool), -1)
    dup = jnp.any(same & earlier & (ids[..., None, :] >= 0), axis=-1)
    keep = (ids >= 0) & ~dup
    logits = jnp.asarray(teacher_logits)
    return (jnp.where(keep, ids, -1).astype(jnp.int32),
            jnp.where(keep, logits, jnp.asarray(-jnp.inf, logits.dtype)))
