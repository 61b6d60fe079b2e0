"""Streaming merge executor: plan every output tensor up front, then read, merge and write tensor by
tensor (chunk by chunk for large tensors) with a few worker threads, so reads, math and writes overlap
and peak memory is bounded by a few tensors, never by the model.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np

from fusion_jax.errors import (CheckpointError, ConfigError, FusionError, MissingTensorError,
                               ShapeMismatchError)
from fusion_jax.hf.files import TOKENIZER_FILES
from fusion_jax.hf.safetensors_io import SafetensorsReader, ShardedWriter, TensorSpec, parse_size
from fusion_jax.merging import kernels, rng
from fusion_jax.merging.config import MergeConfig, Source, load_config, read_documents, resolve_parameter
from fusion_jax.merging.methods import check_group, merge_group, rescale_mode
from fusion_jax.merging.precision import COMPUTE_DTYPES, NP_DTYPES, dtype_name, guard_ones, promote
from fusion_jax.merging.vocab import VocabPlan, resolve_chat_template
from fusion_jax.merging.vocab import build as build_vocab
from fusion_jax.merging.vocab import permute as permute_vocab
from fusion_jax.utils.atomic import atomic_directory
from fusion_jax.utils.malloc import retain_freed_memory

_LAYER_RE = re.compile(r"(^|\.)layers\.(\d+)\.")
_VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight")


@dataclasses.dataclass
class Model:
    name: str
    path: Path
    config: dict
    reader: SafetensorsReader

    @property
    def num_layers(self) -> int:
        """``num_hidden_layers`` from config.json (as mergekit reads it; it does not count tensors).
        Missing or not a count is an error when the checkpoint has layer tensors, and so is a count
        that leaves some of them out (the merge would silently drop layers)."""
        v = self.config.get("num_hidden_layers")
        top = max((int(m.group(2)) for n in self.reader.names() if (m := _LAYER_RE.search(n))), default=-1)
        where = f"model {self.name!r}: {self.path / 'config.json'}"
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            if top < 0 and v is None:
                return 0
            raise CheckpointError(f"{where} has no valid 'num_hidden_layers' (got {v!r}), but its tensors "
                                  f"have {top + 1} layers; set it to the number of decoder layers")
        if top >= v:
            raise CheckpointError(f"{where} says num_hidden_layers = {v}, but its tensors go up to layer {top}")
        return v

    def tensor_name(self, name: str) -> str | None:
        """The stored name for ``name``, following tied embeddings as mergekit's ``tied_names`` do."""
        if name in self.reader:
            return name
        if name.endswith("lm_head.weight"):
            alt = name[: -len("lm_head.weight")] + "model.embed_tokens.weight"
            if alt in self.reader:
                return alt
        return None


@dataclasses.dataclass
class Job:
    """One output tensor: which inputs, which parameters."""

    name: str
    shape: tuple[int, ...]
    out_dtype: np.dtype
    inputs: list[tuple[int, str]]  # (model index, stored tensor name)
    base_pos: int | None
    shared: dict
    per_input: list[dict]
    streams: list[int]
    vocab: bool = False
    dtype: str = "float32"  # the dtype every step rounds to (see .precision)
    copy: bool = False  # a non-float tensor: copied from the first input (all inputs must agree)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _is_vocab(name: str) -> bool:
    return name.endswith(_VOCAB_TENSORS)


def _open_model(name: str, path: Path) -> Model:
    if not path.is_dir():
        raise CheckpointError(f"model {name!r}: {path} is not a directory")
    cfg_path = path / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except OSError:
        raise CheckpointError(f"model {name!r}: {cfg_path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"model {name!r}: {cfg_path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"model {name!r}: {cfg_path} must hold a JSON object, not {type(config).__name__}")
    from fusion_jax.models.config import check_hf_fields
    check_hf_fields(config, f"model {name!r}: {cfg_path}")
    return Model(name, path, config, SafetensorsReader(path))


@dataclasses.dataclass
class Plan:
    config: MergeConfig
    models: list[Model]
    jobs: list[Job]
    donor: Model
    out_config: dict
    vocab: VocabPlan | None = None  # the output vocabulary (tokenizer_source / tokenizer block)
    chat_template: str | None = None  # resolved Jinja text (chat_template key)

    def base_index(self, job: Job) -> int | None:
        """The model index of ``job``'s base model (the slice's or the config's), if any."""
        if job.base_pos is not None:
            return job.inputs[job.base_pos][0]
        names = [m.name for m in self.models]
        return names.index(self.config.base_model) if self.config.base_model in names else None

    @property
    def total_in_bytes(self) -> int:
        return sum(self.models[m].reader.info(n).nbytes for j in self.jobs for m, n in j.inputs)

    @property
    def total_out_bytes(self) -> int:
        return sum(j.numel * j.out_dtype.itemsize for j in self.jobs)


def plan_merge(cfg: MergeConfig, seed: int = 0, compute_dtype: str | None = None) -> Plan:
    """Every output tensor as a :class:`Job`, all parameters resolved and validated: nothing is read
    or written yet, so every configuration error surfaces before any work.

    ``compute_dtype`` ("auto", "float32"; default: the config's ``compute_dtype``, else "auto"):
    "auto" does each step in the merge dtype as mergekit does (``dtype:``, else the inputs' promoted
    dtype); "float32" does every step in float32 and rounds once to the output dtype."""
    spec = cfg.spec
    compute = compute_dtype or cfg.compute_dtype or "auto"
    if compute not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute!r}")
    names = cfg.referenced_models()
    models = [_open_model(n, cfg.resolve_path(n)) for n in names]
    idx = {n: i for i, n in enumerate(names)}
    archs = {m.name: tuple(m.config.get("architectures") or ()) for m in models}
    if len(set(archs.values())) > 1:
        desc = "; ".join(f"{n}: {'/'.join(a) or '?'}" for n, a in archs.items())
        raise ConfigError(f"models of different architectures cannot be merged ({desc})")
    donor = models[idx[cfg.base_model]] if cfg.base_model else models[0]

    # normalise to output slices, as mergekit does
    if cfg.models is not None:
        srcs = [Source(s.model, (0, models[idx[s.model]].num_layers), s.parameters) for s in cfg.models]
        if cfg.base_model and cfg.base_model not in [s.model for s in cfg.models]:
            srcs.append(Source(cfg.base_model, (0, models[idx[cfg.base_model]].num_layers), None))
        lens = {s.layer_range[1] for s in srcs}
        if len(lens) > 1:
            raise ShapeMismatchError("all models must have the same number of layers: " + ", ".join(
                f"{s.model}: {s.layer_range[1]}" for s in srcs))
        from fusion_jax.merging.config import OutSlice
        slices = [OutSlice(srcs, None, None)]
    else:
        slices = cfg.slices
    for k, sl in enumerate(slices):
        base = sl.base_model or cfg.base_model
        _check_contract(spec, [s.model for s in sl.sources], base, f"slices[{k}]" if cfg.slices else "models")
        for s in sl.sources:
            m = models[idx[s.model]]
            if s.layer_range[1] > m.num_layers:
                raise ConfigError(f"layer_range {list(s.layer_range)} exceeds the {m.num_layers} layers of {s.model}")

    # tensor templates from the donor
    layer_templates: list[str] = []
    pre: list[str] = []
    post: list[str] = []
    seen = set()
    for n in donor.reader.names():
        mt = _LAYER_RE.search(n)
        if mt:
            tmpl = n[: mt.start(2)] + "{}" + n[mt.end(2):]
            if tmpl not in seen:
                seen.add(tmpl)
                layer_templates.append(tmpl)
        elif "embed" in n and "norm" not in n:
            pre.append(n)
        else:
            post.append(n)
    if "lm_head.weight" not in donor.reader and donor.config.get("tie_word_embeddings") is False:
        post.append("lm_head.weight")

    vocab = build_vocab(cfg, models, models.index(donor)) if cfg.vocab_source else None
    out_dtype_name = cfg.out_dtype or cfg.dtype
    jobs: list[Job] = []

    def add(out_name: str, in_names: list[str], sl, t: float, optional: bool = False):
        srcs = sl.sources
        base = sl.base_model or cfg.base_model
        stored = []
        for s, nm in zip(srcs, in_names):
            m = models[idx[s.model]]
            stored.append(m.tensor_name(nm))
        if all(x is None for x in stored) and (optional or out_name.endswith("lm_head.weight")):
            return
        for s, nm, st in zip(srcs, in_names, stored):
            if st is None:
                raise MissingTensorError(f"model {s.model!r} ({models[idx[s.model]].path}) has no tensor {nm!r}")
        shapes = [models[idx[s.model]].reader.shape(st) for s, st in zip(srcs, stored)]
        in_dtypes = [models[idx[s.model]].reader.dtype(st) for s, st in zip(srcs, stored)]
        floats = [d.kind == "f" or d == NP_DTYPES["bfloat16"] for d in in_dtypes]
        if not all(floats):  # mergekit: non-float buffers are copied when every input agrees
            if any(floats) or len(set(in_dtypes)) > 1 or len(set(shapes)) > 1:
                raise CheckpointError(f"tensor {out_name!r} is not floating point in every model (" + ", ".join(
                    f"{s.model}: {d.name} {list(sh)}" for s, d, sh in zip(srcs, in_dtypes, shapes))
                    + "); non-float tensors are copied, so all models must store the same dtype and shape")
            jobs.append(Job(out_name, tuple(shapes[0]), in_dtypes[0], [(idx[s.model], st) for s, st in
                                                                     zip(srcs, stored)], None, {}, [{}] * len(srcs),
                            [], copy=True))
            return
        is_vocab = _is_vocab(out_name) and vocab is not None
        if is_vocab:
            shape = (vocab.size,) + tuple(shapes[0][1:])
            if len({sh[1:] for sh in shapes}) > 1:
                raise ShapeMismatchError(f"tensor {out_name!r}: non-vocabulary dimensions differ: " + ", ".join(
                    f"{s.model}: {list(sh)}" for s, sh in zip(srcs, shapes)))
        else:
            if len(set(shapes)) > 1:
                hint = (" (vocabularies differ: set tokenizer_source: base or union)" if _is_vocab(out_name)
                        else "")
                raise ShapeMismatchError(f"tensor {out_name!r} has mismatched shapes: " + ", ".join(
                    f"{s.model}: {list(sh)}" for s, sh in zip(srcs, shapes)) + hint)
            shape = shapes[0]
        base_pos = next((i for i, s in enumerate(srcs) if s.model == base), None)
        if spec.base == "ignored":
            base_pos = None
        shared_scopes = [sl.parameters, cfg.parameters]
        shared = {p.name: resolve_parameter(p, shared_scopes, out_name, t, out_name)
                  for p in spec.params if p.scope == "shared"}
        per_input = []
        for i, (s, st) in enumerate(zip(srcs, in_names)):
            scopes = [s.parameters, sl.parameters, cfg.parameters]
            d = {}
            for p in spec.params:
                if p.scope == "input" or (p.scope == "non_base" and i != base_pos):
                    d[p.name] = resolve_parameter(p, scopes, st, t, f"{s.model}: {st}")
            per_input.append(d)
        check_group(spec, shared, per_input, [s.model for s in srcs], base_pos, out_name)
        merge_dtype = dtype_name(cfg.dtype) if cfg.dtype else promote(in_dtypes).name
        result = "float32" if spec.result == "float32" and compute == "auto" else merge_dtype
        od = NP_DTYPES[cfg.out_dtype] if cfg.out_dtype else NP_DTYPES[result]
        nb = [i for i in range(len(srcs)) if i != base_pos]
        streams = [rng.tensor_stream(seed, out_name, j) for j in range(len(nb))]
        jobs.append(Job(out_name, tuple(shape), od, [(idx[s.model], st) for s, st in zip(srcs, stored)],
                        base_pos, shared, per_input, streams, is_vocab,
                        dtype=merge_dtype if compute == "auto" else "float32"))

    for n in pre:
        add(n, [n] * len(slices[0].sources), slices[0], 0.0)
    out_layer = 0
    source_layer = []  # the first source's layer index behind each output layer
    for sl in slices:
        n_layers = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for off in range(n_layers):
            source_layer.append(sl.sources[0].layer_range[0] + off)
            t = off / (n_layers - 1) if n_layers > 1 else 1.0
            for tmpl in layer_templates:
                add(tmpl.format(out_layer), [tmpl.format(s.layer_range[0] + off) for s in sl.sources], sl, t)
            out_layer += 1
    for n in post:
        add(n, [n] * len(slices[-1].sources), slices[-1], 0.0)

    out_config = dict(donor.config)
    if cfg.slices is not None and "num_hidden_layers" in out_config:
        out_config["num_hidden_layers"] = out_layer
        # per-layer lists (Qwen2's layer_types: sliding or full attention) follow their source layers;
        # transformers checks len(layer_types) == num_hidden_layers
        if isinstance(out_config.get("layer_types"), list):
            out_config["layer_types"] = [out_config["layer_types"][i] for i in source_layer]
    if out_dtype_name:
        out_config["torch_dtype" if "torch_dtype" in out_config else "dtype"] = out_dtype_name
    plan = Plan(cfg, models, jobs, donor, out_config)
    if vocab is not None:
        out_config["vocab_size"] = vocab.size
        plan.vocab = vocab
    plan.chat_template = resolve_chat_template(cfg.chat_template, models)
    return plan


def _check_contract(spec, inputs: list[str], base: str | None, where: str) -> None:
    has_base = base is not None and base in inputs
    if base is not None and spec.base != "ignored" and not has_base:
        raise ConfigError(f"{where}: base model {base!r} is not among the inputs")
    if spec.base == "required" and not has_base:
        raise ConfigError(f"merge method {spec.name!r} needs a base_model ({where})")
    n = len(inputs)
    nb = n - int(has_base and spec.base != "ignored")
    if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs):
        raise ConfigError(f"merge method {spec.name!r} takes {spec.min_inputs}"
                          f"{'..' + str(spec.max_inputs) if spec.max_inputs else '+'} models, got {n} ({where})")
    if (spec.min_non_base is not None and nb < spec.min_non_base) or (
            spec.max_non_base is not None and nb > spec.max_non_base):
        raise ConfigError(f"merge method {spec.name!r} needs {spec.min_non_base}"
                          f"{'' if spec.max_non_base == spec.min_non_base else '+'} non-base models, got {nb} ({where})")


# -- execution ---------------------------------------------------------------------------------------

class _Progress:
    def __init__(self, total_tensors: int, total_bytes: int, quiet: bool):
        self.lock = threading.Lock()
        self.t0 = time.perf_counter()
        self.bytes = 0
        self.bar = None
        if not quiet:
            from tqdm import tqdm
            self.bar = tqdm(total=total_tensors, unit="tensor", desc="merge", file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, nbytes: int):
        with self.lock:
            self.bytes += nbytes
            if self.bar is not None:
                dt = max(time.perf_counter() - self.t0, 1e-9)
                self.bar.set_postfix_str(f"{self.bytes / dt / 1e9:.2f} GB/s")
                self.bar.update(1)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _device_setup(device: str):
    import jax
    cache = os.environ.get("FUSION_JAX_COMPILE_CACHE", str(Path.home() / ".cache" / "fusion_jax" / "xla"))
    if cache and cache != "0" and not jax.config.jax_compilation_cache_dir:
        try:  # the chunk kernels are few and fixed: cache their compilations across runs
            jax.config.update("jax_compilation_cache_dir", cache)
            jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        except Exception:  # noqa: BLE001  (an older jax without the option)
            pass
    if device == "cpu":
        return jax.devices("cpu")
    if device == "auto":
        return jax.devices()
    raise ConfigError(f"--device must be 'cpu' or 'auto', not {device!r}")


def _index32(i: int) -> np.uint32:
    """A chunk's first flat element index for the 32-bit counter hash (wraps mod 2**32, as ``rng.bits_np``;
    power-of-two chunks never straddle a wrap)."""
    return np.uint32(i & rng.MASK32)


class _Runner:
    def __init__(self, plan: Plan, device: str, memory_budget: int):
        self.plan = plan
        self.devices = _device_setup(device)
        if self.devices[0].platform == "cpu":
            retain_freed_memory()  # XLA:CPU's chunk temporaries: reuse heap blocks, not fresh mmaps
        self.budget = memory_budget
        self.host = self.devices[0].platform == "cpu"  # order statistics may use NumPy on host arrays
        self.sharding = None
        if len(self.devices) > 1:
            from jax.sharding import Mesh, NamedSharding, PartitionSpec
            mesh = Mesh(np.array(self.devices), ("x",))
            self.sharding = NamedSharding(mesh, PartitionSpec("x"))

    def put(self, a: np.ndarray):
        import jax
        if self.sharding is not None and a.ndim == 1 and kernels.shardable(a.shape[0], len(self.devices)):
            return jax.device_put(a, self.sharding)
        return jax.device_put(a, self.devices[0])

    def read(self, job: Job, lo: int | None = None, hi: int | None = None) -> list[np.ndarray]:
        """Each input of ``job``, whole or elements ``lo:hi`` of its flat view (64-byte aligned, so
        XLA:CPU adopts the buffers without a copy)."""
        out = []
        for m, n in job.inputs:
            r = self.plan.models[m].reader
            out.append(r.get(n) if lo is None else r.read_flat(n, lo, hi))
        return out

    def streamable(self, job: Job) -> bool:
        s = self.plan.config.spec
        return (s.family == "task_vector" and s.sparsify in (None, "random")) or s.family == "linear"

    def run_job(self, job: Job, writer: ShardedWriter) -> int:
        try:
            return self._run_job(job, writer)
        except ValueError as e:  # a method refusing its parameters (e.g. della's density +- epsilon)
            raise ConfigError(f"tensor {job.name!r}: {e}") from None

    def _run_job(self, job: Job, writer: ShardedWriter) -> int:
        in_bytes = sum(self.plan.models[m].reader.info(n).nbytes for m, n in job.inputs)
        if job.copy:
            self._copy(job, writer)
            return in_bytes
        if job.vocab:
            base = self.plan.base_index(job)
            arrays = permute_vocab(job.name, self.read(job), [m for m, _ in job.inputs], self.plan.vocab, base,
                                   job.dtype)
            arrays = [a.reshape(-1) for a in arrays]
        elif self.streamable(job) and in_bytes > self.budget:
            arrays = None  # read chunk by chunk
        else:
            arrays = [a.reshape(-1) for a in self.read(job)]
        if not self.streamable(job):
            arrays = [a.reshape(job.shape) for a in arrays]
            res = merge_group(self.plan.config.spec, arrays, job.base_pos, job.shared, job.per_input, job.streams,
                              dtype=job.dtype, host=self.host)
            writer.write(job.name, np.asarray(res).astype(job.out_dtype))
            return in_bytes
        self._stream(job, arrays, writer)
        return in_bytes

    def _copy(self, job: Job, writer: ShardedWriter) -> None:
        """A non-float tensor (an integer buffer): every input must hold the same values (mergekit's rule)."""
        arrays = self.read(job)
        for (m, _), a in zip(job.inputs[1:], arrays[1:]):
            if not np.array_equal(a, arrays[0]):
                raise CheckpointError(f"tensor {job.name!r} ({a.dtype.name}) differs between "
                                      f"{self.plan.models[job.inputs[0][0]].name!r} and {self.plan.models[m].name!r}; "
                                      "non-float tensors are copied, not merged, so the models must agree on it")
        writer.write(job.name, arrays[0])

    def _stream(self, job: Job, arrays, writer: ShardedWriter) -> None:
        import jax.numpy as jnp
        spec = self.plan.config.spec
        n = job.numel
        C = kernels.chunk_size(n, len(self.devices))
        nchunks = max(1, -(-n // C))
        ones = guard_ones()

        def load(i):
            lo, hi = i * C, min(n, (i + 1) * C)
            parts = [a[lo:hi] for a in arrays] if arrays is not None else self.read(job, lo, hi)
            return [self.put(kernels.pad_chunk(p, C)) for p in parts], lo, hi

        # In memory and within the budget: every chunk placed once for both passes (no copy on the CPU;
        # on an accelerator the group's device copy). Otherwise chunk by chunk, once per pass: read from
        # disk when over the budget, sliced from memory for a vocabulary job (which must hold its inputs).
        in_bytes = sum(a.nbytes for a in arrays) if arrays is not None else None
        placed = [load(i) for i in range(nchunks)] if in_bytes is not None and in_bytes <= self.budget else None

        def chunks():
            return iter(placed) if placed is not None else map(load, range(nchunks))

        out = np.empty(n, job.out_dtype)
        if spec.family == "linear":
            w = jnp.asarray([p["weight"] for p in job.per_input], jnp.float32)

            def kernel(xs, lo):
                return kernels.linear_chunk(tuple(xs), w, ones, normalize=bool(job.shared["normalize"]),
                                            dtype=job.dtype, out_dtype=jnp.dtype(job.out_dtype))
        else:
            bp = job.base_pos
            nb = [i for i in range(len(job.inputs)) if i != bp]
            scales, streams, thr, full, weights = self._task_vector_scales(job, nb, chunks)

            def kernel(xs, lo):
                return kernels.task_vector_chunk(
                    xs[bp], tuple(xs[i] for i in nb), streams, thr, scales, weights,
                    np.float32(job.shared["lambda"]), _index32(lo), ones, random=spec.sparsify == "random",
                    full=full, consensus=spec.consensus, normalize=bool(job.shared["normalize"]),
                    rescale=rescale_mode(job.shared["rescale"]), dtype=job.dtype,
                    out_dtype=jnp.dtype(job.out_dtype))

        def copy_out(r, lo, hi):
            out[lo:hi] = np.asarray(r)[: hi - lo]

        pending = None  # copy chunk i out while chunk i+1 computes
        for xs, lo, hi in chunks():
            r = kernel(xs, lo)
            if pending is not None:
                copy_out(*pending)
            pending = (r, lo, hi)
        copy_out(*pending)
        writer.write(job.name, out.reshape(job.shape))

    def _task_vector_scales(self, job: Job, nb: list[int], chunks):
        """Per-input rescale factors (1, 1/density, or mergekit's L1 ratio from a statistics pass over
        ``chunks``), with the kernel's other per-input arguments."""
        spec = self.plan.config.spec
        dens = [float(job.per_input[i].get("density", 1.0)) for i in nb]
        weights = np.asarray([float(job.per_input[i]["weight"]) for i in nb], np.float32)
        random = spec.sparsify == "random"
        full = tuple(d >= 1 for d in dens)
        mode = rescale_mode(job.shared["rescale"])
        thr = np.array([rng.threshold(d) for d in dens], np.uint32)
        streams = np.array(job.streams, np.uint32)
        scales = np.ones(len(nb), np.float32)
        if random and mode == "inverse":
            scales = np.array([1.0 / d if 0 < d < 1 else 1.0 for d in dens], np.float32)
        elif random and mode == "l1" and not all(full):
            sel = [k for k in range(len(nb)) if not full[k]]
            bp = job.base_pos
            ones = guard_ones()
            parts = [kernels.l1_sums(xs[bp], tuple(xs[nb[k]] for k in sel), streams[sel], thr[sel],
                                     _index32(lo), ones, dtype=job.dtype) for xs, lo, _ in chunks()]
            scales[sel] = kernels.l1_scales(kernels.l1_totals(parts, job.numel), job.dtype)
        return scales, streams, thr, full, weights


def execute(plan: Plan, out_dir: str | os.PathLike, *, device: str = "cpu", out_shard_size="5GB",
            workers: int | None = None, memory_budget: int | str = "256MB", overwrite: bool = False,
            quiet: bool = False) -> dict:
    """Run a plan, writing a Hugging Face model directory atomically. Returns timing stats.

    On the CPU this raises glibc's malloc thresholds for the rest of the process
    (:func:`fusion_jax.utils.malloc.retain_freed_memory`: up to 1 GB of freed heap stays mapped for reuse);
    set ``FUSION_JAX_MALLOC_TUNING=0`` to keep the defaults.
    """
    check_output_path(Path(out_dir), [m.path for m in plan.models])
    runner = _Runner(plan, device, parse_size(memory_budget))
    workers = workers or 2  # measured on 2 cores: 2 overlaps I/O with math; 3 makes XLA threads contend
    t0 = time.perf_counter()
    specs = [TensorSpec(j.name, j.shape, j.out_dtype) for j in plan.jobs]
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        progress = _Progress(len(plan.jobs), plan.total_in_bytes, quiet)
        try:
            with ShardedWriter(tmp, specs, out_shard_size) as writer:
                with cf.ThreadPoolExecutor(workers) as pool:
                    futs = [pool.submit(runner.run_job, j, writer) for j in plan.jobs]
                    try:
                        for f in cf.as_completed(futs):
                            progress.update(f.result())
                    except BaseException:
                        for f in futs:
                            f.cancel()
                        raise
        finally:
            progress.close()
        _write_metadata(plan, tmp)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "tensors": len(plan.jobs), "in_bytes": plan.total_in_bytes,
            "out_bytes": plan.total_out_bytes}


def _write_metadata(plan: Plan, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(plan.out_config, indent=2, sort_keys=True) + "\n")
    gen = plan.donor.path / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, out / "generation_config.json")   # bytes only: the mode follows the umask
    _write_tokenizer(plan, out)
    cfg_raw = plan.config.raw
    if cfg_raw:
        import yaml
        (out / "fusion_jax_merge.yml").write_text(yaml.safe_dump(cfg_raw, sort_keys=False))


def check_output_path(out: Path, inputs) -> None:
    """Refuse an output path that is, contains or lies inside an input model's directory: the merge
    (with --overwrite) would replace or delete its own inputs. Symlinks are resolved first."""
    o = Path(os.path.realpath(out))
    for p in inputs:
        i = Path(os.path.realpath(p))
        if o == i or i in o.parents or o in i.parents:
            what = "is" if o == i else "is inside" if i in o.parents else "contains"
            raise ConfigError(f"output path {out} {what} the input model directory {p}; "
                              "choose an output path outside every input")


def _write_tokenizer(plan: Plan, out: Path) -> None:
    """As mergekit: a built vocabulary's tokenizer is saved by transformers (with the chat template);
    without one, the donor's tokenizer files are copied, or re-saved when a chat_template is given."""
    donor = plan.donor.path
    if plan.vocab is not None:
        tok = plan.vocab.tokenizer
    elif plan.config.chat_template is None and (donor / "tokenizer_config.json").is_file() and (
            (donor / "tokenizer.json").is_file() or (donor / "tokenizer.model").is_file()):
        for f in TOKENIZER_FILES:
            if (donor / f).is_file():
                shutil.copyfile(donor / f, out / f)
        return
    else:
        import transformers
        try:
            tok = transformers.AutoTokenizer.from_pretrained(str(donor))
        except Exception as e:  # noqa: BLE001  (no tokenizer to carry over: mergekit warns and goes on)
            if plan.config.chat_template:
                warnings.warn(f"chat_template: {plan.donor.name!r} has no loadable tokenizer ({e}); "
                              "the output has no tokenizer", stacklevel=2)
            return
    if plan.chat_template:
        tok.chat_template = plan.chat_template
    tok.save_pretrained(str(out))


def merge(config, out_dir, *, seed: int = 0, device: str = "cpu", out_shard_size="5GB",
          overwrite: bool = False, quiet: bool = False, workers: int | None = None,
          memory_budget="256MB", compute_dtype: str | None = None) -> dict:
    """Python API: merge per a mergekit YAML path (or dict or MergeConfig) into ``out_dir``.

    On the CPU it tunes glibc's malloc for the rest of the process (see :func:`execute`).
    """
    for opt, size in (("--out-shard-size", out_shard_size), ("memory_budget", memory_budget)):
        try:
            parse_size(size)
        except ValueError as e:
            raise ConfigError(f"{opt}: {e}") from None
    if not isinstance(config, (MergeConfig, dict)) and len(read_documents(config)) > 1:
        from fusion_jax.merging.multi import merge_documents
        return merge_documents(config, out_dir, seed=seed, device=device, out_shard_size=out_shard_size,
                               overwrite=overwrite, quiet=quiet, workers=workers, memory_budget=memory_budget,
                               compute_dtype=compute_dtype)
    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise FusionError(f"output path {out} already exists")
    check_output_path(out, [cfg.resolve_path(m) for m in cfg.referenced_models()])
    plan = plan_merge(cfg, seed=seed, compute_dtype=compute_dtype)
    try:
        return execute(plan, out, device=device, out_shard_size=out_shard_size, overwrite=overwrite,
                       quiet=quiet, workers=workers, memory_budget=memory_budget)
    finally:
        for m in plan.models:
            m.reader.close()
