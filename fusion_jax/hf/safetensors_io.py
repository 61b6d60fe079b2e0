"""Streaming safetensors reader and writer, tensor by tensor, without loading a model into memory.

The format is simple enough to read directly: an 8-byte little-endian header length, a JSON header
``{name: {dtype, shape, data_offsets}}`` (plus ``__metadata__``), then the raw bytes. Reading it
ourselves lets us (a) read one tensor, or one slice of one tensor, with a single ``pread`` into a fresh
buffer (no mmap pages counted against RSS), (b) check every header against the file size so a truncated
file gives a clear error naming file and tensor, and (c) write shards whose layout is planned up front,
so tensors may arrive in any order and memory stays bounded by one tensor.

bf16 and fp8 arrays use ``ml_dtypes`` dtypes, so bytes round-trip exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
import threading
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import ml_dtypes
import numpy as np

from fusion_jax.errors import CheckpointError, CorruptFileError, MissingTensorError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own bound
HOST_ALIGN = 64  # XLA:CPU adopts a 64-byte-aligned host buffer as an array without a copy


def aligned_empty(shape, dtype) -> np.ndarray:
    """Uninitialised C-contiguous array whose data pointer is ``HOST_ALIGN``-aligned (numpy's own
    allocations are only 16-byte aligned, and ``jax.device_put`` on the CPU copies those)."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    n = math.prod(shape) * dtype.itemsize
    raw = np.empty(n + HOST_ALIGN, np.uint8)
    off = (-raw.ctypes.data) % HOST_ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def dtype_from_code(code: str, where: str = "") -> np.dtype:
    try:
        return _DTYPES[code]
    except KeyError:
        raise CheckpointError(f"{where}: unsupported safetensors dtype {code!r}") from None


def code_from_dtype(dtype) -> str:
    dt = np.dtype(dtype)
    try:
        return _CODES[dt]
    except KeyError:
        raise CheckpointError(f"cannot store dtype {dt} in safetensors") from None


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int  # absolute offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def _json_kind(v) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one safetensors file's header. Raises CorruptFileError naming the file.

    Checked as the format's reference implementation does: the header is a UTF-8 JSON object; each
    tensor entry holds a known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets``
    ``[begin, end]`` matching that shape; the tensors tile the data section exactly, from its first
    byte to the file's last (a truncated file, or bytes appended to one, is refused);
    ``__metadata__`` is an object of strings.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CorruptFileError(f"{path}: file is truncated (only {size} bytes, no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER or 8 + n > size:
                raise CorruptFileError(
                    f"{path}: header length {n} does not fit in the file ({size} bytes): "
                    "the file is truncated or not safetensors")
            header_bytes = f.read(n)
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a safetensors file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CorruptFileError(f"{path}: malformed safetensors header ({e}): the file is damaged or not "
                               "safetensors") from None
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        got = _json_kind(metadata) if not isinstance(metadata, dict) else "an object with non-string values"
        raise CorruptFileError(f"{path}: malformed safetensors header: '__metadata__' must be an object of "
                               f"strings, got {got}")
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise CorruptFileError(f"{where}: malformed header entry (expected an object, got "
                                   f"{_json_kind(entry)})")
        code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(code, str):
            raise CorruptFileError(f"{where}: malformed header entry: 'dtype' must be a string, got "
                                   f"{_json_kind(code)}")
        dtype = dtype_from_code(code, where)
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise CorruptFileError(f"{where}: malformed header entry: 'shape' must be a list of "
                                   f"non-negative integers, got {shape!r:.80}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets)
                or offsets[0] > offsets[1]):
            raise CorruptFileError(f"{where}: malformed header entry: 'data_offsets' must be [begin, end] "
                                   f"with 0 <= begin <= end, got {offsets!r:.80}")
        shape = tuple(shape)
        begin, end = offsets
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected:
            raise CorruptFileError(
                f"{where} has {end - begin} bytes but shape {shape} of {code} needs {expected}")
        if base + end > size:
            raise CorruptFileError(
                f"{where} ends at byte {base + end} but the file has {size} bytes: the file is truncated")
        infos[name] = TensorInfo(name, path, dtype, shape, base + begin, base + end)
    # the tensors must tile the data section: no overlap (two tensors sharing bytes), no hole, nothing after
    pos = base
    for info in sorted(infos.values(), key=lambda t: (t.start, t.end)):
        if info.start != pos:
            what = ("overlaps the tensor before it" if info.start < pos
                    else f"leaves a gap of {info.start - pos} bytes before it")
            raise CorruptFileError(f"{path}: tensor {info.name!r} {what}: the header is damaged")
        pos = info.end
    if pos != size:
        raise CorruptFileError(f"{path}: {size - pos} bytes after the last tensor: the file is damaged "
                               "(or two files were joined)")
    return infos, dict(metadata)


def _pread_into(fd: int, buf: memoryview, offset: int, where: str) -> None:
    got = 0
    while got < len(buf):
        n = os.preadv(fd, [buf[got:]], offset + got)
        if n <= 0:
            raise CorruptFileError(f"{where}: unexpected end of file")
        got += n


class SafetensorsReader:
    """Lazy reader over a checkpoint directory (sharded with an index, or one file) or a single file.

    Tensors are read on demand with ``get(name)``, ``read_rows`` (one device's rows) or ``read_flat``;
    only the bytes needed are read. File descriptors are cached; use as a context manager or ``close()``.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fds: dict[Path, int] = {}
        self._fd_lock = threading.Lock()
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = {}
        if self.path.is_file():
            files = [self.path]
        elif (self.path / INDEX_NAME).is_file():
            index = self.path / INDEX_NAME
            files = self._files_from_index(index)
        elif (self.path / SINGLE_NAME).is_file():
            # without an index transformers reads model.safetensors only (a directory may also hold
            # consolidated.safetensors in Mistral's naming, or adapter_model.safetensors)
            files = [self.path / SINGLE_NAME]
        elif self.path.is_dir():
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{self.path}: no *.safetensors files found")
        else:
            raise CheckpointError(f"{self.path}: no such file or directory")
        for f in files:
            infos, meta = read_header(f)
            for name, info in infos.items():
                if name in self.tensors:
                    raise CorruptFileError(
                        f"tensor {name!r} appears in both {self.tensors[name].file} and {f}")
                self.tensors[name] = info
            self.metadata.update(meta)
        if getattr(self, "_index_map", None) is not None:
            self._check_index(index)

    def _files_from_index(self, index_path: Path) -> list[Path]:
        from fusion_jax.hf.files import read_json
        index = read_json(index_path, CorruptFileError)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise CorruptFileError(f"{index_path}: malformed index: 'weight_map' must be an object "
                                   f"{{tensor: file}}, got {_json_kind(weight_map)}")
        meta = index.get("metadata")
        if meta is not None and not isinstance(meta, dict):
            raise CorruptFileError(f"{index_path}: malformed index: 'metadata' must be an object, got "
                                   f"{_json_kind(meta)}")
        total = (meta or {}).get("total_size")
        if total is not None and not (isinstance(total, (int, float)) and not isinstance(total, bool)
                                      and total >= 0):
            raise CorruptFileError(f"{index_path}: malformed index: 'metadata.total_size' must be a "
                                   f"number of bytes, got {_json_kind(total)}")
        for name, fname in weight_map.items():
            if not isinstance(fname, str) or not fname:
                raise CorruptFileError(f"{index_path}: malformed index: 'weight_map' entry {name!r} must name "
                                       f"a file, got {_json_kind(fname)}")
            if os.path.isabs(fname) or ".." in Path(fname).parts:
                raise CorruptFileError(f"{index_path}: 'weight_map' entry {name!r} names {fname!r}, outside "
                                       "the checkpoint directory")
        if not weight_map:
            raise CorruptFileError(f"{index_path}: malformed index: 'weight_map' is empty")
        files = []
        for fname in dict.fromkeys(weight_map.values()):
            f = index_path.parent / fname
            if not f.is_file():
                needed = [k for k, v in weight_map.items() if v == fname]
                raise CheckpointError(
                    f"{index_path}: shard {f} listed in the index does not exist (it holds "
                    f"{len(needed)} tensor(s), e.g. {needed[0]!r})")
            files.append(f)
        self._index_map = weight_map
        return files

    def _check_index(self, index_path: Path) -> None:
        """Every tensor the index lists is in the shard it names (else the index and shards disagree)."""
        for name, fname in self._index_map.items():
            info = self.tensors.get(name)
            if info is None or info.file != index_path.parent / fname:
                found = f"it is in {info.file.name}" if info is not None else "no shard holds it"
                raise CorruptFileError(f"{index_path}: lists tensor {name!r} in {fname}, but {found}: the "
                                       "index does not match the shards")

    # -- queries -------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingTensorError(f"{self.path}: tensor {name!r} not found") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self.info(name).dtype

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # -- reads ---------------------------------------------------------------------------------
    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            with self._fd_lock:  # worker threads share a reader: open each file once
                fd = self._fds.get(file)
                if fd is None:
                    fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def get(self, name: str) -> np.ndarray:
        """Read one whole tensor into a new (64-byte aligned) array, dtype as stored."""
        info = self.info(name)
        out = aligned_empty(info.shape, info.dtype)
        if info.nbytes:
            _pread_into(self._fd(info.file), memoryview(out.reshape(-1).view(np.uint8)), info.start,
                        f"{info.file}: tensor {name!r}")
        return out

    def read_rows(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """``tensor[start:stop]`` (leading axis) with one ``pread``, into ``out`` when given (a
        C-contiguous array of that shape and the stored dtype, e.g. a slot of a preallocated param)."""
        info = self.info(name)
        rows = max(stop - start, 0)
        shape = (rows,) + info.shape[1:]
        if out is None:
            out = aligned_empty(shape, info.dtype)
        elif out.shape != shape or out.dtype != info.dtype or not out.flags.c_contiguous:
            raise ValueError(f"read_rows({name!r}): out must be C-contiguous {shape} {info.dtype}, "
                             f"got {out.shape} {out.dtype}")
        if out.nbytes:
            row_bytes = info.nbytes // max(info.shape[0], 1) if info.shape else info.nbytes
            _pread_into(self._fd(info.file), memoryview(out.reshape(-1).view(np.uint8)),
                        info.start + start * row_bytes, f"{info.file}: tensor {name!r}")
        return out

    def read_flat(self, name: str, start: int, stop: int) -> np.ndarray:
        """Elements ``start:stop`` of the tensor's flat (C-order) view, with one ``pread`` into a new
        aligned 1-D array: a chunk of a tensor too large to hold whole."""
        info = self.info(name)
        numel = math.prod(info.shape)
        if not 0 <= start <= stop <= numel:
            raise ValueError(f"{info.file}: read_flat({name!r}): [{start}, {stop}) is outside its {numel} "
                             "elements")
        out = aligned_empty((stop - start,), info.dtype)
        if out.nbytes:
            _pread_into(self._fd(info.file), memoryview(out.view(np.uint8)),
                        info.start + start * info.dtype.itemsize, f"{info.file}: tensor {name!r}")
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# -- writing -------------------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(size: int | str) -> int:
    """'5GB' -> 5_000_000_000 (transformers' convention: GB is 10**9, GiB is 2**30)."""
    if isinstance(size, int):
        return size
    m = _SIZE_RE.match(str(size))
    if not m:
        raise ValueError(f"cannot parse size {size!r} (expected e.g. 500MB, 5GB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_size: int | str) -> list[list[TensorSpec]]:
    """Group tensors, in order, into shards of at most ``max_shard_size`` bytes (a larger tensor
    gets a shard of its own), as transformers' ``save_pretrained`` does."""
    limit = parse_size(max_shard_size)
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return [s for s in shards if s] or [[]]


def _header_bytes(specs: Sequence[TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict]:
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offsets = {}
    pos = 0
    for s in specs:
        header[s.name] = {"dtype": code_from_dtype(s.dtype), "shape": list(s.shape),
                          "data_offsets": [pos, pos + s.nbytes]}
        offsets[s.name] = pos
        pos += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
    return raw, offsets


class ShardedWriter:
    """Write a planned set of tensors into safetensors shards, in any order, one tensor at a time.

    The plan (names, shapes, dtypes) is known up front, so each shard's header is written first and each
    tensor's bytes go straight to their final offset: memory stays bounded by the tensor being written.
    ``close()`` checks every planned tensor was written and writes ``model.safetensors.index.json`` when
    there is more than one shard. Write into a temporary directory (see ``utils.atomic``).
    """

    def __init__(self, out_dir: str | os.PathLike, specs: Iterable[TensorSpec],
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None,
                 prefix: str = "model"):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        specs = [TensorSpec(s.name, tuple(int(d) for d in s.shape), np.dtype(s.dtype)) for s in specs]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise CheckpointError("duplicate tensor names in the write plan")
        metadata = {"format": "pt", **(metadata or {})}
        shards = plan_shards(specs, max_shard_size)
        n = len(shards)
        self._where: dict[str, tuple[int, int, TensorSpec]] = {}  # name -> (fd, offset, spec)
        self._fds: list[int] = []
        self.files: list[Path] = []
        self.weight_map: dict[str, str] = {}
        for i, shard in enumerate(shards):
            fname = f"{prefix}.safetensors" if n == 1 else f"{prefix}-{i + 1:05d}-of-{n:05d}.safetensors"
            path = self.out_dir / fname
            header, offsets = _header_bytes(shard, metadata)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            self.files.append(path)
            base = 8 + len(header)
            os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
            os.ftruncate(fd, base + sum(s.nbytes for s in shard))
            for s in shard:
                self._where[s.name] = (fd, base + offsets[s.name], s)
                self.weight_map[s.name] = fname
        self.total_size = sum(s.nbytes for s in specs)
        self._pending = set(self._where)

    def write(self, name: str, array) -> None:
        try:
            fd, offset, spec = self._where[name]
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the write plan") from None
        arr = np.asarray(array)
        if arr.shape != spec.shape or arr.dtype != spec.dtype:
            raise CheckpointError(
                f"tensor {name!r}: planned {spec.shape} {spec.dtype}, got {arr.shape} {arr.dtype}")
        buf = memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
        done = 0
        while done < len(buf):
            done += os.pwrite(fd, buf[done:], offset + done)
        self._pending.discard(name)

    def close(self) -> None:
        if self._pending:
            missing = sorted(self._pending)[:5]
            raise CheckpointError(f"{self.out_dir}: {len(self._pending)} planned tensors were never "
                                  f"written, e.g. {missing}")
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size},
                     "weight_map": dict(sorted(self.weight_map.items()))}
            (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def save_tensors(out_dir: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                 max_shard_size: int | str = "5GB", metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write a whole in-memory ``{name: array}`` map as shards (convenience for small models)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    specs = [TensorSpec(k, a.shape, a.dtype) for k, a in arrays.items()]
    with ShardedWriter(out_dir, specs, max_shard_size, metadata) as w:
        for k, a in arrays.items():
            w.write(k, a)
    return w.files
