"""``ModelConfig``: the static description of one Llama-family decoder, built from HF ``config.json``.

One frozen dataclass (hashable, usable as a ``jax.jit`` static argument) covers Llama 2, Llama 3/3.1
(``rope_scaling`` type ``llama3``), ``linear`` and ``dynamic`` rope scaling, Mistral (sliding window) and
Qwen2 (qkv bias, optional per-layer sliding window). ``from_hf`` reads both the transformers<5 layout
(``rope_theta`` + ``rope_scaling``) and the transformers>=5 one (``rope_parameters``); ``to_hf`` writes a
config.json dict that transformers loads to the same model.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from fusion_jax.errors import ConfigError, UnknownArchitectureError

# architecture name -> HF model_type
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "f32": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "f16": "float16"}


def canonical_dtype(name: Any) -> str:
    """'bf16' / 'bfloat16' / jnp.bfloat16 / np.dtype -> 'bfloat16' (likewise float32, float16)."""
    if not isinstance(name, str):
        import numpy as np
        name = np.dtype(name).name
    try:
        return _DTYPE_NAMES[name.lower().removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unsupported dtype {name!r} (expected float32, bfloat16 or float16)") from None


def _freeze(d: Mapping | None) -> tuple | None:
    if not d:
        return None
    return tuple(sorted((str(k), tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple | None = None  # frozen (sorted items) form of HF's rope_scaling dict, incl. rope_type
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False       # q/k/v bias (Qwen2 True; Llama's attention_bias also sets o_bias)
    o_bias: bool = False               # o_proj bias (only Llama with attention_bias=True)
    mlp_bias: bool = False
    sliding_window: int | None = None
    # per-layer sliding flags (Qwen2 with use_sliding_window: only layers >= max_window_layers slide);
    # None = every layer slides when sliding_window is set
    sliding_layers: tuple[bool, ...] | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"                # "none" | "full" | "dots" | "dots_no_batch"
    extra_hf: tuple | None = None      # other config.json keys, kept so to_hf() round-trips them

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise UnknownArchitectureError(
                f"architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of "
                              f"num_kv_heads={self.num_kv_heads}")
        object.__setattr__(self, "param_dtype", canonical_dtype(self.param_dtype))
        object.__setattr__(self, "dtype", canonical_dtype(self.dtype))
        if self.hidden_act not in ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu"):
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}")
        if self.remat not in ("none", "full", "dots", "dots_no_batch", "minimal"):
            raise ConfigError(f"unsupported remat policy {self.remat!r}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"unsupported rope scaling type {self.rope_type!r} "
                              f"(supported: {', '.join(ROPE_TYPES)})")
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        if self.sliding_layers is not None:
            object.__setattr__(self, "sliding_layers", tuple(bool(x) for x in self.sliding_layers))
            if len(self.sliding_layers) != self.num_layers:
                raise ConfigError("sliding_layers must have one flag per layer")

    # -- derived -----------------------------------------------------------------------------------
    @property
    def rope_scaling_dict(self) -> dict:
        return dict(self.rope_scaling or ())

    @property
    def rope_type(self) -> str:
        d = self.rope_scaling_dict
        return d.get("rope_type", d.get("type", "default")) if d else "default"

    @property
    def model_type(self) -> str:
        return ARCHITECTURES[self.architecture]

    def layer_windows(self) -> tuple[int | None, ...]:
        """Sliding window per layer (None = full attention)."""
        if self.sliding_window is None:
            return (None,) * self.num_layers
        flags = self.sliding_layers or (True,) * self.num_layers
        return tuple(self.sliding_window if f else None for f in flags)

    def num_params(self) -> int:
        D, F, L, V = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = 2 * D + D * q + 2 * D * kv + q * D + 3 * D * F
        per_layer += (q + 2 * kv) * self.attention_bias + D * self.o_bias + (2 * F + D) * self.mlp_bias
        return V * D * (1 if self.tie_word_embeddings else 2) + L * per_layer + D

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # -- HF ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Build from a config.json dict. ``source`` names the file in error messages."""
        hf = dict(hf)
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if archs:
            arch = archs[0]
        elif model_type in _MODEL_TYPES:
            arch = _MODEL_TYPES[model_type]
        else:
            arch = model_type
        if arch not in ARCHITECTURES:
            raise UnknownArchitectureError(
                f"{source}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})")
        model_type = ARCHITECTURES[arch]
        try:
            D = int(hf["hidden_size"])
            H = int(hf["num_attention_heads"])
            kv = int(hf.get("num_key_value_heads") or H)
            L = int(hf["num_hidden_layers"])
            head_dim = int(hf.get("head_dim") or D // H)
            kw: dict[str, Any] = dict(
                architecture=arch, vocab_size=int(hf["vocab_size"]), hidden_size=D,
                intermediate_size=int(hf["intermediate_size"]), num_layers=L, num_heads=H,
                num_kv_heads=kv, head_dim=head_dim,
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2" and False)),
                hidden_act=hf.get("hidden_act", "silu"),
                bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                pad_token_id=hf.get("pad_token_id"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{source}: missing or invalid field {e}") from e
        # rope: transformers>=5 "rope_parameters" (incl. rope_theta), else rope_theta + rope_scaling
        rp = dict(hf.get("rope_parameters") or {})
        rs = dict(hf.get("rope_scaling") or {})
        theta = rp.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
        scaling = {**rs, **rp}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        if scaling.get("rope_type", "default") == "default":
            scaling = {}
        kw["rope_theta"] = float(theta)
        kw["rope_scaling"] = _freeze(scaling)
        if model_type == "qwen2":
            kw["attention_bias"] = True
            use_sw = bool(hf.get("use_sliding_window", False))
            sw = hf.get("sliding_window") if use_sw else None
            if sw is not None:
                kw["sliding_window"] = int(sw)
                layer_types = hf.get("layer_types")
                if layer_types:
                    flags = tuple(t == "sliding_attention" for t in layer_types)
                else:
                    mwl = int(hf.get("max_window_layers", L))
                    flags = tuple(i >= mwl for i in range(L))
                if not any(flags):
                    kw["sliding_window"] = None
                elif not all(flags):
                    kw["sliding_layers"] = flags
        else:
            bias = bool(hf.get("attention_bias", False))
            kw["attention_bias"] = bias
            kw["o_bias"] = bias
            kw["mlp_bias"] = bool(hf.get("mlp_bias", False))
            # MistralConfig's default is 4096 when config.json has no sliding_window key at all
            sw = hf.get("sliding_window", 4096) if model_type == "mistral" else None
            kw["sliding_window"] = int(sw) if sw is not None else None
        dt = hf.get("dtype") or hf.get("torch_dtype")
        if dt is not None:
            try:
                kw["param_dtype"] = kw["dtype"] = canonical_dtype(str(dt))
            except ConfigError:
                pass
        known = {"architectures", "model_type", "hidden_size", "num_attention_heads", "num_key_value_heads",
                 "num_hidden_layers", "head_dim", "vocab_size", "intermediate_size", "rms_norm_eps",
                 "max_position_embeddings", "tie_word_embeddings", "hidden_act", "bos_token_id",
                 "eos_token_id", "pad_token_id", "rope_parameters", "rope_scaling", "rope_theta",
                 "attention_bias", "mlp_bias", "sliding_window", "use_sliding_window", "max_window_layers",
                 "layer_types", "dtype", "torch_dtype", "transformers_version"}
        extra = {k: v for k, v in hf.items() if k not in known and _hashable_json(v)}
        kw["extra_hf"] = _freeze(extra)
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self, dtype: str | None = None) -> dict:
        """A config.json dict (transformers>=4.45 and 5.x both read it) for this model."""
        out: dict[str, Any] = dict(self.extra_hf or ())
        out.update({
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling_dict) or None,
            "dtype": canonical_dtype(dtype or self.param_dtype),
        })
        if self.model_type == "qwen2":
            if self.sliding_window is not None:
                flags = self.sliding_layers or (True,) * self.num_layers
                first = next(i for i, f in enumerate(flags) if f)
                out.update(use_sliding_window=True, sliding_window=self.sliding_window,
                           max_window_layers=first,
                           layer_types=["sliding_attention" if f else "full_attention" for f in flags])
            else:
                out.update(use_sliding_window=False, sliding_window=None)
                out.setdefault("max_window_layers", self.num_layers)
        else:
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
            if self.model_type == "mistral":
                out["sliding_window"] = self.sliding_window
        return out


def _hashable_json(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None))) or (
        isinstance(v, list) and all(isinstance(x, (str, int, float, bool, type(None))) for x in v))
