"""One explicit, reversible HF name <-> param path table per architecture.

Each row says: the HF tensor name (``{i}`` = layer index), our param path in the nested params dict
(``nnx.to_pure_dict(nnx.state(model, nnx.Param))``), whether the tensor is per layer (our param is then
STACKED ``[L, ...]``), whether the layout is transposed (torch ``Linear.weight`` is ``[out, in]``, our
kernel is ``[in, out]``), and when the row applies (config flag). No reshapes are needed: our kernels keep
the heads flattened exactly as HF does, so ``hf = ours.T`` and ``ours = hf.T`` per layer.

Read a row left to right to load, right to left to save.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from fusion_jax.errors import UnknownArchitectureError
from fusion_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Row:
    hf: str                       # HF name; "{i}" stands for the layer index
    path: tuple[str, ...]         # our param path
    transpose: bool = False       # ours = hf.T (per layer)
    when: str | None = None       # ModelConfig flag that must be true ("untied" = not tie_word_embeddings)

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf

    def applies(self, config: ModelConfig) -> bool:
        if self.when is None:
            return True
        if self.when == "untied":
            return not config.tie_word_embeddings
        return bool(getattr(config, self.when))

    def hf_name(self, i: int | None = None) -> str:
        return self.hf.format(i=i) if self.stacked else self.hf

    def our_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """Shape of our (stacked) param."""
        return param_shapes(config)[self.path]

    def hf_shape(self, config: ModelConfig) -> tuple[int, ...]:
        """Shape of ONE HF tensor (one layer's, for stacked rows)."""
        s = self.our_shape(config)
        if self.stacked:
            s = s[1:]
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

TABLES: dict[str, tuple[Row, ...]] = {
    "LlamaForCausalLM": LLAMA_TABLE,
    "MistralForCausalLM": MISTRAL_TABLE,
    "Qwen2ForCausalLM": QWEN2_TABLE,
}

# Tensors some checkpoints carry that we deliberately do not load (buffers, tied copies).
IGNORED_PATTERNS: tuple[str, ...] = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",)


def table(config: ModelConfig) -> tuple[Row, ...]:
    try:
        rows = TABLES[config.architecture]
    except KeyError:
        raise UnknownArchitectureError(f"no tensor table for architecture {config.architecture!r}") from None
    return tuple(r for r in rows if r.applies(config))


def param_shapes(config: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our param path -> shape, for every param of ``config``."""
    c = config
    L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
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
    }
    return s


def hf_tensors(config: ModelConfig) -> Iterator[tuple[str, Row, int | None]]:
    """Every HF tensor name of ``config``, in save order (embed, layer 0 .. L-1, norm, head)."""
    rows = table(config)
    for r in rows:
        if not r.stacked and r.path[0] == "embed":
            yield r.hf_name(), r, None
    for i in range(config.num_layers):
        for r in rows:
            if r.stacked:
                yield r.hf_name(i), r, i
    for r in rows:
        if not r.stacked and r.path[0] != "embed":
            yield r.hf_name(), r, None


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
        if row.stacked:
            for i in range(config.num_layers):
                t = to_hf_layout(row, a[i])
                yield row.hf_name(i), (convert(t) if convert else t)
        else:
            t = to_hf_layout(row, a)
            yield row.hf_name(), (convert(t) if convert else t)
        del a
