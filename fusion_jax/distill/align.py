"""Token alignment between a base (student) tokenization and a teacher tokenization of the same text.

Two alignments, both returned as an :class:`Alignment` (for each base position, the ascending teacher
positions aligned to it):

* :func:`align_tokens` -- exactly the official FuseLLM / FuseChat dynamic-programming alignment
  (``reference/fusellm_fusechat.md`` section 1.1): DTW over the two piece sequences with the cost
  ``Levenshtein(teacher piece minus its marker, base piece minus its marker)``, the backtrack from the
  last cell taking the first minimum of the candidates in the order of ``tie_break``:

  - ``"fusellm"`` (FuseLLM, FuseChat v1): diagonal, teacher back (i-1), base back (j-1);
  - ``"fusechat2"`` (FuseChat-2.0): diagonal, base back, teacher back.

  Same pairs as the original, cell for cell (the costs are integers, so the int32 sums here equal its
  float64 ones and every tie is the same tie), hundreds of times faster (``BENCHMARKS.md``, "Token
  alignment"):

  1. costs: one Levenshtein per *distinct* (teacher piece, base piece) pair, bit-parallel over all
     pairs at once (:mod:`fusion_jax.distill.edit_distance`); each distinct teacher piece's cost row
     over the base sequence is then kept as its inclusive and exclusive prefix sums;
  2. forward pass: one NumPy step per teacher row, no loop over cells. Within a row the recurrence
     ``x[j] = min(e[j], c[j] + x[j-1])`` with ``e[j] = c[j] + min(up, diagonal)`` unrolls to
     ``x[j] = S[j] + min_{t<=j}(e[t] - S[t])`` with ``S`` the row's cost prefix sum: four vector
     operations per row, the one sequential part a cumulative minimum;
  3. backtrack: one step per path cell (at most n_base + n_teacher), reading three int32 values.

  Pieces are whatever the caller passes (FuseLLM: ``convert_ids_to_tokens``); :func:`fusion_jax.
  distill.markers.tokenize` gives them for a text. Nothing checks that the two sequences spell the same
  text: FuseChat-2.0 aligns padded sequences on purpose. Empty input: an empty base gives an empty
  alignment; an empty teacher gives every base position an empty list (the original code fails there).

* :func:`align_by_offsets` -- by the tokenizers' character offsets into the shared text, without a DP
  (two vectorized binary searches over the sorted spans): base token ``[s, e)`` gets every teacher
  token from the first one ending after ``s`` to the last one starting before ``e`` (the teacher
  tokens it overlaps). It refuses (``DataError``) two tokenizations that do not spell the same text.

How the two differ on real text (``bench/align.py``: 8 windows of 2048 base tokens of Python's
documentation prose per pair; numbers in ``BENCHMARKS.md``): the lists differ at 8% of the base
positions for Llama-2 <- Llama-3, 13% for Qwen3 <- Gemma-3, 19% for Gemma-3 <- Llama-2 and 0.3% for
Llama-3 <- Qwen3 (two byte-level BPEs with nearly the same pre-tokenizer). Where: (a) whitespace spelled
differently -- the official cost compares piece *spellings*, so SentencePiece's "<0x0A>" against
byte-level "Ċ" (both a newline) costs 6 edits, and runs of "▁"/"Ġ" pieces are grouped differently; the
DP then pairs a newline with a neighbouring word; (b) a word one side keeps whole and the other splits
("ĠAssertionError" vs "▁Assert" "ion" "Error"): the overlap gives every piece the whole word, the DP
pairs each piece with whichever neighbour is cheapest and often gives the one-to-many list to a
neighbour; (c) a few positions of drift after such a disagreement. Differences are local: the DP
re-synchronizes within a few tokens. The offsets alignment is what the text says; the DP is what the
official code trains on (use it for parity with FuseLLM/FuseChat).

Both forms are precomputed int32 tables: :meth:`Alignment.csr` (offsets + indices),
:meth:`Alignment.padded` (``[n_base, width]`` with -1) or simply ``start``/``count`` (the aligned teacher
positions of a base position are always a contiguous range, because the path is monotone), all usable
inside ``jax.jit`` as gathers (:func:`gather_aligned`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fusion_jax.distill import edit_distance
from fusion_jax.distill.markers import TokenizedText, check_marker, check_same_text
from fusion_jax.errors import ConfigError, DataError

TIE_BREAKS = ("fusellm", "fusechat2")
_BIG = np.int32(1 << 30)  # the infinite border; real path costs stay far below it (checked)


@dataclass(frozen=True, eq=False)
class Alignment:
    """For each base position ``j``: teacher positions ``start[j], ..., start[j] + count[j] - 1``.

    ``start``, ``count``: ``int32 [n_base]``; ``count >= 1`` for :func:`align_tokens` when the teacher
    is not empty (``count == 0`` means no teacher position: the consumer's fallback applies).
    ``n_teacher``: the teacher sequence's length.
    """

    start: np.ndarray
    count: np.ndarray
    n_teacher: int

    @property
    def n_base(self) -> int:
        return int(self.start.shape[0])

    @property
    def max_count(self) -> int:
        return int(self.count.max()) if self.count.size else 0

    def lists(self) -> list[list[int]]:
        """``base_to_blending`` as the official code returns it: a Python list per base position."""
        return [list(range(s, s + c)) for s, c in zip(self.start.tolist(), self.count.tolist())]

    def csr(self) -> tuple[np.ndarray, np.ndarray]:
        """``(offsets int32 [n_base + 1], indices int32 [sum(count)])``: base position ``j``'s teacher
        positions are ``indices[offsets[j]:offsets[j + 1]]``."""
        offsets = np.zeros(self.n_base + 1, dtype=np.int32)
        np.cumsum(self.count, out=offsets[1:])
        within = np.arange(int(offsets[-1]), dtype=np.int32) - np.repeat(offsets[:-1], self.count)
        return offsets, (np.repeat(self.start, self.count) + within).astype(np.int32)

    def padded(self, width: int | None = None) -> np.ndarray:
        """``int32 [n_base, width]``: the teacher positions of each base position, then -1.
        ``width`` defaults to :attr:`max_count`; a smaller width is a ``ConfigError`` (it would drop pairs)."""
        width = self.max_count if width is None else int(width)
        if width < self.max_count:
            raise ConfigError(f"padded(width={width}): a base position has {self.max_count} aligned "
                              f"teacher positions; use width >= {self.max_count}")
        k = np.arange(width, dtype=np.int32)
        return np.where(k < self.count[:, None], self.start[:, None] + k, -1).astype(np.int32)


def _empty(n_base: int, n_teacher: int) -> Alignment:
    z = np.zeros(n_base, dtype=np.int32)
    return Alignment(z, z.copy(), n_teacher)


def _ranges_from_path(path_i: np.ndarray, path_j: np.ndarray, n_base: int, n_teacher: int) -> Alignment:
    """Per base position j, the (contiguous) teacher positions the path visits with that j."""
    lo = np.full(n_base, n_teacher, dtype=np.int32)
    hi = np.full(n_base, -1, dtype=np.int32)
    np.minimum.at(lo, path_j, path_i)
    np.maximum.at(hi, path_j, path_i)
    return Alignment(lo, (hi - lo + 1).astype(np.int32), n_teacher)


def dtw_path(table: np.ndarray, teacher_index: np.ndarray, base_index: np.ndarray,
             tie_break: str = "fusellm") -> tuple[np.ndarray, np.ndarray]:
    """The official DTW path for the integer cost matrix ``cost[i, j] = table[teacher_index[i],
    base_index[j]]`` (the factored form :func:`piece_costs` returns; pass ``np.arange`` indices for a
    plain matrix). Returns ``(path_i, path_j)`` int32, the path from (0, 0) to the last cell in teacher
    and base coordinates.
    """
    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"tie_break={tie_break!r}: expected one of {', '.join(TIE_BREAKS)}")
    n_teacher, n_base = len(teacher_index), len(base_index)
    table = np.asarray(table, dtype=np.int32)
    if table.size and int(table.max()) * (n_teacher + n_base) >= int(_BIG):
        raise DataError("align_tokens: path costs overflow int32 (pieces of absurd length?)")
    # Each distinct teacher piece's cost row through its prefix sums, inclusive (S) and exclusive
    # (S - c): the loop then needs four vector operations per row.
    rows = np.ascontiguousarray(table[:, base_index])  # [distinct teacher pieces, n_base]
    incl = np.cumsum(rows, axis=1, dtype=np.int32)  # int32 throughout: no casting buffers
    excl = incl - rows
    acc = np.empty((n_teacher, n_base), dtype=np.int32)
    which = np.asarray(teacher_index).tolist()
    acc[0] = incl[which[0]]
    e = np.empty(n_base, dtype=np.int32)
    e_tail, up, diag = e[1:], acc[:, 1:], acc[:, :-1]
    for i in range(1, n_teacher):  # one vector step per teacher row, no loop over cells
        u = which[i]
        np.minimum(up[i - 1], diag[i - 1], out=e_tail)  # min(up, diagonal) for columns 1..
        e[0] = acc[i - 1, 0]  # column 0 has no diagonal
        np.subtract(e, excl[u], out=e)  # min(up, diagonal)[j] + c[j] - S[j]
        np.minimum.accumulate(e, out=e)  # then x[j] = S[j] + (min over t <= j of that)
        np.add(e, incl[u], out=acc[i])
    return _backtrack(acc, tie_break)


def _backtrack(acc: np.ndarray, tie_break: str) -> tuple[np.ndarray, np.ndarray]:
    n_teacher, n_base = acc.shape
    flat = memoryview(np.ascontiguousarray(acc)).cast("B").cast("i")  # fast scalar reads
    i, j = n_teacher - 1, n_base - 1
    pi, pj = [], []
    big = int(_BIG)
    teacher_first = tie_break == "fusellm"
    while i > 0 or j > 0:
        pi.append(i)
        pj.append(j)
        row = i * n_base
        up = flat[row - n_base + j] if i > 0 else big
        left = flat[row + j - 1] if j > 0 else big
        diag = flat[row - n_base + j - 1] if i > 0 and j > 0 else big
        if diag <= up and diag <= left:
            i -= 1
            j -= 1
        elif teacher_first:
            if up <= left:
                i -= 1
            else:
                j -= 1
        elif left <= up:
            j -= 1
        else:
            i -= 1
    pi.append(0)
    pj.append(0)
    return np.asarray(pi[::-1], dtype=np.int32), np.asarray(pj[::-1], dtype=np.int32)


COSTS = ("stripped", "fusechat2")


def piece_costs(base_pieces: Sequence[str], teacher_pieces: Sequence[str], base_marker: str,
                teacher_marker: str, cost: str = "stripped"):
    """The cost matrix in factored form: ``(table int32 [n_teacher_distinct, n_base_distinct],
    teacher_index int [n_teacher], base_index int [n_base])`` with ``cost[i, j] = table[teacher_index[i],
    base_index[j]]``.

    ``cost="stripped"`` (FuseLLM, FuseChat v1 without its substring weight): Levenshtein of the
    marker-stripped pieces. ``cost="fusechat2"`` (FuseChat-2.0's ``transform_step_token``): the same,
    except when either stripped piece is empty: then Levenshtein of the teacher piece with its marker
    swapped to the base's and the raw base piece.
    """
    if cost not in COSTS:
        raise ConfigError(f"cost={cost!r}: expected one of {', '.join(COSTS)}")
    if cost == "stripped":  # distinct stripped strings are enough
        t_key = [p.replace(teacher_marker, "") for p in teacher_pieces]
        b_key = [p.replace(base_marker, "") for p in base_pieces]
    else:  # the empty-piece rule needs the raw pieces
        t_key, b_key = list(teacher_pieces), list(base_pieces)
    t_uniq, t_index = np.unique(np.asarray(t_key, dtype=object), return_inverse=True)
    b_uniq, b_index = np.unique(np.asarray(b_key, dtype=object), return_inverse=True)
    t_uniq, b_uniq = list(t_uniq), list(b_uniq)
    if cost == "stripped":
        table = edit_distance.pairwise(t_uniq, b_uniq)
    else:
        t_strip = [p.replace(teacher_marker, "") for p in t_uniq]
        b_strip = [p.replace(base_marker, "") for p in b_uniq]
        table = edit_distance.pairwise(t_strip, b_strip)
        rows = np.flatnonzero([not p for p in t_strip])
        cols = np.flatnonzero([not p for p in b_strip])
        swapped = [p.replace(teacher_marker, base_marker) for p in t_uniq]
        if rows.size:
            table[rows] = edit_distance.pairwise([swapped[r] for r in rows], b_uniq)
        if cols.size:
            table[:, cols] = edit_distance.pairwise(swapped, [b_uniq[c] for c in cols])
    return table, np.asarray(t_index, dtype=np.intp).ravel(), np.asarray(b_index, dtype=np.intp).ravel()


def align_tokens(base_pieces: Sequence[str], teacher_pieces: Sequence[str], *, base_marker: str,
                 teacher_marker: str, tie_break: str = "fusellm", cost: str = "stripped") -> Alignment:
    """The official FuseLLM/FuseChat DP alignment: for each base position the ascending teacher
    positions aligned to it (``.lists()``), as int32 tables (module docstring).

    ``base_pieces`` / ``teacher_pieces``: the tokens as strings (``convert_ids_to_tokens``);
    ``base_marker`` / ``teacher_marker``: their word-start markers, "Ġ" (byte-level BPE) or "▁"
    (SentencePiece), stripped before the edit distance; ``tie_break``: "fusellm" or "fusechat2";
    ``cost``: "stripped" (the default, as specified) or "fusechat2" (FuseChat-2.0's empty-piece rule,
    :func:`piece_costs`).
    """
    check_marker(base_marker, "base_marker")
    check_marker(teacher_marker, "teacher_marker")
    if tie_break not in TIE_BREAKS:
        raise ConfigError(f"tie_break={tie_break!r}: expected one of {', '.join(TIE_BREAKS)}")
    n_base, n_teacher = len(base_pieces), len(teacher_pieces)
    if n_base == 0 or n_teacher == 0:
        return _empty(n_base, n_teacher)
    table, t_index, b_index = piece_costs(base_pieces, teacher_pieces, base_marker, teacher_marker, cost)
    path_i, path_j = dtw_path(table, t_index, b_index, tie_break)
    return _ranges_from_path(path_i, path_j, n_base, n_teacher)


def align_by_offsets(base: TokenizedText, teacher: TokenizedText) -> Alignment:
    """Align two tokenizations of the same text by their character offsets (no DP: two vectorized
    binary searches over the sorted spans, O((n + m) log m), under a millisecond for 2048 tokens).

    Base token ``[s, e)`` gets the teacher tokens from the first one that ends after ``s`` to the last
    one that starts before ``e``. A ``DataError`` if the two do not spell the same text
    (:func:`fusion_jax.distill.markers.check_same_text`). A base token that covers no character
    (``s == e``) gets no teacher position.
    """
    if base.text != teacher.text:
        raise DataError("align_by_offsets: the base and teacher tokenizations are of different texts")
    check_same_text(base.pieces, teacher.pieces, base.marker, teacher.marker)
    return align_offsets(base.offsets, teacher.offsets)


def align_offsets(base_offsets: np.ndarray, teacher_offsets: np.ndarray) -> Alignment:
    """:func:`align_by_offsets` on bare ``int [n, 2]`` (start, end) character offsets into one text."""
    b = np.asarray(base_offsets, dtype=np.int64).reshape(-1, 2)
    t = np.asarray(teacher_offsets, dtype=np.int64).reshape(-1, 2)
    if len(t) == 0 or len(b) == 0:
        return _empty(len(b), len(t))
    # Tokenizers emit spans in order; a running max makes them monotone for the binary searches.
    t_start = np.maximum.accumulate(t[:, 0])
    t_end = np.maximum.accumulate(t[:, 1])
    lo = np.searchsorted(t_end, b[:, 0], side="right")  # first teacher ending after s
    hi = np.searchsorted(t_start, b[:, 1], side="left") - 1  # last teacher starting before e
    count = np.where(b[:, 1] > b[:, 0], np.maximum(hi - lo + 1, 0), 0)
    return Alignment(np.minimum(lo, len(t)).astype(np.int32), count.astype(np.int32), len(t))


def gather_aligned(values, table):
    """Inside or outside ``jit``: ``values[table]`` with -1 entries of a padded table giving zeros.

    ``values``: ``[n_teacher, ...]`` per-teacher-position data (top-k ids, logits, ...);
    ``table``: ``int32 [n_base, width]`` from :meth:`Alignment.padded`. Returns ``[n_base, width, ...]``.
    """
    import jax.numpy as jnp

    table = jnp.asarray(table)
    out = jnp.take(values, jnp.maximum(table, 0), axis=0)
    mask = (table >= 0).reshape(table.shape + (1,) * (out.ndim - table.ndim))
    return jnp.where(mask, out, jnp.zeros((), out.dtype))
