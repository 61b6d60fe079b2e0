"""One explicit, reversible HF name <-> param path table per architecture.

Each row says: the HF tensor name (``{i}`` = layer index, ``{e}`` = expert index), our param path in the
nested params dict (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``), whether the tensor is per layer
(our param is then STACKED ``[L, ...]``) and per expert (``[L, E, ...]``), whether the layout is transposed
(torch ``Linear.weight`` is ``[out, in]``, our kernel is ``[in, out]``), and when the row applies (a config
flag or property). No reshapes are needed: our kernels keep the heads flattened exactly as HF does, so
``hf = ours.T`` and ``ours = hf.T`` per layer (and expert).

Read a row left to right to load, right to left to save.

MoE layouts (the tensors each one WRITES; :data:`VIEWS` lists the other on-disk spellings we also read):

* Mixtral: ``model.layers.{i}.block_sparse_moe.gate.weight`` [E, D] and
  ``...block_sparse_moe.experts.{e}.w1 / w3 / w2.weight`` (gate [F, D] / up [F, D] / down [D, F]), what
  transformers 4.x and 5.x ``save_pretrained`` write. transformers 5 fuses the experts in memory
  (``mlp.experts.gate_up_proj`` [E, 2F, D], ``mlp.experts.down_proj`` [E, D, F], router ``mlp.gate.weight``);
  mergekit 0.1.5 writes that fused form to disk, so it is readable too.
* Qwen2-MoE: ``model.layers.{i}.mlp.gate.weight`` [E, D], ``mlp.experts.{e}.{gate,up,down}_proj.weight``,
  ``mlp.shared_expert.{gate,up,down}_proj.weight`` and ``mlp.shared_expert_gate.weight`` [1, D].
* FusionMoe (ours; config.json ``architectures: ["FusionMoeForCausalLM"]``, ``model_type: "fusion_moe"``,
  ``base_architecture``, the dense family's fields and the MoE fields of ``ModelConfig``): the dense
  family's attention tensors, experts as Qwen2-MoE names them, and the router under XFT's own names:
  ``mlp.gate.gate_network.0.weight`` [E-1, D], ``mlp.gate.gate_network.2.weight`` [E-1, E-1] and
  ``mlp.gate.weight_noise.weight`` [E-1, D] (router="xft"; W2 tanh(W1 x), noise scale softplus(W_n x) +
  eps), or ``mlp.gate.weight`` [E, D] (router="softmax"); a Qwen2-style shared expert keeps Qwen2-MoE's names.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from fusion_jax.errors import UnknownArchitectureError
from fusion_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str                       # HF name; "{i}" stands for the layer index, "{e}" for the expert index
    path: tuple[str, ...]         # our param path
    transpose: bool = False       # ours = hf.T (per layer / expert)
    when: str | None = None       # ModelConfig flag that must be true ("untied" = not tie_word_embeddings)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf

    def stack_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """The leading dims of our param that index HF tensors: (), (L,) or (L, E)."""
        return self.our_shape(config)[:int(self.stacked) + int(self.per_expert)]

    def applies(self, config: ModelConfig) -> bool:
        if self.when is None:
            return True
        if self.when == "untied":
            return not config.tie_word_embeddings
        return bool(getattr(config, self.when))

    def hf_name(self, i: int | None = None, e: int | None = None) -> str:
        return self.hf.format(i=i, e=e) if self.stacked else self.hf

    def our_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """Shape of our (stacked) param."""
        return param_shapes(config)[self.path]

    def hf_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """Shape of ONE HF tensor (one layer's / one expert's, for stacked rows)."""
        s = self.our_shape(config)[int(self.stacked) + int(self.per_expert):]
        return tuple(reversed(s)) if self.transpose else s


def _p(s: str) -> tuple[str, ...]:
    return tuple(s.split("/"))


_L = "model.layers.{i}."
LLAMA_TABLE: tuple[Row, ...] = (
    Row("model.embed_tokens.weight",                 _p("embed/embedding")),
    Row(_L + "input_layernorm.weight",               _p("layers/attn_norm/scale")),
    Row(_L + "self_attn.q_proj.weight",              _p("layers/attn/q_proj/kernel"), True),
    Row(_L + "self_attn.q_proj.bias",                _p("layers/attn/q_proj/bias"), when="attention_bias"),
    Row(_L + "self_attn.k_proj.weight",              _p("layers/attn/k_proj/kernel"), True),
    Row(_L + "self_attn.k_proj.bias",                _p("layers/attn/k_proj/bias"), when="attention_bias"),
    Row(_L + "self_attn.v_proj.weight",              _p("layers/attn/v_proj/kernel"), True),
    Row(_L + "self_attn.v_proj.bias",                _p("layers/attn/v_proj/bias"), when="attention_bias"),
    Row(_L + "self_attn.o_proj.weight",              _p("layers/attn/o_proj/kernel"), True),
    Row(_L + "self_attn.o_proj.bias",                _p("layers/attn/o_proj/bias"), when="o_bias"),
    Row(_L + "post_attention_layernorm.weight",      _p("layers/mlp_norm/scale")),
    Row(_L + "mlp.gate_proj.weight",                 _p("layers/mlp/gate_proj/kernel"), True),
    Row(_L + "mlp.gate_proj.bias",                   _p("layers/mlp/gate_proj/bias"), when="mlp_bias"),
    Row(_L + "mlp.up_proj.weight",                   _p("layers/mlp/up_proj/kernel"), True),
    Row(_L + "mlp.up_proj.bias",                     _p("layers/mlp/up_proj/bias"), when="mlp_bias"),
    Row(_L + "mlp.down_proj.weight",                 _p("layers/mlp/down_proj/kernel"), True),
    Row(_L + "mlp.down_proj.bias",                   _p("layers/mlp/down_proj/bias"), when="mlp_bias"),
    Row("model.norm.weight",                         _p("final_norm/scale")),
    Row("lm_head.weight",                            _p("lm_head/kernel"), True, when="untied"),
)
# Mistral: same names and layout (no biases). Qwen2: same names; q/k/v always carry a bias (the
# config sets attention_bias=True, o_bias=False, mlp_bias=False), so the same rows apply.
MISTRAL_TABLE = LLAMA_TABLE
QWEN2_TABLE = LLAMA_TABLE

# -- MoE: the dense table with its FFN rows replaced ------------------------------------------------
_E = "model.layers.{i}.mlp.experts.{e}."
_X = "layers/mlp/experts/"
_EXPERT_ROWS = (
    Row(_E + "gate_proj.weight",                     _p(_X + "gate_proj/kernel"), True),
    Row(_E + "up_proj.weight",                       _p(_X + "up_proj/kernel"), True),
    Row(_E + "down_proj.weight",                     _p(_X + "down_proj/kernel"), True),
)
_SHARED_EXPERT_ROWS = (
    Row(_L + "mlp.shared_expert.gate_proj.weight",   _p("layers/mlp/shared_expert/gate_proj/kernel"), True),
    Row(_L + "mlp.shared_expert.up_proj.weight",     _p("layers/mlp/shared_expert/up_proj/kernel"), True),
    Row(_L + "mlp.shared_expert.down_proj.weight",   _p("layers/mlp/shared_expert/down_proj/kernel"), True),
    Row(_L + "mlp.shared_expert_gate.weight",        _p("layers/mlp/shared_expert_gate/kernel"), True),
)
_B = "model.layers.{i}.block_sparse_moe."
MIXTRAL_MOE_ROWS = (
    Row(_B + "gate.weight",                          _p("layers/mlp/router/kernel"), True),
    Row(_B + "experts.{e}.w1.weight",                _p(_X + "gate_proj/kernel"), True),
    Row(_B + "experts.{e}.w3.weight",                _p(_X + "up_proj/kernel"), True),
    Row(_B + "experts.{e}.w2.weight",                _p(_X + "down_proj/kernel"), True),
)
QWEN2_MOE_ROWS = (Row(_L + "mlp.gate.weight", _p("layers/mlp/router/kernel"), True),
                  *_EXPERT_ROWS, *_SHARED_EXPERT_ROWS)
FUSION_MOE_ROWS = (
    Row(_L + "mlp.gate.weight",                      _p("layers/mlp/router/kernel"), True, when="softmax_router"),
    Row(_L + "mlp.gate.gate_network.0.weight",       _p("layers/mlp/router/w1"), True, when="xft_router"),
    Row(_L + "mlp.gate.gate_network.2.weight",       _p("layers/mlp/router/w2"), True, when="xft_router"),
    Row(_L + "mlp.gate.weight_noise.weight",         _p("layers/mlp/router/noise"), True, when="router_noise"),
    *_EXPERT_ROWS,
    *(Row(r.hf, r.path, r.transpose, when="has_shared_expert") for r in _SHARED_EXPERT_ROWS),
)


def _moe_table(moe_rows: tuple[Row, ...]) -> tuple[Row, ...]:
    """LLAMA_TABLE with its dense FFN rows (``layers/mlp/...``) replaced by ``moe_rows``, in place."""
    ffn = [i for i, r in enumerate(LLAMA_TABLE) if r.path[:2] == ("layers", "mlp")]
    return LLAMA_TABLE[:ffn[0]] + moe_rows + LLAMA_TABLE[ffn[-1] + 1:]


MIXTRAL_TABLE = _moe_table(MIXTRAL_MOE_ROWS)
QWEN2_MOE_TABLE = _moe_table(QWEN2_MOE_ROWS)
FUSION_MOE_TABLE = _moe_table(FUSION_MOE_ROWS)

TABLES: dict[str, tuple[Row, ...]] = {
    "LlamaForCausalLM": LLAMA_TABLE,
    "MistralForCausalLM": MISTRAL_TABLE,
    "Qwen2ForCausalLM": QWEN2_TABLE,
    "MixtralForCausalLM": MIXTRAL_TABLE,
    "Qwen2MoeForCausalLM": QWEN2_MOE_TABLE,
    "FusionMoeForCausalLM": FUSION_MOE_TABLE,
}


@dataclasses.dataclass(frozen=True)
class View:
    """Another on-disk spelling of a table's tensor: HF tensor ``name`` (as the table writes it) is the
    slice ``[e, part]`` of tensor ``source`` (``{i}`` = layer) when ``source`` is present and ``name`` is
    not. ``part = (k, n)``: the k-th of n equal pieces of the axis after the expert axis (None: all of it)."""
    name: str
    source: str
    expert_axis: bool = True
    part: tuple[int, int] | None = None


_F = "model.layers.{i}.mlp.experts."
VIEWS: dict[str, tuple[View, ...]] = {
    # transformers 5's in-memory (and mergekit 0.1.5's on-disk) Mixtral: fused experts under mlp.
    "MixtralForCausalLM": (
        View(_B + "gate.weight", "model.layers.{i}.mlp.gate.weight", expert_axis=False),
        View(_B + "experts.{e}.w1.weight", _F + "gate_up_proj", part=(0, 2)),
        View(_B + "experts.{e}.w3.weight", _F + "gate_up_proj", part=(1, 2)),
        View(_B + "experts.{e}.w2.weight", _F + "down_proj"),
    ),
    "Qwen2MoeForCausalLM": (
        View(_E + "gate_proj.weight", _F + "gate_up_proj", part=(0, 2)),
        View(_E + "up_proj.weight", _F + "gate_up_proj", part=(1, 2)),
        View(_E + "down_proj.weight", _F + "down_proj"),
    ),
}

# Tensors some checkpoints carry that we deliberately do not load (buffers, tied copies).
IGNORED_PATTERNS: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def table(config: ModelConfig) -> tuple[Row, ...]:
    try:
        rows = TABLES[config.architecture]
    except KeyError:
        raise UnknownArchitectureError(f"no tensor table for architecture {config.architecture!r}") from None
    return tuple(r for r in rows if r.applies(config))


def view_slices(config: ModelConfig, present) -> dict[str, tuple[str, tuple]]:
    """``{table name: (source name, index)}`` for every tensor of ``config`` that the checkpoint holds
    only in another spelling (:data:`VIEWS`); ``present(name)`` says whether a tensor is on disk.
    ``index`` is a tuple of ints / slices into the source tensor (leading axes only: a contiguous range)."""
    out: dict[str, tuple[str, tuple]] = {}
    views = VIEWS.get(config.architecture, ())
    if not views:
        return out
    by_name = {}
    for v in views:
        by_name[v.name] = v
    for name, row, idx in hf_tensors(config):
        v = by_name.get(row.hf)
        if v is None or present(name):
            continue
        src = v.source.format(i=idx[0])
        if not present(src):
            continue
        index: tuple = (idx[1],) if v.expert_axis else ()
        if v.part is not None:
            k, n = v.part
            size = row.hf_shape(config)[0]
            index += (slice(k * size, (k + 1) * size),)
        out[name] = (src, index)
    return out


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our param path -> shape, for every param of ``config`` (and of its MoE block when it has one)."""
    c = config
    L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    E, Fe, n, Fs = c.num_experts, c.expert_intermediate_size, c.num_routed_experts, c.shared_expert_intermediate_size
    s = {
        _p("embed/embedding"): (V, D),
        _p("layers/attn_norm/scale"): (L, D),
        _p("layers/attn/q_proj/kernel"): (L, D, q),
        _p("layers/attn/q_proj/bias"): (L, q),
        _p("layers/attn/k_proj/kernel"): (L, D, kv),
        _p("layers/attn/k_proj/bias"): (L, kv),
        _p("layers/attn/v_proj/kernel"): (L, D, kv),
        _p("layers/attn/v_proj/bias"): (L, kv),
        _p("layers/attn/o_proj/kernel"): (L, q, D),
        _p("layers/attn/o_proj/bias"): (L, D),
        _p("layers/mlp_norm/scale"): (L, D),
        _p("layers/mlp/gate_proj/kernel"): (L, D, F),
        _p("layers/mlp/gate_proj/bias"): (L, F),
        _p("layers/mlp/up_proj/kernel"): (L, D, F),
        _p("layers/mlp/up_proj/bias"): (L, F),
        _p("layers/mlp/down_proj/kernel"): (L, F, D),
        _p("layers/mlp/down_proj/bias"): (L, D),
        _p("final_norm/scale"): (D,),
        _p("lm_head/kernel"): (D, V),
        _p("layers/mlp/router/kernel"): (L, D, n),
        _p("layers/mlp/router/w1"): (L, D, n),
        _p("layers/mlp/router/w2"): (L, n, n),
        _p("layers/mlp/router/noise"): (L, D, n),
        _p(_X + "gate_proj/kernel"): (L, E, D, Fe),
        _p(_X + "up_proj/kernel"): (L, E, D, Fe),
        _p(_X + "down_proj/kernel"): (L, E, Fe, D),
        _p("layers/mlp/shared_expert/gate_proj/kernel"): (L, D, Fs),
        _p("layers/mlp/shared_expert/up_proj/kernel"): (L, D, Fs),
        _p("layers/mlp/shared_expert/down_proj/kernel"): (L, Fs, D),
        _p("layers/mlp/shared_expert_gate/kernel"): (L, D, 1),
    }
    return s


def hf_tensors(config: ModelConfig) -> Iterator[tuple[str, Row, tuple[int, ...]]]:
    """Every HF tensor name of ``config`` with its row and index into our stacked param (``()``, ``(i,)``
    or ``(i, e)``), in save order (embed, layer 0 .. L-1 (expert 0 .. E-1 within a row), norm, head)."""
    rows = table(config)
    for r in rows:
        if not r.stacked and r.path[0] == "embed":
            yield r.hf_name(), r, ()
    for i in range(config.num_layers):
        for r in rows:
            if r.per_expert:
                for e in range(config.num_experts):
                    yield r.hf_name(i, e), r, (i, e)
            elif r.stacked:
                yield r.hf_name(i), r, (i,)
    for r in rows:
        if not r.stacked and r.path[0] != "embed":
            yield r.hf_name(), r, ()


# -- nested-dict helpers ---------------------------------------------------------------------------
def sharding_for(shardings, path: tuple[str, ...], default):
    """The sharding of the param at ``path``: ``shardings`` is None (-> ``default``), one Sharding for
    every param, or a nested dict of Shardings shaped like the params."""
    if shardings is None:
        return default
    return get_path(shardings, path) if isinstance(shardings, Mapping) else shardings


def get_path(tree: Mapping, path: tuple[str, ...]) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def to_hf_layout(row: Row, ours: np.ndarray) -> np.ndarray:
    """One layer's (or an unstacked) param in our layout -> the HF tensor."""
    return transpose2d(ours) if row.transpose else ours


def from_hf_layout(row: Row, hf: np.ndarray) -> np.ndarray:
    return transpose2d(hf) if row.transpose else hf


_TRANSPOSE_BLOCK = 16  # source rows per block; measured fastest (4-6x numpy's plain ``a.T`` copy)
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def transpose_into(dst: np.ndarray, src: np.ndarray) -> None:
    """``dst[...] = src.T`` for 2-D arrays of one dtype, ``dst`` possibly a strided view.

    Copies in blocks of a few source rows, so reads and writes both stay within cache lines (numpy's
    one-shot ``ascontiguousarray(a.T)`` walks the destination column by column and is several times
    slower on large matrices). Elements move as same-size unsigned integers: numpy copies those with
    its fast paths, while ml_dtypes' bfloat16 goes through a generic copy.
    """
    if dst.shape != src.shape[::-1] or dst.dtype != src.dtype:
        raise ValueError(f"transpose_into: {src.shape} {src.dtype} -> {dst.shape} {dst.dtype}")
    bits = _BITS.get(src.dtype.itemsize)
    d, s = (dst.view(bits), src.view(bits)) if bits else (dst, src)
    for i in range(0, s.shape[0], _TRANSPOSE_BLOCK):
        d[:, i:i + _TRANSPOSE_BLOCK] = s[i:i + _TRANSPOSE_BLOCK].T


def transpose2d(a: np.ndarray) -> np.ndarray:
    """Contiguous transpose of a 2-D array (see ``transpose_into``)."""
    a = np.asarray(a)
    out = np.empty(a.shape[::-1], a.dtype)
    transpose_into(out, a)
    return out


def params_to_hf(params: Mapping, config: ModelConfig,
                 convert: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, numpy array)`` one tensor at a time from a nested params dict.

    Goes row by row (all layers of one stacked param, then the next), so at most one stacked param is
    copied to the host at a time. The order differs from ``hf_tensors`` (the file layout order); the
    ``ShardedWriter`` accepts tensors in any order.
    """
    for row in table(config):
        a = np.asarray(get_path(params, row.path))
        for idx in np.ndindex(*a.shape[:int(row.stacked) + int(row.per_expert)]):
            t = to_hf_layout(row, a[idx])
            yield row.hf_name(*idx), (convert(t) if convert else t)
        del a
