"""Which teacher distribution each base position learns from, or which fallback (reference file
section 1.3), as int32 tables, and the jitted gather that turns them into sparse targets.

:func:`teacher_sources` decides per base position ``j`` (host side, once per sequence pair):

* ``source[j] >= 0``: use the teacher's top-k at that teacher position, mapped by :func:`fusion_jax.
  distill.vocab_map.map_topk`;
* ``source[j] == ONE_HOT`` (-1): a one-hot on ``onehot[j]``; ``fallback="next"`` (the default, the
  papers' intent and FuseChat-2.0's code: the label, i.e. the NEXT base token; the last position
  repeats the last token) or ``"fusellm_current"`` (FuseLLM's code: the CURRENT base token);
* ``source[j] == OWN`` (-2): no teacher target; the consumer uses the base model's own distribution
  (the original's empty list, "bad case").

Rules (``rule``):

* ``"fusellm"``: one teacher position ``J = [t]`` and the teacher piece (marker swapped to the base's)
  equals the base piece, or -- with a map (``table``, FuseLLM "soft") -- ``table[teacher id] == base
  id``; at base position 0 a byte-level teacher's piece gets the SentencePiece prefix marker when the
  base piece has it (FuseLLM's MPT special case). Otherwise (several teacher positions, or no match)
  the one-hot.
* ``"fusechat2"`` (FuseChat-2.0 "default"/MS with the alignment matrix): one teacher position: accepted
  when either swapped piece ends with the other; several: the first whose stripped piece ends with (or
  is the end of) the stripped base piece, else a greedy prefix cover of the base piece by the teacher
  pieces whose concatenation equals it (the last covering position), where a failed cover whose pieces
  still end with (or are the end of) the base piece gives ``OWN``; otherwise the one-hot.

FuseChat-2.0's other align types map onto these: its "hard" (EM) is ``rule="fusellm"`` without a table
and with ``fallback="next"`` (it lacks FuseLLM's position-0 prefix case); its "soft" is broken as
released (reference file section 2.3). FuseChat v1's early variant (merged top-k of a covering, weighted
by co-occurrence) is not offered: the released v1 pipeline never aligned vocabularies.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from fusion_jax.distill.align import Alignment
from fusion_jax.distill.markers import BYTE_LEVEL, SENTENCEPIECE, check_marker
from fusion_jax.errors import ConfigError

ONE_HOT, OWN = -1, -2
RULES = ("fusellm", "fusechat2")
FALLBACKS = ("next", "fusellm_current")


@dataclass(frozen=True, eq=False)
class TeacherSources:
    """``source``: ``int32 [n_base]`` (teacher position, ``ONE_HOT`` or ``OWN``); ``onehot``: ``int32
    [n_base]`` the base id of the one-hot fallback (meaningful where ``source == ONE_HOT``)."""

    source: np.ndarray
    onehot: np.ndarray


def _fusechat2_multi(base_piece: str, teacher_stripped: list[str], positions: list[int],
                     base_marker: str) -> int:
    base_token = base_piece.replace(base_marker, "")
    for j, t in zip(positions, teacher_stripped):
        if base_token != base_marker and (base_token.endswith(t) or t.endswith(base_token)):
            return j
    rest, cover = base_token, []
    for k, t in enumerate(teacher_stripped):
        if rest.startswith(t):
            cover.append(k)
            rest = rest[len(t):]
    if rest:
        cover = []
    joined = "".join(teacher_stripped)
    if cover or joined.endswith(base_token) or base_token.endswith(joined):
        if "".join(teacher_stripped[k] for k in cover) == base_token and cover:
            return positions[cover[-1]]
        return OWN
    return ONE_HOT


def teacher_sources(alignment: Alignment, base_pieces: Sequence[str], teacher_pieces: Sequence[str],
                    base_ids, teacher_ids=None, *, base_marker: str, teacher_marker: str,
                    rule: str = "fusellm", table=None, fallback: str = "next") -> TeacherSources:
    """The per-position decision of the module docstring. ``base_ids`` ``int [n_base]`` (for the
    one-hot and, with ``table``, the "soft" check); ``teacher_ids`` ``int [n_teacher]`` (needed with
    ``table``); ``table`` ``int32 [V_teacher]`` (a vocabulary map, FuseLLM "soft")."""
    check_marker(base_marker, "base_marker")
    check_marker(teacher_marker, "teacher_marker")
    if rule not in RULES:
        raise ConfigError(f"rule={rule!r}: expected one of {', '.join(RULES)}")
    if fallback not in FALLBACKS:
        raise ConfigError(f"fallback={fallback!r}: expected one of {', '.join(FALLBACKS)}")
    base_ids = np.asarray(base_ids, dtype=np.int32)
    n = alignment.n_base
    if len(base_pieces) != n or len(base_ids) != n or len(teacher_pieces) != alignment.n_teacher:
        raise ConfigError("teacher_sources: pieces / ids do not match the alignment's lengths")
    if table is not None and teacher_ids is None:
        raise ConfigError("teacher_sources: a vocabulary map (table) needs teacher_ids")
    if fallback == "next":
        onehot = np.concatenate([base_ids[1:], base_ids[-1:]]) if n else base_ids.copy()
    else:
        onehot = base_ids.copy()
    source = np.full(n, ONE_HOT, dtype=np.int32)
    swapped = [p.replace(teacher_marker, base_marker) for p in teacher_pieces]
    starts, counts = alignment.start.tolist(), alignment.count.tolist()
    for i in range(n):  # string rules per position: O(n), no loop over DP cells
        s, c = starts[i], counts[i]
        if c == 0:
            source[i] = OWN
            continue
        b = base_pieces[i]
        if rule == "fusellm":
            if c != 1:
                continue
            t = swapped[s]
            if (i == 0 and teacher_marker == BYTE_LEVEL and base_marker == SENTENCEPIECE
                    and b.startswith(base_marker) and not t.startswith(base_marker)):
                t = base_marker + t  # FuseLLM's MPT special case: SentencePiece's prefix space
            if b == t or (table is not None and int(table[teacher_ids[s]]) == int(base_ids[i])):
                source[i] = s
        elif c == 1:
            t = swapped[s]
            if t.endswith(b) or b.endswith(t):
                source[i] = s
        else:
            positions = list(range(s, s + c))
            stripped = [teacher_pieces[j].replace(teacher_marker, "") for j in positions]
            source[i] = _fusechat2_multi(b, stripped, positions, base_marker)
    return TeacherSources(source, onehot.astype(np.int32))


def gather_targets(source, onehot, topk_ids, topk_logits, table):
    """Sparse targets for every base position, under ``jax.jit``: ``(ids int32 [n_base, k], logits
    [n_base, k])`` in the :func:`~fusion_jax.distill.vocab_map.map_topk` contract. Teacher positions:
    the mapped top-k; ``ONE_HOT``: slot 0 = ``onehot`` with logit 0 (probability 1), the rest dropped;
    ``OWN``: every slot dropped (use the base model's own distribution there).

    ``topk_ids`` / ``topk_logits``: the teacher's ``[n_teacher, k]`` top-k at its own positions.
    """
    import jax.numpy as jnp

    from fusion_jax.distill.vocab_map import map_topk

    source = jnp.asarray(source)
    ids, logits = map_topk(jnp.take(topk_ids, jnp.maximum(source, 0), axis=0),
                           jnp.take(topk_logits, jnp.maximum(source, 0), axis=0), table)
    k = ids.shape[-1]
    first = jnp.arange(k) == 0
    hot_ids = jnp.where(first, jnp.asarray(onehot)[:, None], -1)
    hot_logits = jnp.where(first, jnp.zeros((), logits.dtype), jnp.asarray(-jnp.inf, logits.dtype))
    is_hot = (source == ONE_HOT)[:, None]
    is_own = (source == OWN)[:, None]
    ids = jnp.where(is_hot, hot_ids, jnp.where(is_own, -1, ids)).astype(jnp.int32)
    logits = jnp.where(is_hot, hot_logits, jnp.where(is_own, jnp.asarray(-jnp.inf, logits.dtype), logits))
    return ids, logits
