"""FuseLLM / FuseChat distillation: teachers of any tokenizer distilled into one student.

Alignment layer (this package's base; see each module's docstring for the array contracts):

* :func:`align_tokens` -- the official DP token alignment, exact and fast; :func:`align_by_offsets` --
  by character offsets; both give an :class:`Alignment` (int32 tables: ``start``/``count``, CSR,
  padded).
* :func:`tokenize`, :func:`detect_marker` -- a text's pieces and the tokenizer's word-start marker.
* :class:`VocabMap` (``exact`` / ``mined`` / ``statistics``), :func:`build_vocab_map`,
  :class:`PairCounts`, :func:`map_topk` -- teacher ids to student ids, and the sparse top-k contract.
* :func:`teacher_sources`, :func:`gather_targets` -- per base position the teacher distribution or the
  fallback (next-token one-hot by default, ``"fusellm_current"`` as FuseLLM's code).
"""
from fusion_jax.distill.align import (COSTS, TIE_BREAKS, Alignment, align_by_offsets, align_offsets, align_tokens,
                                      dtw_path, gather_aligned, piece_costs)
from fusion_jax.distill.markers import (BYTE_LEVEL, MARKERS, SENTENCEPIECE, TokenizedText, check_marker,
                                        check_same_text, detect_marker, piece_bytes, spelled_text, tokenize)
from fusion_jax.distill.targets import (FALLBACKS, ONE_HOT, OWN, RULES, TeacherSources, gather_targets,
                                        teacher_sources)
from fusion_jax.distill.vocab_map import (KINDS, PairCounts, VocabMap, build_vocab_map, exact_map, map_topk,
                                          mined_map, statistics_map, tokenizer_fingerprint, vocab_pieces)

__all__ = [
    "COSTS", "TIE_BREAKS", "Alignment", "align_by_offsets", "align_offsets", "align_tokens", "dtw_path",
    "gather_aligned", "piece_costs",
    "BYTE_LEVEL", "MARKERS", "SENTENCEPIECE", "TokenizedText", "check_marker", "check_same_text",
    "detect_marker", "piece_bytes", "spelled_text", "tokenize",
    "FALLBACKS", "ONE_HOT", "OWN", "RULES", "TeacherSources", "gather_targets", "teacher_sources",
    "KINDS", "PairCounts", "VocabMap", "build_vocab_map", "exact_map", "map_topk", "mined_map",
    "statistics_map", "tokenizer_fingerprint", "vocab_pieces",
]
