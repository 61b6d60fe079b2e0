"""Faithful pure-Python ports of the official FuseLLM / FuseChat-2.0 alignment code, for the tests and
``bench/align.py`` only (slow on purpose: one Python step per DP cell, as the original).

``dtw`` restates ``FuseLLM/src/utils/others.py::dtw`` (adapted there from talcs/simpledtw; the same
function is in FuseChat v1 and, with the other tie-break order, FuseChat-2.0's
``align_token_and_vocab.py``): a float64 matrix with an infinite border, the plain DTW recurrence, then a
backtrack from the last cell choosing ``np.argmin`` over the candidate list (first minimum wins).
``levenshtein`` is ``editdistance.eval`` (the package the official code pins) when installed, otherwise
a plain Python DP with the same result.
"""
from __future__ import annotations

import numpy as np

try:  # the official code's cost function
    from editdistance import eval as levenshtein
except ImportError:  # pragma: no cover - same numbers, only slower
    def levenshtein(a: str, b: str) -> int:
        prev = list(range(len(b) + 1))
        for i, ca in enumerate(a, 1):
            cur = [i]
            for j, cb in enumerate(b, 1):
                cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
            prev = cur
        return prev[-1]


def dtw(series_1, series_2, norm_func, tie_break: str = "fusellm"):
    """The official DTW. ``series_1`` = teacher ("blending") pieces, ``series_2`` = base pieces.

    Returns ``(matches, cost, mappings_series_1, mappings_series_2, matrix)`` like the original;
    ``mappings_series_2[j]`` (base position -> ascending teacher positions) is what FuseLLM uses.
    ``tie_break``: "fusellm" = candidates [diag, up (teacher back), left (base back)] (FuseLLM, FuseChat
    v1); "fusechat2" = [diag, left, up] (FuseChat-2.0).
    """
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            cost = norm_func(vec1, vec2)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i = matrix.shape[0] - 1
    j = matrix.shape[1] - 1
    matches = []
    mappings_series_1 = [list() for _ in range(matrix.shape[0])]
    mappings_series_2 = [list() for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        matches.append((i, j))
        mappings_series_1[i].append(j)
        mappings_series_2[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        if tie_break == "fusellm":
            move = np.argmin([option_diag, option_up, option_left])
            step = ((-1, -1), (-1, 0), (0, -1))[move]
        else:
            move = np.argmin([option_diag, option_left, option_up])
            step = ((-1, -1), (0, -1), (-1, 0))[move]
        i, j = i + step[0], j + step[1]
    matches.append((0, 0))
    mappings_series_1[0].append(0)
    mappings_series_2[0].append(0)
    matches.reverse()
    for mp in mappings_series_1:
        mp.reverse()
    for mp in mappings_series_2:
        mp.reverse()
    return matches, matrix[-1, -1], mappings_series_1, mappings_series_2, matrix


def align_tokens(base_pieces, teacher_pieces, *, base_marker, teacher_marker, tie_break="fusellm"):
    """FuseLLM's ``base_to_blending``: the official DTW with the cost ``editdistance(teacher piece minus
    its marker, base piece minus its marker)``."""
    def dist_fn(a, b):
        return levenshtein(a.replace(teacher_marker, ""), b.replace(base_marker, ""))

    _, _, _, base_to_teacher, _ = dtw(teacher_pieces, base_pieces, norm_func=dist_fn, tie_break=tie_break)
    return base_to_teacher


def mined_map(teacher_vocab: dict, base_vocab: dict, teacher_marker: str, base_marker: str) -> dict:
    """FuseLLM ``vocab_mapping.py --vocab_mapping_type default`` over ids: teacher id -> base id
    (exact marker-swapped piece, else the first base token in id order at minimal edit distance between
    the marker-swapped teacher piece and the raw base piece)."""
    base_items = sorted(base_vocab.items(), key=lambda kv: kv[1])
    out = {}
    for piece, tid in teacher_vocab.items():
        tmp = piece.replace(teacher_marker, base_marker)
        if tmp in base_vocab:
            out[tid] = base_vocab[tmp]
        else:
            out[tid] = min(base_items, key=lambda kv: levenshtein(tmp, kv[0]))[1]
    return out
