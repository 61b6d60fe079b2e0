"""A teacher's store moved to the student's positions and vocabulary: the *aligned store*, and the
distillation batches read from it.

Per sequence (the same text in both tokenizations), :func:`align_teacher` runs the alignment layer of
this package: the DP token alignment (:func:`~fusion_jax.distill.align.align_tokens`), the per-position
decision teacher-position / one-hot fallback / own distribution (:func:`~fusion_jax.distill.targets.
teacher_sources`) and the mapped top-k (:func:`~fusion_jax.distill.targets.gather_targets` through the
vocabulary map). The result is written as a store in the student's tokenization (``variable=True``:
per position the number of kept entries, 0 where the teacher has no distribution; the teacher's
sequence CE copied), so the aligned data is as compact as the teacher store and memory-mapped the same
way; nothing dense is ever built.

Presets of the options (reference sections 1-2):

* FuseLLM: ``tie_break="fusellm"``, ``rule="fusellm"``, ``vocab_map="mined"`` ("soft"), and its
  code's one-hot fallback on the CURRENT token as ``fallback="fusellm_current"`` (default ``"next"``).
* FuseChat-2.0: ``tie_break="fusechat2"``, ``rule="fusechat2"``, ``vocab_map="statistics"`` (from the
  co-occurrence counts of the aligned pairs over this corpus).

:class:`Candidates` assembles a training batch: the rows' student arrays plus every candidate's
``[B, S, k]`` entries (the ref model's store when the run has one; a teacher's empty position takes
the ref's entries there, as FuseLLM's collator does) and sequence CEs, the arrays
:func:`fusion_jax.distill.loss.make_distill_loss` reads.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from fusion_jax.distill import store as st
from fusion_jax.distill.data import Tokenized
from fusion_jax.errors import ConfigError

TIE_BREAKS = ("fusellm", "fusechat2")


@dataclasses.dataclass(frozen=True)
class AlignOptions:
    """How a teacher's positions and vocabulary meet the student's (module docstring)."""

    tie_break: str = "fusellm"
    rule: str = "fusellm"
    vocab_map: str = "mined"
    fallback: str = "next"

    def __post_init__(self):
        from fusion_jax.distill.targets import FALLBACKS, RULES
        from fusion_jax.distill.vocab_map import KINDS
        for name, value, known in (("tie_break", self.tie_break, TIE_BREAKS), ("rule", self.rule, RULES),
                                   ("vocab_map", self.vocab_map, KINDS), ("fallback", self.fallback, FALLBACKS)):
            if value not in known:
                raise ConfigError(f"align.{name}: {value!r} is unknown (known: {', '.join(known)})")


def _pieces(tok, ids: np.ndarray) -> list[str]:
    return tok.convert_ids_to_tokens([int(x) for x in ids])


class _Aligner:
    """Per sequence ``(student pieces, teacher pieces, Alignment)`` by the official DP, computed when asked
    (nothing is kept for the whole corpus: a shard's worth at a time)."""

    def __init__(self, student_tok, teacher_tok, student: Tokenized, teacher: Tokenized, tie_break: str):
        from fusion_jax.distill.markers import detect_marker
        self.st, self.tt, self.s, self.t, self.tie_break = student_tok, teacher_tok, student, teacher, tie_break
        self.sm, self.tm = detect_marker(student_tok), detect_marker(teacher_tok)

    def __call__(self, i: int):
        from fusion_jax.distill.align import align_tokens
        sp, tp = _pieces(self.st, self.s.ids[i]), _pieces(self.tt, self.t.ids[i])
        return sp, tp, align_tokens(sp, tp, base_marker=self.sm, teacher_marker=self.tm, tie_break=self.tie_break)


def vocab_table(student_tok, teacher_tok, student: Tokenized, teacher: Tokenized, opts: AlignOptions,
                teacher_vocab_size: int) -> np.ndarray:
    """``int32 [teacher_vocab_size]``: teacher id -> student id (-1: dropped), padded with -1 for the
    checkpoint's rows the tokenizer has no piece for. ``"statistics"`` first counts the aligned pairs of
    every sequence of the corpus (FuseChat-2.0's co-occurrence matrix, sparse)."""
    from fusion_jax.distill.vocab_map import PairCounts, build_vocab_map
    counts = None
    if opts.vocab_map == "statistics":
        align = _Aligner(student_tok, teacher_tok, student, teacher, opts.tie_break)
        counts = PairCounts(len(student_tok), len(teacher_tok))
        for i in range(len(student)):
            counts.add(student.ids[i], teacher.ids[i], align(i)[2])
    table = build_vocab_map(teacher_tok, student_tok, opts.vocab_map, counts=counts).table
    out = np.full(int(teacher_vocab_size), -1, np.int32)
    out[:len(table)] = table[:teacher_vocab_size]
    return out


def _gather(source, onehot, ids, values, table):
    """:func:`~fusion_jax.distill.targets.gather_targets` on host arrays, compiled once per power-of-two
    size (a shard's positions in one call)."""
    import jax

    from fusion_jax.distill.targets import gather_targets
    n, m = len(source), len(ids)
    pn, pm = 1 << max(0, (n - 1).bit_length()), 1 << max(0, (m - 1).bit_length())
    src = np.pad(source, (0, pn - n), constant_values=-2)
    oh = np.pad(onehot, (0, pn - n))
    ti = np.pad(ids, ((0, pm - m), (0, 0)))
    tv = np.pad(values, ((0, pm - m), (0, 0)))
    out_ids, out_vals = jax.jit(gather_targets)(src, oh, ti, tv, table)
    return np.asarray(out_ids)[:n], np.asarray(out_vals)[:n]


def align_teacher(student_tok, teacher_tok, student: Tokenized, teacher: Tokenized, teacher_store: st.Store,
                  out_dir: str | Path, opts: AlignOptions, *, fingerprints: Mapping[str, str],
                  student_vocab_size: int, log=print, desc: str = "align") -> st.Store:
    """Write (or reuse) the aligned store of one teacher at ``out_dir``; returns it opened."""
    from fusion_jax.distill.targets import teacher_sources
    from fusion_jax.train.run import barrier, is_main
    if len(student) != len(teacher) or teacher_store.n_sequences != len(student):
        raise ConfigError(f"{desc}: {len(student)} student sequences, {len(teacher)} teacher sequences and "
                          f"{teacher_store.n_sequences} in the teacher store: not one corpus")
    out_dir = Path(out_dir)
    codec = st.Codec(k=teacher_store.codec.k, vocab_size=int(student_vocab_size),
                     logit_format=teacher_store.codec.logit_format, logit_step=teacher_store.codec.logit_step,
                     variable=True, token_ce=False)
    R = int(teacher_store.manifest["shard_sequences"])
    n_shards = -(-len(student) // R)
    plan = {"fingerprints": dict(fingerprints, teacher_store=teacher_store.manifest["fingerprints"]),
            "codec": codec.to_json(), "align": dataclasses.asdict(opts), "n_sequences": len(student),
            "shard_sequences": R, "n_shards": n_shards, "kind": "aligned"}
    if is_main():
        done = st.prepare(out_dir, plan, desc)
        if len(done) < n_shards or not (out_dir / st.MANIFEST).is_file():
            table = vocab_table(student_tok, teacher_tok, student, teacher, opts, teacher_store.codec.vocab_size)
            align = _Aligner(student_tok, teacher_tok, student, teacher, opts.tie_break)
            sm, tm = align.sm, align.tm
            # FuseLLM "soft": a position also counts as matched when the map sends the teacher token to the
            # student's (teacher_sources' table check); "exact" and FuseChat's rule match on pieces only
            use_table = table if opts.rule == "fusellm" and opts.vocab_map != "exact" else None
            stats = np.zeros(3, np.int64)   # teacher / one-hot / own positions
            for s in (s for s in range(n_shards) if s not in done):
                rows = range(s * R, min((s + 1) * R, len(student)))
                src_all, hot_all, t_ids, t_vals, base = [], [], [], [], 0
                for i in rows:
                    sp, tp, al = align(i)
                    src = teacher_sources(al, sp, tp, student.ids[i], teacher.ids[i], base_marker=sm,
                                          teacher_marker=tm, rule=opts.rule, table=use_table,
                                          fallback=opts.fallback)
                    d = teacher_store.sequence(i)
                    src_all.append(np.where(src.source >= 0, src.source + base, src.source))
                    hot_all.append(src.onehot)
                    t_ids.append(d.ids)
                    t_vals.append(d.values)
                    base += len(d.ids)
                source = np.concatenate(src_all).astype(np.int32)
                stats += [(source >= 0).sum(), (source == -1).sum(), (source == -2).sum()]
                ids, vals = _gather(source, np.concatenate(hot_all).astype(np.int32), np.concatenate(t_ids),
                                    np.concatenate(t_vals), table)
                valid = ids >= 0
                fields = codec.encode(np.where(valid, ids, 0), np.where(valid, vals, 0.0), valid=valid)
                lengths = np.asarray([len(student.ids[i]) for i in rows])
                st.write_shard(out_dir / st.shard_name(s), fields, np.r_[0, np.cumsum(lengths)],
                               teacher_store.seq_ce[list(rows)])
            m = st.finalize(out_dir, plan)
            tot = max(int(stats.sum()), 1)
            if stats.sum():
                log(f"{desc}: {100 * stats[0] / tot:.1f}% of student positions from the teacher, "
                    f"{100 * stats[1] / tot:.1f}% one-hot fallback, {100 * stats[2] / tot:.1f}% own distribution; "
                    f"{m['bytes_per_token']:.1f} bytes per token")
    barrier(f"aligned-{out_dir.name}")
    return st.Store.open(out_dir, {"fingerprints": plan["fingerprints"]}, desc)


def position_stats(s: st.Store) -> dict[str, float]:
    """Share of an aligned store's positions with teacher entries (count > 1 or a non-one-hot), a single
    entry (one-hot fallback, or a teacher whose map kept one), and none (own distribution)."""
    counts = np.concatenate([np.asarray(sh["count"]) for sh in s._shards]) if s._shards else np.zeros(0)
    n = max(len(counts), 1)
    return {"multi": float((counts > 1).sum() / n), "single": float((counts == 1).sum() / n),
            "none": float((counts == 0).sum() / n)}


class Candidates:
    """Builds distillation batches: ``batch_fn(batch)`` adds the candidates' arrays to a batch of student
    rows (``row``: indices into the stores). ``stores``: ``[ref store or None, aligned teacher stores...]``.
    """

    def __init__(self, stores: Sequence[st.Store | None], seq_len: int):
        self.ref = stores[0]
        self.stores = [s for s in stores if s is not None]
        self.seq_len = int(seq_len)
        ks = {s.codec.k for s in self.stores}
        if len(ks) != 1:
            raise ConfigError(f"candidates store different top-k sizes {sorted(ks)}; run every teacher pass with "
                              "one teacher_pass.top_k")

    @property
    def n(self) -> int:
        return len(self.stores)

    def arrays(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        parts = [s.padded(rows, self.seq_len) for s in self.stores]
        if self.ref is not None:   # an empty teacher position learns the ref model's entries (FuseLLM)
            r = parts[0]
            for p in parts[1:]:
                empty = (p["count"] == 0) & (r["count"] > 0)
                p["ids"] = np.where(empty[..., None], r["ids"], p["ids"])
                p["values"] = np.where(empty[..., None], r["values"], p["values"])
                p["count"] = np.where(empty, r["count"], p["count"])
        return {"t_ids": np.stack([p["ids"] for p in parts], 2), "t_values": np.stack([p["values"] for p in parts], 2),
                "t_count": np.stack([p["count"] for p in parts], 2), "t_ce": np.stack([p["seq_ce"] for p in parts], 1)}

    def batch_fn(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in batch.items() if k != "row"}
        out.update(self.arrays(np.asarray(batch["row"])))
        return out
