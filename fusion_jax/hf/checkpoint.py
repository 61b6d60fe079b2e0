"""Load and save HF (transformers) checkpoints of the Llama family, tensor by tensor.

``load(dir)`` -> ``(ModelConfig, params)`` where ``params`` is a NESTED DICT of ``jax.Array`` with the
same structure as ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (the tree is described in
``fusion_jax.models``' docstring; ``fusion_jax.hf.mapping`` maps each path to its HF tensor); put it
into a model with ``load_model`` or ``nnx.replace_by_pure_dict(state, params); nnx.update(model, state)``.

Reading never holds the model twice: for each param, every distinct shard this process's devices hold gets
one aligned host buffer, filled from disk by ``pread`` (per-layer HF tensors land in their slot of the
stacked ``[L, ...]`` param; transposes and casts go through a few-MB scratch chunk), reading each needed
byte once however many devices share it. On CPU, XLA adopts the buffer without a copy; on an accelerator
it is transferred and freed. Peak host memory on one device is therefore the params plus a few MB.
``save`` streams the other way through ``ShardedWriter`` into a temporary directory renamed into place.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np

from fusion_jax.errors import (CheckpointError, ConfigError, MissingTensorError, ShapeMismatchError)
from fusion_jax.hf import mapping
from fusion_jax.hf.files import CONFIG_NAME, check_passthrough_files, copy_passthrough_files, read_json
from fusion_jax.hf.safetensors_io import (INDEX_NAME, SafetensorsReader, ShardedWriter, TensorSpec,
                                          aligned_empty)
from fusion_jax.models.config import ModelConfig, canonical_dtype
from fusion_jax.utils.atomic import atomic_directory

_BIN_INDEX = "pytorch_model.bin.index.json"


# -- config ----------------------------------------------------------------------------------------
def read_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """``ModelConfig`` from ``path/config.json`` (or a config.json path)."""
    p = Path(path)
    f = p if p.is_file() else p / CONFIG_NAME
    if not f.is_file():
        raise CheckpointError(f"{f}: not found (an HF checkpoint directory needs a config.json)")
    hf = read_json(f, ConfigError)
    return ModelConfig.from_hf(hf, source=str(f), **overrides)


# -- readers ---------------------------------------------------------------------------------------
class _TorchBinReader:
    """Same read interface as SafetensorsReader over legacy ``pytorch_model*.bin`` files.

    Uses ``torch.load(weights_only=True, mmap=True)``; torch is imported only here.
    """

    def __init__(self, path: Path):
        import torch  # noqa: lazy, optional
        self.path = path
        idx = path / _BIN_INDEX
        if idx.is_file():
            try:
                files = sorted(set(json.loads(idx.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError) as e:
                raise CheckpointError(f"{idx}: malformed index ({e})") from e
        else:
            files = [f.name for f in sorted(path.glob("pytorch_model*.bin"))]
        self._tensors: dict[str, Any] = {}
        self._file: dict[str, Path] = {}
        for fname in files:
            f = path / fname
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many kinds for corrupt / unsafe pickles
                raise CheckpointError(f"{f}: cannot load with torch.load(weights_only=True): {e}") from e
            for k, v in sd.items():
                self._tensors[k] = v
                self._file[k] = f

    def names(self):
        return list(self._tensors)

    def __contains__(self, name):
        return name in self._tensors

    def file_of(self, name) -> Path:
        return self._file[name]

    def shape(self, name):
        return tuple(self._tensors[name].shape)

    def dtype(self, name):
        return _torch_to_np(self._tensors[name][:0]).dtype

    def get(self, name):
        return _torch_to_np(self._tensors[name])

    def read_rows(self, name, start, stop, out=None):
        t = _torch_to_np(self._tensors[name][start:stop])
        if out is None:
            return t
        out[...] = t
        return out

    def add_view(self, name: str, source: str, index: tuple) -> None:
        """Make ``name`` read ``source[index]`` (see ``mapping.View``)."""
        self._tensors[name] = self._tensors[source][index]
        self._file[name] = self._file[source]

    def close(self):
        self._tensors.clear()


def _torch_to_np(t) -> np.ndarray:
    import ml_dtypes
    import torch
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.numpy().copy()


def _open_reader(path: Path):
    if path.is_file() or (path / INDEX_NAME).is_file() or any(path.glob("*.safetensors")):
        r = SafetensorsReader(path)
        r.file_of = lambda name, _r=r: _r.tensors[name].file
        r.add_view = lambda name, source, index, _r=r: _add_safetensors_view(_r, name, source, index)
        return r
    if (path / _BIN_INDEX).is_file() or any(path.glob("pytorch_model*.bin")):
        return _TorchBinReader(path)
    raise CheckpointError(f"{path}: no model.safetensors / *.safetensors or pytorch_model*.bin weights found")


def _add_safetensors_view(reader: SafetensorsReader, name: str, source: str, index: tuple) -> None:
    """Register ``name`` as the contiguous byte range ``source[index]`` (ints on leading axes, then at most
    one slice): reads of ``name`` then cost exactly its own bytes."""
    info = reader.info(source)
    strides = [int(np.prod(info.shape[k + 1:], dtype=np.int64)) * info.dtype.itemsize
               for k in range(len(info.shape))]
    offset, shape = 0, list(info.shape)
    for k, ix in enumerate(index):
        if isinstance(ix, slice):
            a, b, _ = ix.indices(info.shape[k])
            offset += a * strides[k]
            shape = [b - a] + list(info.shape[k + 1:])
            break
        offset += int(ix) * strides[k]
        shape = list(info.shape[k + 1:])
    nbytes = int(np.prod(shape, dtype=np.int64)) * info.dtype.itemsize
    reader.tensors[name] = dataclasses.replace(info, name=name, shape=tuple(shape), start=info.start + offset,
                                               end=info.start + offset + nbytes)


def _install_views(reader, config: ModelConfig) -> None:
    """Let the reader serve every tensor the checkpoint stores in another spelling (``mapping.VIEWS``,
    e.g. transformers 5's fused experts) under the name our table uses; remember the sources consumed."""
    views = mapping.view_slices(config, lambda n: n in reader)
    for name, (source, index) in views.items():
        reader.add_view(name, source, index)
    reader.view_sources = {source for source, _ in views.values()}


def _where(reader, path: Path) -> str:
    """Human description of where a tensor was expected."""
    idx = path / INDEX_NAME
    if idx.is_file():
        return f"{idx} and its shards"
    files = sorted({str(reader.file_of(n)) for n in reader.names()}) if reader.names() else []
    return ", ".join(files) or str(path)


def validate(reader, config: ModelConfig, path: Path, *, allow_extra: bool = False) -> None:
    """Check every tensor the config needs is present with the right shape, and nothing unexpected."""
    expected: set[str] = set()
    index_map = getattr(reader, "_index_map", None) or {}
    for name, row, _ in mapping.hf_tensors(config):
        expected.add(name)
        if name not in reader:
            where = f"{path / index_map[name]}" if name in index_map else _where(reader, path)
            raise MissingTensorError(
                f"tensor {name!r} is missing from {where} (needed by {config.architecture} as "
                f"described by {path / CONFIG_NAME})")
        want, got = row.hf_shape(config), tuple(reader.shape(name))
        if want != got:
            raise ShapeMismatchError(
                f"tensor {name!r} in {reader.file_of(name)} has shape {list(got)}, but "
                f"{path / CONFIG_NAME} implies {list(want)}")
    if allow_extra:
        return
    ignored = [re.compile(p) for p in mapping.IGNORED_PATTERNS]
    if config.tie_word_embeddings:
        ignored.append(re.compile(r"lm_head\.weight"))
    consumed = getattr(reader, "view_sources", set())
    extra = [n for n in reader.names()
             if n not in expected and n not in consumed and not any(p.fullmatch(n) for p in ignored)]
    if extra:
        raise CheckpointError(
            f"{len(extra)} unexpected tensor(s) in {reader.file_of(extra[0])}"
            f"{' and others' if len({str(reader.file_of(n)) for n in extra}) > 1 else ''}, e.g. "
            f"{extra[:5]}: {path / CONFIG_NAME} describes a {config.architecture} without them "
            f"(wrong config.json, or a different architecture?)")


def open_checkpoint(path: str | os.PathLike):
    """``(ModelConfig, reader)`` of an HF checkpoint directory, validated (every tensor present with its
    shape); ``reader.get(hf_name)`` reads one tensor (in HF layout, dtype as stored). Close the reader."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    config = read_config(path)
    reader = _open_reader(path)
    try:
        _install_views(reader, config)
        validate(reader, config, path)
    except BaseException:
        reader.close()
        raise
    return config, reader


# -- load ------------------------------------------------------------------------------------------
def _resolve_dtype(reader, config: ModelConfig, param_dtype) -> np.dtype:
    if param_dtype is not None:
        return np.dtype(jax.numpy.dtype(canonical_dtype(param_dtype, "param_dtype")))
    first = next(iter(mapping.hf_tensors(config)))[0]
    return np.dtype(reader.dtype(first))


def load(path: str | os.PathLike, *, param_dtype=None, dtype=None, shardings=None, mesh=None,
         allow_extra: bool = False, **config_overrides) -> tuple[ModelConfig, dict]:
    """Read an HF checkpoint directory into ``(ModelConfig, params)``.

    ``param_dtype``: dtype of the loaded params (default: as stored, so bf16 stays bf16).
    ``dtype``: compute dtype written into the config (default: ``param_dtype``).
    ``shardings``: ``None`` (first device), one ``jax.sharding.Sharding`` for all params, or a nested dict
    of Shardings shaped like params; each device receives only its own slice, and this process reads only
    the HF rows (and layers) its devices' slices need, each once. (A slice along HF's column axis, our
    kernels' input dim, still costs whole rows: rows are the unit of a contiguous read.)
    ``mesh``: instead of ``shardings``, place every param on this mesh by its logical axes (the shardings
    the rest of a run uses on it: params on one device cannot be mixed with mesh-sharded batches).
    ``config_overrides``: ModelConfig fields (e.g. ``scan_layers=False, remat="full"``).
    Raises MissingTensorError / ShapeMismatchError / UnknownArchitectureError / CorruptFileError /
    CheckpointError naming the file and tensor at fault.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    config = read_config(path)
    reader = _open_reader(path)
    try:
        _install_views(reader, config)
        validate(reader, config, path, allow_extra=allow_extra)
        pdt = _resolve_dtype(reader, config, param_dtype)
        pname = canonical_dtype(pdt)
        config = config.replace(param_dtype=pname, dtype=canonical_dtype(dtype, "dtype") if dtype else pname,
                                **config_overrides)
        if mesh is not None and shardings is None:
            from fusion_jax.models import param_shardings
            shardings = param_shardings(config, mesh)
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])

        def one(row: mapping.Row) -> jax.Array:
            return _load_param(reader, row, config, pdt, mapping.sharding_for(shardings, row.path, default))

        # Params are independent and preads / numpy copies release the GIL: a few threads overlap disk
        # reads with transposes. Memory does not grow with it (each thread fills final param buffers,
        # plus one few-MB scratch).
        rows = mapping.table(config)
        with concurrent.futures.ThreadPoolExecutor(_LOAD_THREADS) as pool:
            arrays = list(pool.map(one, rows))
        params: dict = {}
        for row, arr in zip(rows, arrays):
            mapping.set_path(params, row.path, arr)
        return config, params
    finally:
        reader.close()


_LOAD_THREADS = min(4, os.cpu_count() or 1)
_CHUNK_BYTES = 4 << 20      # HF rows read per pread when a tensor must be transposed, cast or column-sliced


def _norm_index(index: tuple, shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """A shard index (tuple of slices, possibly short) as ((start, stop), ...) per axis."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(tuple(index)))
    out = []
    for s, n in zip(index, shape):
        a, b, step = s.indices(n)
        if step != 1:
            raise ValueError(f"strided shard index {s} is not supported")
        out.append((a, b))
    return tuple(out)


def _read_tensor_into(reader, name: str, targets: list[tuple[np.ndarray, tuple]], transpose: bool,
                      dt: np.dtype) -> None:
    """Fill every ``(dest, box)`` in ``targets`` with HF tensor ``name`` in OUR layout (``.T`` when
    ``transpose``) restricted to ``box`` (``((start, stop), ...)`` per axis of our layout).

    Each needed HF row is read from disk ONCE, whatever the number of targets: rows are read in chunks
    of ~``_CHUNK_BYTES`` into one scratch buffer, cast once, and the part of the chunk that each target's
    box covers is copied (transposed when needed) into it. A single untransposed, same-dtype target that
    wants whole rows is read straight into place with one ``pread``.
    """
    shape = tuple(reader.shape(name))
    src_dt = np.dtype(reader.dtype(name))
    if not shape:
        t = reader.get(name).astype(dt)
        for dest, _ in targets:
            dest[...] = t
        return
    # per target: (HF row range, HF column slices) -- our box is (cols, rows) of HF when transposed
    spans = []
    for dest, box in targets:
        rows, cols = (box[1], (box[0],)) if transpose else (box[0], box[1:])
        spans.append((dest, rows, tuple(slice(a, b) for a, b in cols)))
    if len(targets) == 1 and not transpose and src_dt == dt:
        dest, (r0, r1), cols = spans[0]
        if dest.flags.c_contiguous and all(c.indices(n) == (0, n, 1) for c, n in zip(cols, shape[1:])):
            reader.read_rows(name, r0, r1, out=dest)
            return
    lo, hi = min(r[0] for _, r, _ in spans), max(r[1] for _, r, _ in spans)
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * src_dt.itemsize
    chunk = max(1, min(hi - lo, _CHUNK_BYTES // max(row_bytes, 1)))
    scratch = np.empty((chunk,) + shape[1:], src_dt)
    for c0 in range(lo, hi, chunk):
        c1 = min(c0 + chunk, hi)
        wanted = [(d, r, c) for d, r, c in spans if r[0] < c1 and c0 < r[1]]
        if not wanted:
            continue  # rows no target on this process needs
        t = reader.read_rows(name, c0, c1, out=scratch[:c1 - c0])
        if t.dtype != dt:
            t = t.astype(dt)
        for dest, (r0, r1), cols in wanted:
            a, b = max(c0, r0), min(c1, r1)
            part = t[a - c0:b - c0]
            if transpose:
                mapping.transpose_into(dest[:, a - r0:b - r0], part[:, cols[0]])
            else:
                dest[a - r0:b - r0] = part[(slice(None),) + cols]


def _load_param(reader, row: mapping.Row, config: ModelConfig, dt: np.dtype,
                sharding: jax.sharding.Sharding) -> jax.Array:
    """One (stacked) param placed with ``sharding``: each distinct shard this process holds is built once
    in an aligned host buffer (adopted by XLA:CPU without a copy; copied to an accelerator and freed),
    reading each needed byte of the file once; devices holding the same shard get copies of it."""
    shape = row.our_shape(config)
    dev_boxes = {d: _norm_index(idx, shape)
                 for d, idx in sharding.addressable_devices_indices_map(shape).items()}
    boxes = list(dict.fromkeys(dev_boxes.values()))
    bufs = {box: aligned_empty(tuple(b - a for a, b in box), dt) for box in boxes}
    ns = len(row.stack_shape(config))  # leading dims indexing HF tensors: layer (and expert)
    for idx in np.ndindex(*shape[:ns]):
        targets = [(bufs[box][tuple(i - r[0] for i, r in zip(idx, box))], box[ns:]) for box in boxes
                   if all(r[0] <= i < r[1] for i, r in zip(idx, box))]
        if targets:
            _read_tensor_into(reader, row.hf_name(*idx), targets, row.transpose, dt)
    arrays, used = [], set()
    for device, box in dev_boxes.items():
        buf = bufs[box]
        if box in used and device.platform == "cpu":
            # XLA:CPU would adopt the same host buffer for both devices: never alias two device arrays
            # (donating one would clobber the other). Accelerators copy on transfer anyway.
            buf = aligned_empty(buf.shape, dt)
            np.copyto(buf, bufs[box])
        used.add(box)
        arrays.append(jax.device_put(buf, device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_model(path: str | os.PathLike, *, rngs=None, **kw):
    """``CausalLM`` with the checkpoint's weights (same keywords as ``load``)."""
    from flax import nnx

    from fusion_jax.models import CausalLM
    config, params = load(path, **kw)
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model


# -- save ------------------------------------------------------------------------------------------
def _as_pure(params) -> Mapping:
    from flax import nnx
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return params


def save(params, config: ModelConfig, out_dir: str | os.PathLike, *, max_shard_size: int | str = "5GB",
         source_dir: str | os.PathLike | None = None, dtype=None, overwrite: bool = False,
         inputs=()) -> Path:
    """Write an HF checkpoint (safetensors shards + index, config.json, and from ``source_dir`` the
    generation config and tokenizer files) that ``transformers.AutoModelForCausalLM`` loads.

    ``params``: nested dict (as ``load`` returns), an ``nnx.State`` of Params, or a ``CausalLM``.
    ``dtype``: cast every tensor (e.g. "bf16"); default keeps each param's dtype.
    Output goes to a temporary directory renamed to ``out_dir`` when complete; with ``overwrite`` it is
    never an output that holds ``source_dir`` or one of ``inputs`` (replacing it would delete them).
    """
    params = _as_pure(params)
    out_dt = np.dtype(jax.numpy.dtype(canonical_dtype(dtype, "dtype"))) if dtype is not None else None
    specs = []
    for name, row, _ in mapping.hf_tensors(config):
        try:
            leaf = mapping.get_path(params, row.path)
        except (KeyError, TypeError):
            raise MissingTensorError(f"params have no {'/'.join(row.path)} (needed for {name!r})") from None
        if tuple(leaf.shape) != row.our_shape(config):
            raise ShapeMismatchError(f"param {'/'.join(row.path)} has shape {list(leaf.shape)}, config "
                                     f"implies {list(row.our_shape(config))}")
        specs.append(TensorSpec(name, row.hf_shape(config), out_dt or np.dtype(leaf.dtype)))
    stored = canonical_dtype(out_dt if out_dt is not None else specs[0].dtype)
    convert = (lambda t: t.astype(out_dt)) if out_dt is not None else None
    return write_checkpoint(out_dir, config, specs, mapping.params_to_hf(params, config, convert),
                            stored_dtype=stored, max_shard_size=max_shard_size, source_dir=source_dir,
                            overwrite=overwrite, inputs=inputs)


def write_checkpoint(out_dir: str | os.PathLike, config: ModelConfig, specs: list[TensorSpec], tensors,
                     *, stored_dtype: str, max_shard_size: int | str = "5GB",
                     source_dir: str | os.PathLike | None = None, overwrite: bool = False, inputs=()) -> Path:
    """Write an HF checkpoint from ``tensors`` (an iterable of ``(hf_name, numpy array)`` in any order,
    exactly the ``specs``): shards + index, config.json (``config.to_hf(stored_dtype)``), and from
    ``source_dir`` the generation config and tokenizer files, into a temporary directory renamed to
    ``out_dir`` when complete (never replacing an output that holds ``source_dir`` or one of ``inputs``).
    Memory: one tensor at a time."""
    src = Path(source_dir) if source_dir is not None else None
    if src is not None and not src.is_dir():
        raise CheckpointError(f"--source-dir {src}: no such directory")
    if src is not None:
        check_passthrough_files(src)  # before any tensor is written
    with atomic_directory(out_dir, overwrite=overwrite, inputs=[src, *inputs]) as tmp:
        with ShardedWriter(tmp, specs, max_shard_size) as w:
            for name, t in tensors:
                w.write(name, t)
        hf_cfg = config.to_hf(dtype=stored_dtype)
        (tmp / CONFIG_NAME).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True) + "\n")
        if src is not None:
            copy_passthrough_files(src, tmp)
    return Path(out_dir)
