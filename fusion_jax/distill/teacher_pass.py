"""The teacher pass: a teacher over a tokenized corpus, its top-k and cross-entropies into a store.

Any checkpoint :func:`fusion_jax.hf.load` reads (Llama, Mistral, Qwen2, ...) runs data-parallel over
the mesh (the batch axis on the mesh's data axes, the params sharded by the rules table). Per step one
jitted function computes the final hidden states once, then in sequence chunks (a ``lax.scan``, so the
``[B, S, V]`` logits of a long sequence are never whole) the log-softmax, its top-k and the
cross-entropy against the gold next token. The host encodes the rows (:class:`~fusion_jax.distill.store.
Codec`) and each finished shard is written to a temporary file and renamed; a rerun skips the shards
that exist (resume after a kill), and a store of another teacher, tokenizer or corpus at the same path
is refused.

Determinism: a row's padded length is a function of its own length (sequences are grouped by length
bucket, ``pad_multiple``), and every device holds ``batch_per_device`` rows whatever the device count,
so each row is computed with the same shapes on one device or eight: the same store, byte for byte.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.distill import store as st
from fusion_jax.distill.data import Tokenized
from fusion_jax.errors import ConfigError, DataError

VOCAB_PAD = 1024   # checkpoints pad the embedding rows to a multiple of 64 or 128 (rarely more than 1k)


def teacher_fingerprint(model_dir: str | Path) -> str:
    """Hash of a checkpoint's config.json and its weight files' names, sizes and headers (cheap; the
    weights themselves are not read)."""
    p = Path(model_dir)
    h = hashlib.sha256((p / "config.json").read_bytes() if (p / "config.json").is_file() else b"")
    for f in sorted(p.glob("*.safetensors")) + sorted(p.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 16))
    return h.hexdigest()[:16]


def check_vocabulary(model_dir: str | Path, tokenizer, what: str = "teacher") -> int:
    """The checkpoint's vocab_size; a ConfigError unless it fits the tokenizer: at least its length and
    at most that rounded up to :data:`VOCAB_PAD` (the padding checkpoints add)."""
    from fusion_jax import hf
    cfg = hf.read_config(model_dir)
    n = len(tokenizer)
    limit = -(-n // VOCAB_PAD) * VOCAB_PAD
    if not n <= cfg.vocab_size <= limit:
        raise ConfigError(f"{what} {model_dir}: its vocabulary (config.json vocab_size={cfg.vocab_size}) does not "
                          f"match its tokenizer ({n} tokens): give the tokenizer this checkpoint was trained with")
    return int(cfg.vocab_size)


def make_pass_fn(graphdef, k: int, chunk: int):
    """jitted ``(params, ids [B,S], attention_mask [B,S]) -> (top-k log-probs [B,S,k] f32, ids [B,S,k]
    i32, CE against the next token [B,S] f32)``."""
    from flax import nnx

    def f(params, ids, mask):
        model = nnx.merge(graphdef, nnx.State(params))
        h = model(ids, attention_mask=mask, return_hidden=True, return_logits=False).hidden
        B, S, D = h.shape
        c = max(1, min(int(chunk), S))
        n = -(-S // c)
        nxt = jnp.concatenate([ids[:, 1:], jnp.zeros((B, 1), ids.dtype)], axis=1)
        if n * c > S:
            h = jnp.pad(h, ((0, 0), (0, n * c - S), (0, 0)))
            nxt = jnp.pad(nxt, ((0, 0), (0, n * c - S)))
        hs = jnp.moveaxis(h.reshape(B, n, c, D), 1, 0)
        ls = jnp.moveaxis(nxt.reshape(B, n, c), 1, 0)

        def body(_, x):
            hc, lc = x
            logits = model.logits_from_hidden(hc).astype(jnp.float32)
            lse = jax.nn.logsumexp(logits, axis=-1)
            vals, idx = jax.lax.top_k(logits, k)
            ce = lse - jnp.take_along_axis(logits, lc[..., None].astype(jnp.int32), axis=-1)[..., 0]
            return None, (vals - lse[..., None], idx.astype(jnp.int32), ce)

        _, (v, i, ce) = jax.lax.scan(body, None, (hs, ls))
        v, i, ce = (jnp.moveaxis(x, 0, 1).reshape((B, n * c) + x.shape[3:])[:, :S] for x in (v, i, ce))
        return v, i, ce

    return jax.jit(f)


def _batches(lengths: np.ndarray, rows: np.ndarray, per_step: int, pad_multiple: int, seq_cap: int):
    """Groups of ``rows`` (at most ``per_step`` each) of one padded length each: rows bucketed by their
    own length rounded up to ``pad_multiple`` (capped at ``seq_cap``), longest buckets first."""
    padded = np.minimum(-(-lengths[rows] // pad_multiple) * pad_multiple, seq_cap)
    for S in sorted(set(padded.tolist()), reverse=True):
        members = rows[padded == S]
        for i in range(0, len(members), per_step):
            yield int(S), members[i:i + per_step]


def run_teacher_pass(model_dir: str | Path, tokenizer, corpus: Tokenized, store_dir: str | Path, *,
                     fingerprints: Mapping[str, str], k: int = 10, batch_per_device: int = 8,
                     shard_sequences: int = 1024, pad_multiple: int = 64, logit_format: str = "q8",
                     logit_chunk: int = 512, dtype: str = "float32", shard_params: bool = False, mesh=None,
                     progress: bool = True,
                     desc: str = "teacher pass", log=print) -> st.Store:
    """Run one teacher over ``corpus`` (its own tokenization) into the store at ``store_dir``; returns the
    opened :class:`~fusion_jax.distill.store.Store`.

    ``fingerprints``: ``{"corpus": ..., "tokenizer": ...}`` recorded in the manifest (the teacher's is
    added). A sequence's CE is the mean over its target tokens' predictions (``loss_mask``); a sequence
    without a target is a DataError (the official code drops NaN CEs; here the corpus must not have
    them)."""
    from fusion_jax import hf
    from fusion_jax import sharding as shd
    from fusion_jax.train.run import barrier, is_main

    model_dir, store_dir = Path(model_dir), Path(store_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{desc}: {model_dir} is not a checkpoint directory (no config.json)")
    vocab = check_vocabulary(model_dir, tokenizer, desc)
    lengths = corpus.lengths
    if len(corpus) == 0:
        raise DataError(f"{desc}: the corpus is empty")
    for i, (x, m) in enumerate(zip(corpus.ids, corpus.loss_mask)):
        if len(x) and (int(x.min()) < 0 or int(x.max()) >= vocab):
            raise DataError(f"{desc}: sequence {i} has token ids outside the teacher's vocabulary of {vocab}")
        if not np.asarray(m)[1:].any():
            raise DataError(f"{desc}: sequence {i} has no target token to score the teacher on")
    codec = st.Codec(k=int(k), vocab_size=vocab, logit_format=logit_format)
    R = int(shard_sequences)
    n_shards = -(-len(corpus) // R)
    plan = {"fingerprints": dict(fingerprints, teacher=teacher_fingerprint(model_dir)), "codec": codec.to_json(),
            "n_sequences": len(corpus), "shard_sequences": R, "n_shards": n_shards,
            "n_tokens": int(lengths.sum()), "pad_multiple": int(pad_multiple), "dtype": str(dtype),
            "teacher": str(model_dir)}
    if is_main():
        st.prepare(store_dir, plan, desc)
    barrier("teacher-pass-plan")
    done = [i for i in range(n_shards) if (store_dir / st.shard_name(i)).is_file()]
    if (store_dir / st.MANIFEST).is_file() and len(done) == n_shards:
        log(f"{desc}: done in an earlier run ({store_dir})")
        return st.Store.open(store_dir, {"fingerprints": plan["fingerprints"]}, desc)

    mesh = mesh if mesh is not None else shd.make_mesh()
    dp = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
    per_step = int(batch_per_device) * dp
    if shard_params:
        cfg, params = hf.load(model_dir, mesh=mesh, dtype=dtype)
    else:   # pure data parallelism: every device holds the whole teacher
        from jax.sharding import NamedSharding, PartitionSpec
        cfg, params = hf.load(model_dir, shardings=NamedSharding(mesh, PartitionSpec()), dtype=dtype)
    from flax import nnx
    from fusion_jax.models import abstract_model
    graphdef = nnx.split(abstract_model(cfg), nnx.Param)[0]
    fn = make_pass_fn(graphdef, codec.k, logit_chunk)
    seq_cap = -(-int(lengths.max()) // pad_multiple) * pad_multiple
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    todo = [s for s in range(n_shards) if s not in done]
    total = int(lengths.sum())
    initial = int(sum(lengths[s * R:(s + 1) * R].sum() for s in done))
    bar = None
    if progress and is_main():
        from tqdm.auto import tqdm
        bar = tqdm(total=total, initial=initial, desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True,
                   smoothing=0.1)
    t0 = time.perf_counter()
    for s in todo:
        rows = np.arange(s * R, min((s + 1) * R, len(corpus)))
        out_v, out_i, out_ce = {}, {}, {}
        for S, members in _batches(lengths, rows, per_step, pad_multiple, seq_cap):
            ids = np.full((per_step, S), pad_id, np.int32)
            mask = np.zeros((per_step, S), np.int32)
            mask[:, 0] = 1   # filler rows attend to one token (a fully masked row is NaN in some kernels)
            for b, r in enumerate(members):
                n = int(lengths[r])
                ids[b, :n] = corpus.ids[r]
                mask[b, :n] = 1
            batch = shd.put_replicated_batch({"ids": ids, "mask": mask}, mesh)
            v, i, ce = (shd.to_host(x) for x in fn(params, batch["ids"], batch["mask"]))
            for b, r in enumerate(members):
                n = int(lengths[r])
                out_v[r], out_i[r], out_ce[r] = v[b, :n], i[b, :n], ce[b, :n]
            if bar is not None:
                bar.update(int(lengths[members].sum()))
        if is_main():
            vals = np.concatenate([out_v[r] for r in rows])
            idx = np.concatenate([out_i[r] for r in rows])
            # the CE of the prediction at t counts when token t+1 is a target; none after the last token.
            # A sequence's CE is the mean of its STORED (float16) token CEs: a function of the store's
            # bytes, not of the device's float32 summation order (which varies with the device count).
            ces = [np.r_[out_ce[r][:-1], 0.0].astype(np.float16) for r in rows]
            tok_ce = np.concatenate(ces)
            seq_ce = np.asarray([_mean_ce(c, corpus.loss_mask[r]) for c, r in zip(ces, rows)], np.float32)
            offsets = np.r_[0, np.cumsum(lengths[rows])]
            st.write_shard(store_dir / st.shard_name(s), codec.encode(idx, vals, ce=tok_ce), offsets, seq_ce)
        barrier(f"teacher-pass-shard-{s}")
    if bar is not None:
        bar.close()
    if is_main():
        manifest = st.finalize(store_dir, plan)
        dt = time.perf_counter() - t0
        log(f"{desc}: {total - initial} tokens in {dt:.1f}s ({(total - initial) / max(dt, 1e-9):,.0f} tok/s), "
            f"{manifest['bytes_per_token']:.1f} bytes per token -> {store_dir}")
    barrier("teacher-pass-done")
    return st.Store.open(store_dir, {"fingerprints": plan["fingerprints"]}, desc)


def _mean_ce(ce: np.ndarray, loss_mask: np.ndarray) -> float:
    """Mean of the predictions of target tokens (``ce[t]`` predicts token t+1), in float64."""
    m = np.asarray(loss_mask[1:], np.float64)
    return float((np.asarray(ce[:-1], np.float64) * m).sum() / m.sum())


def store_summary(s: st.Store) -> dict[str, Any]:
    """JSON-able facts of a store for the run report."""
    m = s.manifest
    return {"path": str(s.path), "n_sequences": s.n_sequences, "n_tokens": s.n_tokens, "bytes": m["bytes"],
            "bytes_per_token": round(s.bytes_per_token, 3), "k": s.codec.k, "vocab_size": s.codec.vocab_size,
            "logit_format": s.codec.logit_format, "mean_seq_ce": float(np.mean(s.seq_ce)),
            "fingerprints": m["fingerprints"]}
