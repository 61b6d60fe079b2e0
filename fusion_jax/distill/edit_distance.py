"""Levenshtein distances between many short strings at once, in NumPy (no Python loop over pairs).

Both the alignment's cost matrix (every distinct teacher piece against every distinct base piece of a
sequence pair) and the MinED vocabulary map (every teacher token against the whole base vocabulary) need
the unit-cost edit distance (insert, delete, substitute; over Unicode code points, the same number as
``editdistance.eval`` on two ``str``) of a large cross product of short strings. Token pieces are short
(a few characters; rarely over 64), so the bit-parallel algorithm of Myers (1999) in Hyyrö's
edit-distance form fits one pattern into one machine word, and NumPy runs it for all pairs at once:
one step per character of the *text* string, each step a dozen word operations over the ``[texts,
patterns]`` state. Texts are sorted by length (longest first), so step ``k`` only touches the
contiguous block of texts that still have a ``k``-th character.

A pair where both strings are longer than 64 characters (rare: runs of spaces, dashes, ...) falls back
to the textbook dynamic programme, still vectorized over those pairs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

WORD = 64  # bits of the Myers state; longer patterns go through the other side or the DP fallback


def encode(strings: Sequence[str], pad: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """Code points of ``strings`` as an ``int32 [n, max_len]`` array padded with ``pad``, and lengths."""
    n = len(strings)
    lengths = np.fromiter((len(s) for s in strings), dtype=np.int64, count=n)
    width = int(lengths.max()) if n else 0
    codes = np.full((n, width), pad, dtype=np.int32)
    if n and width:
        # One UTF-32 buffer for all strings, then scattered into the padded table.
        flat = np.frombuffer("".join(strings).encode("utf-32-le"), dtype=np.uint32).astype(np.int32)
        rows = np.repeat(np.arange(n), lengths)
        starts = np.cumsum(lengths) - lengths
        cols = np.arange(flat.size) - np.repeat(starts, lengths)
        codes[rows, cols] = flat
    return codes, lengths.astype(np.int32)


def _myers(pat_codes: np.ndarray, pat_len: np.ndarray, txt_codes: np.ndarray,
           txt_len: np.ndarray) -> np.ndarray:
    """Distances ``int32 [n_txt, n_pat]`` for patterns of length <= 64 (any text length)."""
    n_pat, n_txt = len(pat_len), len(txt_len)
    out = np.empty((n_txt, n_pat), dtype=np.int32)
    if n_pat == 0 or n_txt == 0:
        return out
    if txt_codes.shape[1] == 0:  # every text is empty: the distance is the pattern's length
        out[:] = pat_len[None, :]
        return out
    m_max = int(pat_len.max()) if n_pat else 0
    dtype = np.uint32 if m_max <= 32 else np.uint64
    # The alphabet is the set of text characters: a pattern character no text has never matches.
    alphabet, txt_idx = np.unique(np.where(txt_codes >= 0, txt_codes, -1), return_inverse=True)
    txt_idx = txt_idx.reshape(txt_codes.shape)
    # peq[c, p] = bit i set where pattern p has alphabet character c at position i.
    peq = np.zeros((len(alphabet), n_pat), dtype=dtype)
    cols = np.arange(n_pat)
    for i in range(pat_codes.shape[1]):  # a loop over character positions (<= 64), not over pairs
        c = pat_codes[:, i]
        pos = np.searchsorted(alphabet, c)
        ok = (c >= 0) & (pos < len(alphabet)) & (alphabet[np.minimum(pos, len(alphabet) - 1)] == c)
        np.bitwise_or.at(peq, (pos[ok], cols[ok]), dtype(1) << dtype(i))
    order = np.argsort(-txt_len, kind="stable")  # longest texts first: active texts are a prefix
    lens_sorted = txt_len[order]
    idx_sorted = txt_idx[order]
    pv = np.full((n_txt, n_pat), np.iinfo(dtype).max, dtype=dtype)  # vertical deltas +1 ...
    mv = np.zeros((n_txt, n_pat), dtype=dtype)  # ... and -1, one bit per pattern position
    one = dtype(1)
    active = [int(np.count_nonzero(lens_sorted > k)) for k in range(int(lens_sorted[0]))]
    xv = np.empty_like(pv)
    xh = np.empty_like(pv)
    ph = np.empty_like(pv)
    for k, a in enumerate(active):  # one step per text character, over every (text, pattern) pair
        eq = peq[idx_sorted[:a, k]]  # [a, n_pat] match masks of the k-th text characters
        Pv, Mv, Xv, Xh, Ph = pv[:a], mv[:a], xv[:a], xh[:a], ph[:a]
        np.bitwise_or(eq, Mv, out=Xv)
        np.bitwise_and(eq, Pv, out=Xh)
        Xh += Pv
        Xh ^= Pv
        Xh |= eq
        np.bitwise_or(Xh, Pv, out=Ph)
        np.invert(Ph, out=Ph)
        Ph |= Mv  # horizontal +1
        Xh &= Pv  # now horizontal -1 (Mh)
        Ph <<= one
        Ph |= one  # row 0 of the DP is 0, 1, 2, ...: a +1 enters every column
        Xh <<= one
        np.bitwise_or(Xv, Ph, out=Pv)
        np.invert(Pv, out=Pv)
        Pv |= Xh
        np.bitwise_and(Ph, Xv, out=Mv)
    # D[m, n] = D[0, n] + (sum of the last column's vertical deltas) = n + #(+1) - #(-1) over m bits.
    mask = np.where(pat_len >= 64, np.iinfo(dtype).max,
                    (one << np.minimum(pat_len, 63).astype(dtype)) - one).astype(dtype)
    score = (lens_sorted[:, None].astype(np.int32) + _popcount(pv & mask) - _popcount(mv & mask))
    out[order] = score
    return out


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        return np.bitwise_count(x).astype(np.int32)
    bits = np.unpackbits(x.view(np.uint8).reshape(x.shape + (x.dtype.itemsize,)), axis=-1)
    return bits.sum(axis=-1, dtype=np.int32)


def _dp(a_codes, a_len, b_codes, b_len) -> np.ndarray:
    """Textbook DP for all pairs (a_i, b_j) at once: ``int32 [n_a, n_b]``. For the rare long pairs."""
    na, nb = len(a_len), len(b_len)
    A = a_codes[:, None, :]
    La, Lb = a_codes.shape[1], b_codes.shape[1]
    prev = np.broadcast_to(np.arange(Lb + 1, dtype=np.int32), (na, nb, Lb + 1)).copy()
    result = np.where(a_len[:, None] == 0, b_len[None, :], 0).astype(np.int32)
    for i in range(La):
        cur = np.empty_like(prev)
        cur[..., 0] = i + 1
        sub = (A[:, :, i][..., None] != b_codes[None, :, :]).astype(np.int32)  # [na, nb, Lb]
        for j in range(Lb):
            cur[..., j + 1] = np.minimum(np.minimum(prev[..., j + 1], cur[..., j]) + 1, prev[..., j] + sub[..., j])
        done = a_len == i + 1
        if done.any():
            result[done] = np.take_along_axis(cur[done], b_len[None, :, None].astype(np.int64), axis=2)[..., 0]
        prev = cur
    return result


def pairwise(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """``int32 [len(a), len(b)]`` Levenshtein distances of every pair, e.g. ``pairwise(["kitten"],
    ["sitting"]) == [[3]]``."""
    a_codes, a_len = encode(a, pad=-1)
    b_codes, b_len = encode(b, pad=-2)
    out = np.empty((len(a), len(b)), dtype=np.int32)
    if not len(a) or not len(b):
        return out
    a_short, b_short = a_len <= WORD, b_len <= WORD
    # Patterns a (<= 64 chars) against every b.
    ia = np.flatnonzero(a_short)
    if ia.size:
        out[ia] = _myers(a_codes[ia][:, :WORD], a_len[ia], b_codes, b_len).T
    ia = np.flatnonzero(~a_short)
    if ia.size:
        # Long a: the short b are the patterns; long-long pairs by the DP.
        jb = np.flatnonzero(b_short)
        if jb.size:
            out[np.ix_(ia, jb)] = _myers(b_codes[jb][:, :WORD], b_len[jb], a_codes[ia], a_len[ia])
        jb = np.flatnonzero(~b_short)
        if jb.size:
            out[np.ix_(ia, jb)] = _dp(a_codes[ia], a_len[ia], b_codes[jb], b_len[jb])
    return out


# ------------------------------------------------------------------ nearest string over a vocabulary

SHORT = 32  # candidates up to this length go through the compiled 32-bit kernel
_TILE = 64  # candidates per tile: the kernel's state for one tile stays in cache across the steps


def _tile_distances(peq, pat_len, txt_idx, length):
    """Myers over one tile: ``peq`` ``uint32 [C, tile]``, texts ``txt_idx [T, W]`` (alphabet indices),
    all texts of ``length`` characters. Returns ``int32 [T, tile]``."""
    import jax.numpy as jnp
    from jax import lax

    one = jnp.uint32(1)

    def step(k, state):
        pv, mv = state
        eq = jnp.take(peq, txt_idx[:, k], axis=0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        ph = (ph << one) | one
        mh = mh << one
        return mh | ~(xv | ph), ph & xv

    shape = (txt_idx.shape[0], peq.shape[1])
    pv, mv = lax.fori_loop(0, length, step, (jnp.full(shape, 0xFFFFFFFF, jnp.uint32), jnp.zeros(shape, jnp.uint32)))
    mask = jnp.where(pat_len >= 32, jnp.uint32(0xFFFFFFFF), (one << pat_len.astype(jnp.uint32)) - one)
    return (length + lax.population_count(pv & mask).astype(jnp.int32)
            - lax.population_count(mv & mask).astype(jnp.int32))


_kernel_cache = {}


def _kernel():
    if "k" not in _kernel_cache:
        import jax
        from jax import lax

        @jax.jit
        def kernel(peq, pat_len, txt_idx, length):
            c, p = peq.shape
            tiles = (peq.reshape(c, p // _TILE, _TILE).transpose(1, 0, 2), pat_len.reshape(p // _TILE, _TILE))
            out = lax.map(lambda t: _tile_distances(t[0], t[1], txt_idx, length), tiles)
            return out.transpose(1, 0, 2).reshape(txt_idx.shape[0], p)

        _kernel_cache["k"] = kernel
    return _kernel_cache["k"]


def _pow2(n: int, floor: int) -> int:
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


class _PatternBlock:
    """Patterns of at most 32 characters, ready for the compiled kernel against any texts."""

    def __init__(self, codes: np.ndarray, lengths: np.ndarray, min_cols: int = 1024):
        self.n = len(lengths)
        codes = codes[:, :SHORT]
        self.pat, self.pos = np.nonzero(codes >= 0)
        self.code = codes[self.pat, self.pos]
        self.cols = _pow2(self.n, max(_TILE, min_cols))
        self.plen = np.zeros(self.cols, dtype=np.int32)
        self.plen[:self.n] = lengths

    def distances(self, txt_codes: np.ndarray, length: int) -> np.ndarray:
        """``int32 [n_texts, n_patterns]`` for texts that all have ``length`` characters."""
        import jax.numpy as jnp

        m = txt_codes.shape[0]
        alphabet, idx = np.unique(txt_codes[:, :length], return_inverse=True)
        # Few distinct shapes, so few compilations: rows, width, alphabet and columns are padded.
        txt = np.zeros((_pow2(m, 64), _pow2(length, 32)), dtype=np.int32)
        txt[:m, :length] = idx.reshape(m, length)
        k = np.searchsorted(alphabet, self.code)
        hit = (k < len(alphabet)) & (alphabet[np.minimum(k, len(alphabet) - 1)] == self.code)
        peq = np.zeros((_pow2(len(alphabet) + 1, 256), self.cols), dtype=np.uint32)
        np.bitwise_or.at(peq, (k[hit], self.pat[hit]), np.uint32(1) << self.pos[hit].astype(np.uint32))
        out = _kernel()(jnp.asarray(peq), jnp.asarray(self.plen), jnp.asarray(txt), jnp.int32(length))
        return np.asarray(out)[:m, :self.n]


def nearest(queries: Sequence[str], candidates: Sequence[str], *, chunk: int = 512, block: int = 1024,
            progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the candidate at the smallest Levenshtein distance, the lowest candidate index
    among ties: ``(distance int32 [n_queries], index int32 [n_queries])`` (-1 if there are no candidates).

    Equal to ``min(range(len(candidates)), key=lambda j: editdistance.eval(q, candidates[j]))`` for
    every query (the brute force; Python's ``min`` keeps the first minimum), computed as:
    candidates sorted by length into blocks; queries grouped by length into chunks; per chunk the
    blocks in order of their length lower bound ``|len(q) - len(c)| <= distance``, each block only for
    the queries whose best so far is not below that bound (ties still scanned, for the lowest index),
    stopping when none is left; each (chunk, block) is one compiled bit-parallel kernel call (JAX),
    candidates over 32 characters go through the NumPy path (:func:`pairwise`).
    """
    nq, nc = len(queries), len(candidates)
    best_d = np.full(nq, np.iinfo(np.int32).max, dtype=np.int64)
    best_i = np.full(nq, -1, dtype=np.int64)
    if nq == 0 or nc == 0:
        return best_d.astype(np.int32), best_i.astype(np.int32)
    c_codes, c_len = encode(candidates, pad=-1)
    order = np.lexsort((np.arange(nc), c_len))
    short = order[c_len[order] <= SHORT]
    long_ = order[c_len[order] > SHORT]
    blocks = []  # (candidate indices, min len, max len, is_short)
    for s in range(0, len(short), block):
        idx = short[s:s + block]
        blocks.append((idx, int(c_len[idx].min()), int(c_len[idx].max()), True))
    if len(long_):
        blocks.append((long_, int(c_len[long_].min()), int(c_len[long_].max()), False))
    prepared = [_PatternBlock(c_codes[idx], c_len[idx], min_cols=min(block, 1024)) if is_short else None
                for idx, _, _, is_short in blocks]
    q_len = np.fromiter((len(q) for q in queries), dtype=np.int64, count=nq)
    q_order = np.argsort(q_len, kind="stable")
    groups = []
    for length in np.unique(q_len):
        members = q_order[q_len[q_order] == length]
        groups.extend((int(length), members[s:s + chunk]) for s in range(0, len(members), chunk))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=nq, desc="MinED", unit="tok")
    for length, members in groups:
        q_strs = [queries[i] for i in members]
        if length == 0:  # the empty query: distance = candidate length; shortest, then lowest index
            best_d[members] = int(c_len[order[0]])
            best_i[members] = int(order[0])
            if bar:
                bar.update(len(members))
            continue
        q_codes, _ = encode(q_strs, pad=-2)
        bd = np.full(len(members), np.iinfo(np.int32).max, dtype=np.int64)
        bi = np.full(len(members), -1, dtype=np.int64)
        lb = [max(0, lo - length, length - hi) for _, lo, hi, _ in blocks]
        for b in np.argsort(lb, kind="stable"):
            rows = np.flatnonzero(bd >= lb[b])  # only queries this block can still improve (or tie)
            if rows.size == 0:
                break  # blocks come in increasing lower bound: none of the rest can either
            idx, _, _, is_short = blocks[b]
            if is_short:
                d = prepared[b].distances(q_codes[rows], length)
            else:
                d = pairwise([q_strs[r] for r in rows], [candidates[i] for i in idx])
            dmin = d.min(axis=1).astype(np.int64)
            imin = np.where(d == dmin[:, None], idx[None, :], nc).min(axis=1)
            better = (dmin < bd[rows]) | ((dmin == bd[rows]) & (imin < bi[rows]))
            bd[rows] = np.where(better, dmin, bd[rows])
            bi[rows] = np.where(better, imin, bi[rows])
        best_d[members], best_i[members] = bd, bi
        if bar:
            bar.update(len(members))
    if bar:
        bar.close()
    return best_d.astype(np.int32), best_i.astype(np.int32)


def paired(a: Sequence[str], b: Sequence[str]) -> np.ndarray:
    """``int32 [n]``: Levenshtein distance of ``a[i]`` and ``b[i]`` for every ``i`` (vectorized over the
    pairs: distinct strings are encoded once, each pair is one cell of a :func:`pairwise` call grouped
    by distinct ``a``)."""
    if len(a) != len(b):
        raise ValueError("paired: a and b differ in length")
    n = len(a)
    out = np.empty(n, dtype=np.int32)
    if n == 0:
        return out
    ua, ia = np.unique(np.asarray(a, dtype=object), return_inverse=True)
    ub, ib = np.unique(np.asarray(b, dtype=object), return_inverse=True)
    ia, ib = ia.ravel(), ib.ravel()
    # Blocks of distinct a against only the distinct b they meet, so the cross products stay small.
    order = np.argsort(ia, kind="stable")
    sorted_ia = ia[order]
    step = max(1, 4_000_000 // max(1, len(ub)))
    for s in range(0, len(ua), step):
        sel = order[np.searchsorted(sorted_ia, s):np.searchsorted(sorted_ia, s + step)]
        cols, col_idx = np.unique(ib[sel], return_inverse=True)
        d = pairwise(list(ua[s:s + step]), list(ub[cols]))
        out[sel] = d[ia[sel] - s, col_idx.ravel()]
    return out
