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


def align_tokens(base_pieces, teacher_pieces, *, base_marker, teacher_marker, tie_break="fusellm",
                 cost="stripped"):
    """FuseLLM's ``base_to_blending``: the official DTW with the cost ``editdistance(teacher piece minus
    its marker, base piece minus its marker)``; ``cost="fusechat2"`` adds FuseChat-2.0's rule for an
    empty stripped piece (the swapped teacher piece against the raw base piece)."""
    def dist_fn(a, b):
        aa, bb = a.replace(teacher_marker, ""), b.replace(base_marker, "")
        if cost == "fusechat2" and (len(aa) == 0 or len(bb) == 0):
            aa, bb = a.replace(teacher_marker, base_marker), b
        return levenshtein(aa, bb)

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


def _add(idx_list, logit_list, index, logit):
    if index not in idx_list:
        idx_list.append(index)
        logit_list.append(logit)


def fusellm_step_logits(base_pieces, teacher_pieces, base_ids, base_vocab, teacher_id_to_piece,
                        topk_logits, topk_ids, *, base_marker, teacher_marker, vocab_align_type="hard",
                        mapping=None, byte_level_teacher=True):
    """``FuseLLM/src/utils/others.py::transform_step_logits``: per base position the aligned
    (indices, logits) lists. ``mapping``: {swapped teacher piece: base piece} ("soft")."""
    base_to_blending = align_tokens(base_pieces, teacher_pieces, base_marker=base_marker,
                                    teacher_marker=teacher_marker, tie_break="fusellm")
    out = []
    for i, blending_idx in enumerate(base_to_blending):
        idx_l, log_l = [], []
        if len(blending_idx) == 1:
            j = blending_idx[0]
            base_token = base_pieces[i]
            blending_token = teacher_pieces[j].replace(teacher_marker, base_marker)
            if (byte_level_teacher and i == 0 and base_token.startswith(base_marker)
                    and not blending_token.startswith(base_marker)):
                blending_token = base_marker + blending_token
            ok = base_token == blending_token
            if vocab_align_type == "soft":
                ok = ok or mapping[blending_token] == base_token
            if ok:
                for logit, index in zip(topk_logits[j], topk_ids[j]):
                    t = teacher_id_to_piece[index].replace(teacher_marker, base_marker)
                    if vocab_align_type == "soft":
                        _add(idx_l, log_l, base_vocab[mapping[t]], logit)
                    elif t in base_vocab:
                        _add(idx_l, log_l, base_vocab[t], logit)
            else:
                idx_l.append(base_vocab[base_token])
                log_l.append(1.0)
        else:
            idx_l.append(base_vocab[base_pieces[i]])
            log_l.append(1.0)
        out.append((idx_l, log_l))
    return out


def fusechat2_step_logits(base_pieces, teacher_pieces, base_vocab, base_id_to_piece, teacher_id_to_piece,
                          topk_logits, topk_ids, blending_to_base, *, base_marker, teacher_marker):
    """FuseChat-2.0 ``transform_step_logits`` with ``align_type="default"`` and
    ``use_token_alignment_matrix=True`` (raw pieces as tokens, as the release version)."""
    base_to_blending = align_tokens(base_pieces, teacher_pieces, base_marker=base_marker,
                                    teacher_marker=teacher_marker, tie_break="fusechat2", cost="fusechat2")
    labels = list(base_pieces[1:]) + [base_pieces[-1]]

    def topk_of(j, idx_l, log_l):
        for logit, index in zip(topk_logits[j], topk_ids[j]):
            t = teacher_id_to_piece[index].replace(teacher_marker, base_marker)
            if t in base_vocab:
                _add(idx_l, log_l, base_vocab[t], logit)
            else:
                _add(idx_l, log_l, base_vocab[base_id_to_piece[blending_to_base[index]]], logit)

    out = []
    for i, blending_idx in enumerate(base_to_blending):
        idx_l, log_l = [], []
        if len(blending_idx) == 1:
            j = blending_idx[0]
            base_token = base_pieces[i]
            blending_token = teacher_pieces[j].replace(teacher_marker, base_marker)
            if blending_token.endswith(base_token) or base_token.endswith(blending_token):
                topk_of(j, idx_l, log_l)
            else:
                idx_l.append(base_vocab[labels[i]])
                log_l.append(1.0)
        else:
            base_token = base_pieces[i].replace(base_marker, "")
            blending_tokens = [teacher_pieces[j].replace(teacher_marker, "") for j in blending_idx]
            for j, blending_t in zip(blending_idx, blending_tokens):
                if base_token != base_marker and (base_token.endswith(blending_t) or blending_t.endswith(base_token)):
                    blending_idx = [j]
                    break
            if len(blending_idx) == 1:
                topk_of(blending_idx[0], idx_l, log_l)
            else:
                def find_map_idx(s, list_s):
                    indices = []
                    for k in range(len(list_s)):
                        if s.startswith(list_s[k]):
                            indices.append(k)
                            s = s[len(list_s[k]):]
                    return indices if not s else []

                mapped_ids = find_map_idx(base_token, blending_tokens)
                blending_all = "".join(blending_tokens)
                if len(mapped_ids) > 0 or blending_all.endswith(base_token) or base_token.endswith(blending_all):
                    blending_idx = [blending_idx[m] for m in mapped_ids]
                    blending_token = "".join(teacher_pieces[j].replace(teacher_marker, "") for j in blending_idx)
                    if base_token == blending_token:
                        topk_of(blending_idx[-1], idx_l, log_l)
                else:
                    idx_l.append(base_vocab[labels[i]])
                    log_l.append(1.0)
        out.append((idx_l, log_l))
    return out


def statistics_map(dense_counts, teacher_pieces, base_pieces, *, teacher_marker, base_marker, default_id,
                   special_pairs=()):
    """FuseChat-2.0 ``token_align_mapping(source, pivot, "default", C.T)`` over a dense
    ``[V_base, V_teacher]`` count matrix, then the apply rule (in-vocabulary piece first)."""
    base_vocab = {}
    for i, p in enumerate(base_pieces):
        base_vocab.setdefault(p, i)

    def dist_fn(a, b):
        aa, bb = a.replace(teacher_marker, ""), b.replace(base_marker, "")
        if len(aa) == 0 or len(bb) == 0:
            aa, bb = a.replace(teacher_marker, base_marker), b
        w = 0.1 if (aa in bb or bb in aa) else 1
        return levenshtein(aa, bb) * w

    ct = np.asarray(dense_counts).T
    out = [default_id] * ct.shape[0]
    for s in range(ct.shape[0]):
        nz = np.nonzero(ct[s])[0]
        if len(nz):
            dists = [dist_fn(teacher_pieces[s], base_pieces[p]) for p in nz]
            weights = [1 / (1 + np.exp(-ct[s][p])) for p in nz]
            out[s] = int(nz[np.argmin([d * w for w, d in zip(weights, dists)])])
    for t, b in special_pairs:
        out[t] = b
    # The apply rule of transform_step_logits: the in-vocabulary swapped piece first, else the map.
    return [base_vocab.get(t.replace(teacher_marker, base_marker), o) if t else o
            for t, o in zip(teacher_pieces, out)]
