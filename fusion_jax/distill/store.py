"""The teacher store: per real token a teacher's top-k, compact, sharded, memory-mapped, with a manifest.

A store holds, for every sequence of a tokenized corpus (real tokens only, no padding), per token:

* the top-k token ids, **bit-packed** at ``ceil(log2(vocab_size))`` bits each (10 bits for a 1k
  vocabulary, 17 for Llama-3's 128k: 22 bytes for ten ids instead of 40 as uint32);
* the top-k values as **log-probabilities**: the top-1's as float16 and the other k-1 as their distance
  below the top-1, ``d_i = v_0 - v_i >= 0``, quantized to one byte with a step of 1/16 nat (``"q8"``,
  saturating at 255/16 ~ 15.9 nats, where an entry weighs < 1.3e-7 of the top one) or kept as float16
  (``"f16"``). The distillation target is a softmax over the kept entries, which only sees these
  differences; a step of 1/16 is as fine as FuseLLM's own bf16 logits of magnitude 8-16;
* the cross-entropy of the teacher against the gold next token (float16), and per sequence the mean
  of it over the positions that count (float32);
* in an *aligned* store (``variable=True``: a teacher's top-k mapped into the student's vocabulary at
  the student's positions, :mod:`fusion_jax.distill.targets`) also the number of kept entries (uint8).

Bytes per token for k = 10 (measured by ``bench/distill_store.py``): 26 for a 1k vocabulary, 32 for
32k, 35 for 128k, against ~100 for FuseLLM's format (fp16 logits, int64 ids).

Layout of a store directory::

    plan.json                  what is being computed (fingerprints, codec, sequence count): resume key
    shard-00000.safetensors    sequences [0, R), one file per R sequences, written to a temporary file
    shard-00001.safetensors    and renamed, so a finished shard is whole and never recomputed
    ...
    manifest.json              written last: the store is complete (fingerprints, codec, shard table
                               with each file's size and SHA-256, totals, bytes per token)

A store is checked when it is opened: the manifest's structure, every shard's presence, size and SHA-256
(one sequential read of the store, small beside the teacher pass that wrote it and the training that
reads it); any damage is a DataError naming the file, never silently different targets.

Each shard holds ``ids`` uint8 [n, ceil(k*bits/8)], ``top`` float16 [n], ``delta`` uint8|float16
[n, k-1], optionally ``count`` uint8 [n] and ``ce`` float16 [n], then ``offsets`` int64 [m+1] (token
offsets of its m sequences) and ``seq_ce`` float32 [m]. :class:`Store` maps the shards read-only
(``np.memmap``) and decodes only the rows asked for.
"""
from __future__ import annotations

import dataclasses
import json
import math
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fusion_jax.errors import DataError
from fusion_jax.utils.atomic import atomic_file

FORMAT = "fusion-jax-teacher-store"
VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
LOGIT_FORMATS = ("q8", "f16")
DEFAULT_STEP = 1.0 / 16.0


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


# -- ids, bit-packed ----------------------------------------------------------------------------------
def id_bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """``[n, k]`` non-negative ints < 2**bits -> ``uint8 [n, ceil(k * bits / 8)]`` (big-endian bits)."""
    ids = np.asarray(ids)
    n, k = ids.shape
    be = np.ascontiguousarray(ids.astype(">u4")).view(np.uint8).reshape(n, k, 4)
    b = np.unpackbits(be, axis=-1)[..., 32 - bits:]                        # [n, k, bits]
    return np.packbits(b.reshape(n, k * bits), axis=-1)


def unpack_ids(packed: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_ids`: ``int32 [n, k]``."""
    packed = np.asarray(packed)
    n = packed.shape[0]
    b = np.unpackbits(packed, axis=-1, count=k * bits).reshape(n, k, bits)
    full = np.zeros((n, k, 32), np.uint8)
    full[..., 32 - bits:] = b
    return np.packbits(full, axis=-1).view(">u4")[..., 0].astype(np.int32)


# -- the codec ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Decoded:
    """Decoded rows: ``ids`` int32 [n, k], ``values`` float32 [n, k] (log-probabilities, descending),
    ``count`` int32 [n] (entries ``>= count`` are absent), ``ce`` float32 [n] or None."""

    ids: np.ndarray
    values: np.ndarray
    count: np.ndarray
    ce: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Codec:
    """How one store encodes a token's top-k (see the module docstring)."""

    k: int
    vocab_size: int
    logit_format: str = "q8"
    logit_step: float = DEFAULT_STEP
    variable: bool = False     # per-token count of kept entries (aligned stores)
    token_ce: bool = True      # per-token cross-entropy against the gold next token

    def __post_init__(self):
        if not 1 <= int(self.k) <= 255:
            raise DataError(f"store: k={self.k} must be in [1, 255]")
        if int(self.vocab_size) < 2:
            raise DataError(f"store: vocab_size={self.vocab_size} must be >= 2")
        if self.logit_format not in LOGIT_FORMATS:
            raise DataError(f"store: logit_format={self.logit_format!r}; expected one of {', '.join(LOGIT_FORMATS)}")
        if not self.logit_step > 0:
            raise DataError(f"store: logit_step={self.logit_step} must be > 0")

    @property
    def bits(self) -> int:
        return id_bits(self.vocab_size)

    @property
    def bytes_per_token(self) -> float:
        """Bytes one token takes (without the per-sequence offsets and CE)."""
        return (math.ceil(self.k * self.bits / 8) + 2 + (self.k - 1) * (1 if self.logit_format == "q8" else 2)
                + (1 if self.variable else 0) + (2 if self.token_ce else 0))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "Codec":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def encode(self, ids: np.ndarray, values: np.ndarray, valid: np.ndarray | None = None,
               ce: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """``ids`` [n, k], ``values`` [n, k] (log-probabilities or logits), ``valid`` bool [n, k] (default:
        all; a variable-count codec needs it) -> the shard fields of these n tokens. The valid entries are
        stored first, by descending value."""
        ids = np.asarray(ids, np.int64)
        values = np.asarray(values, np.float32)
        n, k = ids.shape
        if k != self.k or values.shape != (n, k):
            raise DataError(f"store: expected [n, {self.k}] ids and values, got {ids.shape} and {values.shape}")
        if valid is None:
            if self.variable:
                raise DataError("store: a variable-count codec needs the valid entries")
            valid = np.ones((n, k), bool)
        valid = np.asarray(valid, bool)
        if not self.variable and not valid.all():
            raise DataError("store: a fixed-count codec stores all k entries of every token")
        if n and ((ids < 0) | (ids >= self.vocab_size))[valid].any():
            raise DataError(f"store: token ids outside [0, {self.vocab_size})")
        if n and not np.isfinite(values[valid]).all():
            raise DataError("store: non-finite top-k values")
        # descending by value, absent entries last (stable: equal values keep their order)
        order = np.argsort(np.where(valid, -values, np.inf), axis=1, kind="stable")
        cnt = valid.sum(1)
        valid = np.arange(k)[None, :] < cnt[:, None]
        ids = np.where(valid, np.take_along_axis(ids, order, 1), 0)
        values = np.where(valid, np.take_along_axis(values, order, 1), 0.0)
        top = values[:, 0] if k else np.zeros(n, np.float32)
        delta = np.where(valid[:, 1:], top[:, None] - values[:, 1:], 0.0)
        out = {"ids": pack_ids(ids, self.bits), "top": np.where(cnt > 0, top, 0).astype(np.float16)}
        if self.logit_format == "q8":
            out["delta"] = np.clip(np.rint(delta / self.logit_step), 0, 255).astype(np.uint8)
        else:
            out["delta"] = delta.astype(np.float16)
        if self.variable:
            out["count"] = cnt.astype(np.uint8)
        if self.token_ce:
            if ce is None:
                raise DataError("store: this codec stores per-token cross-entropy; none given")
            out["ce"] = np.asarray(ce, np.float32).astype(np.float16)
        return out

    def decode(self, fields: Mapping[str, np.ndarray], rows=slice(None)) -> Decoded:
        """Decode the tokens ``rows`` (a slice or an index array) of shard fields."""
        packed = np.asarray(fields["ids"][rows])
        n = packed.shape[0]
        ids = unpack_ids(packed, self.k, self.bits)
        top = np.asarray(fields["top"][rows], np.float32)
        d = np.asarray(fields["delta"][rows], np.float32)
        if self.logit_format == "q8":
            d = d * np.float32(self.logit_step)
        values = np.concatenate([top[:, None], top[:, None] - d], axis=1) if self.k > 1 else top[:, None]
        count = (np.asarray(fields["count"][rows], np.int32) if self.variable
                 else np.full(n, self.k, np.int32))
        ce = np.asarray(fields["ce"][rows], np.float32) if self.token_ce else None
        return Decoded(ids, values.astype(np.float32), count, ce)


# -- writing --------------------------------------------------------------------------------------------
def write_shard(path: Path, fields: Mapping[str, np.ndarray], offsets: np.ndarray, seq_ce: np.ndarray) -> int:
    """One shard file (safetensors), written to a temporary file and renamed; returns its size in bytes.

    The bytes are a function of the arrays alone (tensors in name order; the ``safetensors`` package
    writes its header from a hash map, in an order that changes from process to process)."""
    from fusion_jax.hf.safetensors_io import TensorSpec, _header_bytes
    arrays = {k: np.ascontiguousarray(v) for k, v in fields.items()}
    arrays["offsets"] = np.asarray(offsets, np.int64)
    arrays["seq_ce"] = np.asarray(seq_ce, np.float32)
    names = sorted(arrays)
    header, _ = _header_bytes([TensorSpec(n, arrays[n].shape, arrays[n].dtype) for n in names],
                              {"format": FORMAT, "version": str(VERSION)})
    with atomic_file(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for n in names:
            f.write(arrays[n].tobytes())
    return 8 + len(header) + sum(arrays[n].nbytes for n in names)


def prepare(store_dir: Path, plan: Mapping[str, Any], what: str = "store") -> list[int]:
    """Start (or resume) a store at ``store_dir`` for ``plan`` (a JSON-able description: fingerprints,
    codec, sequence count, shard size). Returns the indices of the shards already written.

    A directory holding another plan's shards is refused (DataError naming both fingerprints) rather
    than mixed; a complete store of the same plan returns every shard."""
    store_dir = Path(store_dir)
    if store_dir.exists() and not store_dir.is_dir():
        raise DataError(f"{what}: {store_dir} exists and is not a directory")
    f = store_dir / PLAN
    plan = json.loads(json.dumps(plan, sort_keys=True))
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except ValueError:
            old = None
        if old != plan:
            fo, fn = (old or {}).get("fingerprints", {}), plan.get("fingerprints", {})
            for key in ("tokenizer", "corpus", "teacher", *sorted(set(fo) | set(fn))):
                if fo.get(key) != fn.get(key):
                    raise DataError(f"{what}: {store_dir} holds a store made for another {key} (fingerprint "
                                    f"{fo.get(key)!r} there, {fn.get(key)!r} now); delete it or choose another "
                                    "directory")
            diff = _first_difference(old, plan)
            raise DataError(f"{what}: {store_dir} holds a store of another computation ({diff}); delete it or "
                            "choose another directory")
    else:
        if store_dir.is_dir() and any(store_dir.glob("shard-*.safetensors")):
            raise DataError(f"{what}: {store_dir} holds shards but no {PLAN}; delete it or choose another "
                            "directory")
        store_dir.mkdir(parents=True, exist_ok=True)
        with atomic_file(f) as fh:
            json.dump(plan, fh, indent=1, sort_keys=True)
    n = int(plan["n_shards"])
    return [i for i in range(n) if (store_dir / shard_name(i)).is_file()]


def _first_difference(old, new, where="") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{where}.{key}" if where else key)
    return f"{where or 'plan'}: {old!r} there, {new!r} now"


def finalize(store_dir: Path, plan: Mapping[str, Any]) -> dict:
    """Write ``manifest.json`` once every shard exists: the plan plus the shard table and totals."""
    store_dir = Path(store_dir)
    from fusion_jax.hf.safetensors_io import read_header
    shards, n_tokens, n_bytes = [], 0, 0
    seq0 = 0
    for i in range(int(plan["n_shards"])):
        p = store_dir / shard_name(i)
        infos, _ = read_header(p)
        m = infos["seq_ce"].shape[0]
        t = infos["top"].shape[0]
        size = p.stat().st_size
        shards.append({"file": p.name, "sequences": [seq0, seq0 + m], "tokens": [n_tokens, n_tokens + t],
                       "bytes": size, "sha256": _sha256(p)})
        seq0 += m
        n_tokens += t
        n_bytes += size
    if seq0 != int(plan["n_sequences"]):
        raise DataError(f"store {store_dir}: shards hold {seq0} sequences, the plan {plan['n_sequences']}")
    manifest = dict(plan, format=FORMAT, version=VERSION, shards=shards, n_tokens=n_tokens, bytes=n_bytes,
                    bytes_per_token=n_bytes / max(n_tokens, 1))
    with atomic_file(store_dir / MANIFEST) as fh:
        json.dump(manifest, fh, indent=1, sort_keys=True)
    return manifest


def _sha256(path: Path) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


# -- reading --------------------------------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_manifest(m: Any, path: Path, what: str) -> None:
    """The manifest's structure (types of every field a reader uses) and each shard's file and size: a
    DataError naming the manifest or the shard and saying how to recover."""
    f = path / MANIFEST
    fix = f"delete {path} and rerun the teacher pass (or the pipeline) to recompute it"

    def bad(why: str):
        return DataError(f"{what}: {f} is damaged ({why}); {fix}")
    if not isinstance(m, dict):
        raise bad(f"a JSON {type(m).__name__}, not an object")
    if m.get("format") != FORMAT or m.get("version") != VERSION:
        raise DataError(f"{what}: {path} is not a {FORMAT} v{VERSION} store ({f} says "
                        f"{m.get('format')!r} v{m.get('version')!r}); {fix}")
    for key in ("n_sequences", "n_tokens", "shard_sequences"):
        if not _is_int(m.get(key)) or m[key] < (1 if key == "shard_sequences" else 0):
            raise bad(f"{key} is {m.get(key)!r}")
    if not isinstance(m.get("fingerprints"), dict):
        raise bad(f"fingerprints is {m.get('fingerprints')!r}")
    bpt = m.get("bytes_per_token")
    if not isinstance(bpt, (int, float)) or isinstance(bpt, bool) or not bpt >= 0:
        raise bad(f"bytes_per_token is {m.get('bytes_per_token')!r}")
    if not isinstance(m.get("codec"), dict):
        raise bad(f"codec is {m.get('codec')!r}")
    try:
        Codec.from_json(m["codec"])
    except (KeyError, TypeError, ValueError) as e:   # a field missing, or of a type int()/float() refuse
        raise bad(f"codec: {e}") from None
    except DataError as e:
        raise bad(str(e)) from None
    # the dataclass converts nothing: a "3" or a 2.5 for k, a "no" for variable would reach the decoder
    c = m["codec"]
    for key, ok in (("k", _is_int), ("vocab_size", _is_int), ("logit_format", lambda v: isinstance(v, str)),
                    ("logit_step", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)),
                    ("variable", lambda v: isinstance(v, bool)), ("token_ce", lambda v: isinstance(v, bool))):
        if not ok(c[key]):
            raise bad(f"codec.{key} is {c[key]!r}")
    shards = m.get("shards")
    if not isinstance(shards, list):
        raise bad(f"shards is {shards!r}")
    seq = tok = 0
    for i, sh in enumerate(shards):
        ok = (isinstance(sh, dict) and isinstance(sh.get("file"), str) and _is_int(sh.get("bytes"))
              and all(isinstance(sh.get(k), list) and len(sh[k]) == 2 and all(map(_is_int, sh[k]))
                      for k in ("sequences", "tokens"))
              and isinstance(sh.get("sha256", ""), str))
        if not ok or sh["file"] != shard_name(i) or sh["sequences"][0] != seq or sh["tokens"][0] != tok:
            raise bad(f"shard entry {i} is {sh!r}")
        seq, tok = sh["sequences"][1], sh["tokens"][1]
    if seq != m["n_sequences"] or tok != m["n_tokens"]:
        raise bad(f"its shards hold {seq} sequences and {tok} tokens, its totals say {m['n_sequences']} and "
                  f"{m['n_tokens']}")
    for sh in shards:
        p = path / sh["file"]
        if not p.is_file():
            raise DataError(f"{what}: {p} is missing; {fix}")
        if p.stat().st_size != sh["bytes"]:
            raise DataError(f"{what}: {p} holds {p.stat().st_size} bytes, the manifest records {sh['bytes']} "
                            f"(truncated or replaced); {fix}")
        if sh.get("sha256") and _sha256(p) != sh["sha256"]:
            raise DataError(f"{what}: {p} does not hold the bytes its manifest records (its SHA-256 differs: "
                            f"the file is damaged); {fix}")


class Store:
    """A complete store, memory-mapped. Use :meth:`open`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.codec = Codec.from_json(manifest["codec"])
        self._starts = np.asarray([s["sequences"][0] for s in manifest["shards"]] + [manifest["n_sequences"]],
                                  np.int64)

    @classmethod
    def open(cls, path: str | Path, expect: Mapping[str, Any] | None = None, what: str = "store") -> "Store":
        """Open the store at ``path``; ``expect``: manifest fields that must match (``fingerprints.corpus``
        style dotted keys or top-level ones). A missing, incomplete or mismatching store is a DataError
        naming the store and the field."""
        path = Path(path)
        f = path / MANIFEST
        if not f.is_file():
            hint = " (incomplete: rerun the teacher pass to finish it)" if (path / PLAN).is_file() else ""
            raise DataError(f"{what}: {path} is not a teacher store (no {MANIFEST}){hint}")
        try:
            manifest = json.loads(f.read_text())
        except ValueError as e:
            raise DataError(f"{what}: {f} is not valid JSON ({e}); delete {path} and rerun the teacher pass "
                            "(or the pipeline) to recompute it") from None
        _check_manifest(manifest, path, what)
        for key, want in (expect or {}).items():
            have = manifest
            for part in key.split("."):
                have = have.get(part) if isinstance(have, dict) else None
            if have != want:
                raise DataError(f"{what}: {path} was made for another {key.replace('fingerprints.', '')} "
                                f"({have!r} in its manifest, this run needs {want!r})")
        return cls(path, manifest)

    @property
    def n_sequences(self) -> int:
        return int(self.manifest["n_sequences"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["n_tokens"])

    @property
    def bytes_per_token(self) -> float:
        return float(self.manifest["bytes_per_token"])

    @cached_property
    def _shards(self) -> list[dict[str, np.ndarray]]:
        from fusion_jax.hf.safetensors_io import read_header
        out = []
        for s in self.manifest["shards"]:
            p = self.path / s["file"]
            infos, _ = read_header(p)
            out.append({name: np.memmap(p, dtype=i.dtype, mode="r", offset=i.start, shape=i.shape)
                        if i.nbytes else np.zeros(i.shape, i.dtype) for name, i in infos.items()})
        return out

    @cached_property
    def seq_ce(self) -> np.ndarray:
        """float32 [n_sequences]: each sequence's mean CE against its gold next tokens."""
        return np.concatenate([np.asarray(s["seq_ce"]) for s in self._shards]) if self._shards else np.zeros(0)

    @cached_property
    def lengths(self) -> np.ndarray:
        """int64 [n_sequences]: real tokens per sequence."""
        return np.concatenate([np.diff(np.asarray(s["offsets"])) for s in self._shards]) if self._shards \
            else np.zeros(0, np.int64)

    def sequence(self, i: int) -> Decoded:
        """The decoded tokens of sequence ``i``."""
        if not 0 <= i < self.n_sequences:
            raise IndexError(f"sequence {i} not in [0, {self.n_sequences})")
        s = int(np.searchsorted(self._starts, i, side="right") - 1)
        sh = self._shards[s]
        j = i - int(self._starts[s])
        off = np.asarray(sh["offsets"])
        return self.codec.decode(sh, slice(int(off[j]), int(off[j + 1])))

    def sequences(self, rows: Sequence[int]) -> list[Decoded]:
        return [self.sequence(int(i)) for i in rows]

    def padded(self, rows: Sequence[int], seq_len: int) -> dict[str, np.ndarray]:
        """Rows laid out as ``[len(rows), seq_len, ...]`` arrays (tokens beyond a sequence: count 0):
        ``ids`` int32 [B,S,k], ``values`` float32 [B,S,k], ``count`` int32 [B,S], ``seq_ce`` float32 [B]."""
        B, k = len(rows), self.codec.k
        ids = np.zeros((B, seq_len, k), np.int32)
        values = np.zeros((B, seq_len, k), np.float32)
        count = np.zeros((B, seq_len), np.int32)
        for b, i in enumerate(rows):
            d = self.sequence(int(i))
            n = min(len(d.count), seq_len)
            ids[b, :n], values[b, :n], count[b, :n] = d.ids[:n], d.values[:n], d.count[:n]
        return {"ids": ids, "values": values, "count": count, "seq_ce": self.seq_ce[np.asarray(rows, np.int64)]
                .astype(np.float32)}
