"""``ModelConfig``: the static description of one Llama-family decoder, built from HF ``config.json``.

One frozen dataclass (hashable, usable as a ``jax.jit`` static argument) covers Llama 2, Llama 3/3.1
(``rope_scaling`` type ``llama3``), ``linear`` and ``dynamic`` rope scaling, Mistral (sliding window) and
Qwen2 (qkv bias, optional per-layer sliding window). ``from_hf`` reads both the transformers<5 layout
(``rope_theta`` + ``rope_scaling``) and the transformers>=5 one (``rope_parameters``); ``to_hf`` writes a
config.json dict that transformers loads to the same model.

Mixture-of-experts decoders use the same attention and replace every layer's FFN with the MoE block of
``fusion_jax.models.moe`` (``num_experts > 0``). Three HF layouts:

* ``MixtralForCausalLM``: softmax top-k router over ``num_experts`` experts, renormalised weights;
* ``Qwen2MoeForCausalLM``: softmax top-k router plus a separate shared expert of its own width whose output
  is scaled by ``sigmoid(x . w)`` (every layer sparse: ``decoder_sparse_step=1``, no ``mlp_only_layers``);
* ``FusionMoeForCausalLM`` (ours, no transformers class): any dense family (``base_architecture``) with any
  of our routers, notably XFT's (``router="xft"``: expert 0 shared and always on, an MLP router over the
  other ``num_experts - 1``). See ``fusion_jax/hf/mapping.py`` for its tensor names.
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
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "FusionMoeForCausalLM": "fusion_moe",
}
_MODEL_TYPES = {v: k for k, v in ARCHITECTURES.items()}
DENSE_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MOE_ARCHITECTURES = ("MixtralForCausalLM", "Qwen2MoeForCausalLM", "FusionMoeForCausalLM")
ROUTERS = ("softmax", "xft")
# the dense family whose attention (and config.json fields) each MoE layout follows
_ATTENTION_FAMILY = {"MixtralForCausalLM": "MistralForCausalLM", "Qwen2MoeForCausalLM": "Qwen2ForCausalLM"}
# config.json keys of the MoE fields (read and written by from_hf / to_hf)
_MOE_KEYS = ("num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size",
             "shared_expert_intermediate_size", "norm_topk_prob", "router", "router_noise", "router_noise_eps",
             "balance_loss_coef", "base_architecture", "decoder_sparse_step", "mlp_only_layers", "qkv_bias")
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
HIDDEN_ACTS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "relu")
_DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "f32": "float32",
                "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float16": "float16", "fp16": "float16", "f16": "float16"}


def canonical_dtype(name: Any, where: str | None = None) -> str:
    """'bf16' / 'bfloat16' / jnp.bfloat16 / np.dtype -> 'bfloat16' (likewise float32, float16).

    ``where`` names the option the value came from (``"specialists.dtype"``, ``"--dtype"``): the
    ConfigError's message starts with it, and it is kept as the error's ``option`` attribute.
    """
    shown = name
    if not isinstance(name, str):
        import numpy as np
        try:
            name = np.dtype(name).name
        except TypeError:
            name = str(name)
    try:
        return _DTYPE_NAMES[name.lower().removeprefix("torch.")]
    except KeyError:
        msg = f"unsupported dtype {shown!r} (expected float32, bfloat16 or float16)"
        err = ConfigError(f"{where}: {msg}" if where else msg)
        err.option = where
        raise err from None


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
    # -- mixture of experts (num_experts == 0: a dense FFN; see fusion_jax/models/moe.py) -----------------
    num_experts: int = 0               # experts stacked per layer (XFT: including the shared expert 0)
    num_experts_per_tok: int = 0       # routed experts per token (XFT: top-k among experts 1..E-1)
    moe_intermediate_size: int | None = None   # width of each stacked expert (None: intermediate_size)
    router: str = "softmax"            # "softmax" (Mixtral / Qwen2-MoE) | "xft" (shared expert 0 + MLP router)
    norm_topk_prob: bool = True        # softmax router: renormalise the top-k probabilities to sum to 1
    shared_expert_intermediate_size: int = 0   # Qwen2-MoE's separate, sigmoid-gated shared expert (0: none)
    router_noise: bool = False         # xft: noisy gating (learned noise scale) when the forward gets a key
    router_noise_eps: float = 0.01     # xft: noise std = softplus(x . W_noise) + eps
    balance_loss_coef: float = 0.01    # balance loss = coef * (cv^2(importance) + cv^2(load)) per layer
    base_architecture: str | None = None  # FusionMoeForCausalLM: the dense family of its attention/config

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
        if self.hidden_act not in HIDDEN_ACTS:
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
        self._check_moe()

    def _check_moe(self) -> None:
        arch = self.architecture
        if arch == "FusionMoeForCausalLM" and self.base_architecture not in DENSE_ARCHITECTURES:
            raise ConfigError(f"base_architecture {self.base_architecture!r} of {arch} must be one of "
                              f"{', '.join(DENSE_ARCHITECTURES)}")
        if arch != "FusionMoeForCausalLM" and self.base_architecture is not None:
            raise ConfigError(f"base_architecture is only meaningful for FusionMoeForCausalLM, not {arch}")
        if arch in MOE_ARCHITECTURES and self.num_experts < 1:
            raise ConfigError(f"{arch} needs num_experts >= 1 (got {self.num_experts})")
        if not self.is_moe:
            if arch in DENSE_ARCHITECTURES and (self.num_experts_per_tok or self.shared_expert_intermediate_size
                                                or self.router_noise or self.router != "softmax"):
                raise ConfigError(f"{arch} with num_experts=0 is dense: MoE fields must keep their defaults")
            return
        if arch in DENSE_ARCHITECTURES:
            raise ConfigError(f"{arch} is a dense architecture: an MoE needs MixtralForCausalLM, "
                              "Qwen2MoeForCausalLM or FusionMoeForCausalLM")
        if self.router not in ROUTERS:
            raise ConfigError(f"unsupported router {self.router!r} (supported: {', '.join(ROUTERS)})")
        n = self.num_routed_experts
        if not 1 <= self.num_experts_per_tok <= n:
            what = "experts 1..E-1 (expert 0 is the shared one)" if self.router == "xft" else "experts"
            raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and the "
                              f"{n} routed {what} (num_experts={self.num_experts})")
        if self.mlp_bias:
            raise ConfigError("mlp_bias is not supported in an MoE (experts have no biases)")
        if self.router_noise and self.router != "xft":
            raise ConfigError("router_noise (noisy gating) is implemented for router='xft' only")
        if self.router == "xft" and self.shared_expert_intermediate_size:
            raise ConfigError("router='xft' has its shared expert inside the stack (expert 0): "
                              "shared_expert_intermediate_size must be 0")
        if arch == "MixtralForCausalLM" and (self.router != "softmax" or self.shared_expert_intermediate_size
                                             or not self.norm_topk_prob or self.moe_intermediate_size
                                             not in (None, self.intermediate_size)):
            raise ConfigError("MixtralForCausalLM holds a softmax router with renormalised top-k weights and "
                              "no shared expert; save other MoEs as FusionMoeForCausalLM")
        if arch == "Qwen2MoeForCausalLM" and (self.router != "softmax" or not self.shared_expert_intermediate_size):
            raise ConfigError("Qwen2MoeForCausalLM holds a softmax router and a shared expert "
                              "(shared_expert_intermediate_size > 0); save other MoEs as FusionMoeForCausalLM")

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

    @property
    def attention_family(self) -> str:
        """The dense architecture whose attention and config.json fields this model follows."""
        if self.architecture == "FusionMoeForCausalLM":
            return self.base_architecture
        return _ATTENTION_FAMILY.get(self.architecture, self.architecture)

    # MoE ------------------------------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def expert_intermediate_size(self) -> int:
        return self.moe_intermediate_size or self.intermediate_size

    @property
    def num_routed_experts(self) -> int:
        """Experts the router chooses among (XFT: all but the shared expert 0)."""
        return self.num_experts - 1 if self.router == "xft" else self.num_experts

    @property
    def xft_router(self) -> bool:
        return self.is_moe and self.router == "xft"

    @property
    def softmax_router(self) -> bool:
        return self.is_moe and self.router == "softmax"

    @property
    def has_shared_expert(self) -> bool:
        """A separate (Qwen2-MoE style) shared expert, not XFT's expert 0."""
        return self.is_moe and self.shared_expert_intermediate_size > 0

    def layer_windows(self) -> tuple[int | None, ...]:
        """Sliding window per layer (None = full attention)."""
        if self.sliding_window is None:
            return (None,) * self.num_layers
        flags = self.sliding_layers or (True,) * self.num_layers
        return tuple(self.sliding_window if f else None for f in flags)

    def num_params(self, active: bool = False) -> int:
        """Number of parameters; ``active``: only those one token uses (an MoE's chosen experts)."""
        D, F, L, V = self.hidden_size, self.intermediate_size, self.num_layers, self.vocab_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = 2 * D + D * q + 2 * D * kv + q * D
        per_layer += (q + 2 * kv) * self.attention_bias + D * self.o_bias
        if self.is_moe:
            Fe, n = self.expert_intermediate_size, self.num_routed_experts
            used = self.num_experts_per_tok + (self.router == "xft") if active else self.num_experts
            per_layer += used * 3 * D * Fe
            per_layer += D * n + n * n + D * n * self.router_noise if self.router == "xft" else D * n
            if self.has_shared_expert:
                per_layer += 3 * D * self.shared_expert_intermediate_size + D
        else:
            per_layer += 3 * D * F + (2 * F + D) * self.mlp_bias
        return V * D * (1 if self.tie_word_embeddings else 2) + L * per_layer + D

    def dense_config(self) -> "ModelConfig":
        """The dense model of the same family and shapes (an MoE's FFN replaced by one expert's width)."""
        if not self.is_moe:
            return self
        return dataclasses.replace(
            self, architecture=self.attention_family, intermediate_size=self.expert_intermediate_size,
            num_experts=0, num_experts_per_tok=0, moe_intermediate_size=None, router="softmax",
            norm_topk_prob=True, shared_expert_intermediate_size=0, router_noise=False,
            base_architecture=None, extra_hf=_drop_moe_extra(self.extra_hf))

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    # -- HF ----------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Build from a config.json dict. ``source`` names the file in error messages.

        Every key of :data:`HF_FIELDS` present is checked against its JSON type and range first, so a
        string where a number belongs, zero attention heads or a ``rope_scaling`` that is not an object
        is a :class:`ConfigError` naming the file and the key, never a traceback or a silent default.
        """
        hf = check_hf_fields(hf, source)
        missing = [k for k, f in HF_FIELDS.items() if f.required and k not in hf]
        if missing:
            raise ConfigError(f"{source}: field {missing[0]!r} is missing (a decoder config needs "
                              f"{', '.join(k for k, f in HF_FIELDS.items() if f.required)})")
        archs = hf.get("architectures") or []
        if isinstance(archs, str):  # a bare name where transformers writes a one-element list
            archs = [archs]
        model_type = hf.get("model_type")
        if archs:
            arch = archs[0]
        elif model_type in _MODEL_TYPES:
            arch = _MODEL_TYPES[model_type]
        else:
            arch = model_type
        if arch not in ARCHITECTURES:
            key = "architectures" if archs else "model_type"
            raise UnknownArchitectureError(
                f"{source}: field {key!r}: architecture {arch!r} is not supported "
                f"(supported: {', '.join(ARCHITECTURES)})")
        if arch == "FusionMoeForCausalLM":
            family = hf.get("base_architecture")
            if family not in DENSE_ARCHITECTURES:
                raise ConfigError(f"{source}: field 'base_architecture': {family!r} of {arch} must be one of "
                                  f"{', '.join(DENSE_ARCHITECTURES)}")
        else:
            family = _ATTENTION_FAMILY.get(arch, arch)
        # attention and the dense fields follow the family; the MoE fields are read at the end
        model_type = ARCHITECTURES[family]
        D = hf["hidden_size"]
        H = hf["num_attention_heads"]
        kv = hf.get("num_key_value_heads") or H
        L = hf["num_hidden_layers"]
        head_dim = hf.get("head_dim") or D // H
        if not head_dim:
            raise ConfigError(f"{source}: field 'hidden_size' ({D}) is smaller than field "
                              f"'num_attention_heads' ({H}): no head_dim left")
        if H % kv:
            raise ConfigError(f"{source}: field 'num_attention_heads' ({H}) is not a multiple of field "
                              f"'num_key_value_heads' ({kv})")
        kw: dict[str, Any] = dict(
            architecture=arch, vocab_size=hf["vocab_size"], hidden_size=D,
            intermediate_size=hf["intermediate_size"], num_layers=L, num_heads=H,
            num_kv_heads=kv, head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            hidden_act=hf.get("hidden_act", "silu"),
            bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
            pad_token_id=hf.get("pad_token_id"),
        )
        if kw["hidden_act"] not in HIDDEN_ACTS:
            raise ConfigError(f"{source}: field 'hidden_act': unsupported activation {kw['hidden_act']!r} "
                              f"(supported: {', '.join(HIDDEN_ACTS)})")
        # rope: transformers>=5 "rope_parameters" (incl. rope_theta), else rope_theta + rope_scaling
        rp = dict(hf.get("rope_parameters") or {})
        rs = dict(hf.get("rope_scaling") or {})
        theta = rp.pop("rope_theta", None)
        if theta is None:
            theta = hf.get("rope_theta")
        scaling = {**rs, **rp}
        if "type" in scaling and "rope_type" not in scaling:
            scaling["rope_type"] = scaling.pop("type")
        scaling.pop("type", None)
        if scaling.get("rope_type", "default") == "default":
            scaling = {}
        if scaling.get("rope_type") not in (None,) + ROPE_TYPES:
            raise ConfigError(f"{source}: field {'rope_parameters' if 'rope_parameters' in hf else 'rope_scaling'!r}: "
                              f"unsupported rope type {scaling['rope_type']!r} (supported: {', '.join(ROPE_TYPES)})")
        kw["rope_theta"] = float(theta) if theta is not None else 10000.0
        kw["rope_scaling"] = _freeze(scaling)
        if model_type == "qwen2":
            # Qwen2-MoE names its q/k/v bias flag qkv_bias (default True); Qwen2 always has the bias
            kw["attention_bias"] = bool(hf.get("qkv_bias", True)) if arch == "Qwen2MoeForCausalLM" else True
            use_sw = bool(hf.get("use_sliding_window", False))
            sw = (hf.get("sliding_window") or None) if use_sw else None
            if sw is not None:
                kw["sliding_window"] = sw
                layer_types = hf.get("layer_types")
                mwl = int(hf.get("max_window_layers", L))
                if layer_types:
                    if len(layer_types) != L:
                        raise ConfigError(f"{source}: field 'layer_types' has {len(layer_types)} entries for "
                                          f"{L} layers (field 'num_hidden_layers')")
                    flags = tuple(t == "sliding_attention" for t in layer_types)
                elif arch == "Qwen2MoeForCausalLM":  # Qwen2MoeConfig's own default pattern
                    flags = tuple(bool((i + 1) % 2) and i < mwl for i in range(L))
                else:
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
            # (MixtralConfig's is None)
            if model_type == "mistral":
                sw = hf.get("sliding_window", 4096 if arch == "MistralForCausalLM" else None)
            else:
                sw = None
            kw["sliding_window"] = sw or None
        dt = hf.get("dtype") or hf.get("torch_dtype")
        if dt is not None:
            try:
                kw["param_dtype"] = kw["dtype"] = canonical_dtype(str(dt))
            except ConfigError:
                pass  # a dtype we do not compute in (float64, float8...): the tensors' own dtype decides
        known = set(HF_FIELDS) | {"rope_theta"}
        if arch in MOE_ARCHITECTURES:
            kw.update(_moe_fields_from_hf(arch, hf, source))
            known |= set(_MOE_KEYS)
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
        family = self.attention_family
        if family == "Qwen2ForCausalLM":
            if self.sliding_window is not None:
                flags = self.sliding_layers or (True,) * self.num_layers
                first = next(i for i, f in enumerate(flags) if f)
                out.update(use_sliding_window=True, sliding_window=self.sliding_window,
                           max_window_layers=first,
                           layer_types=["sliding_attention" if f else "full_attention" for f in flags])
            else:
                out.update(use_sliding_window=False, sliding_window=None)
                out.setdefault("max_window_layers", self.num_layers)
        elif self.architecture == "MixtralForCausalLM":  # MixtralConfig has no bias flags
            out["sliding_window"] = self.sliding_window
        else:
            out["attention_bias"] = self.attention_bias
            out["mlp_bias"] = self.mlp_bias
            if family == "MistralForCausalLM":
                out["sliding_window"] = self.sliding_window
        if self.is_moe:
            out.update(self._moe_to_hf())
        return out

    def _moe_to_hf(self) -> dict:
        if self.architecture == "MixtralForCausalLM":
            return {"num_local_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok}
        if self.architecture == "Qwen2MoeForCausalLM":
            return {"num_experts": self.num_experts, "num_experts_per_tok": self.num_experts_per_tok,
                    "moe_intermediate_size": self.expert_intermediate_size,
                    "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
                    "norm_topk_prob": self.norm_topk_prob, "qkv_bias": self.attention_bias,
                    "decoder_sparse_step": 1, "mlp_only_layers": []}
        return {"base_architecture": self.base_architecture, "num_experts": self.num_experts,
                "num_experts_per_tok": self.num_experts_per_tok,
                "moe_intermediate_size": self.moe_intermediate_size, "router": self.router,
                "norm_topk_prob": self.norm_topk_prob,
                "shared_expert_intermediate_size": self.shared_expert_intermediate_size,
                "router_noise": self.router_noise, "router_noise_eps": self.router_noise_eps,
                "balance_loss_coef": self.balance_loss_coef}


# config.json keys of HF MoE configs that mean nothing to the dense model of the same family
_MOE_ONLY_EXTRA = ("router_aux_loss_coef", "router_jitter_noise", "output_router_logits")


def _drop_moe_extra(extra: tuple | None) -> tuple | None:
    if not extra:
        return extra
    return tuple(kv for kv in extra if kv[0] not in _MOE_ONLY_EXTRA) or None


def _moe_fields_from_hf(arch: str, hf: Mapping[str, Any], source: str) -> dict:
    """ModelConfig's MoE fields from an MoE config.json (Mixtral, Qwen2-MoE or ours)."""
    try:
        if arch == "MixtralForCausalLM":
            return dict(num_experts=int(hf["num_local_experts"]),
                        num_experts_per_tok=int(hf.get("num_experts_per_tok", 2)))
        if arch == "Qwen2MoeForCausalLM":
            if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
                raise ConfigError(
                    f"{source}: decoder_sparse_step={hf.get('decoder_sparse_step')} / mlp_only_layers="
                    f"{hf.get('mlp_only_layers')} give some layers a dense FFN; fusion-jax stacks the layers "
                    "and needs every layer to be MoE (decoder_sparse_step=1, mlp_only_layers=[])")
            return dict(num_experts=int(hf["num_experts"]), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                        moe_intermediate_size=int(hf["moe_intermediate_size"]),
                        shared_expert_intermediate_size=int(hf["shared_expert_intermediate_size"]),
                        norm_topk_prob=bool(hf.get("norm_topk_prob", False)))
        mi = hf.get("moe_intermediate_size")
        return dict(num_experts=int(hf["num_experts"]), num_experts_per_tok=int(hf["num_experts_per_tok"]),
                    moe_intermediate_size=int(mi) if mi is not None else None,
                    router=str(hf.get("router", "softmax")), norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
                    shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0),
                    router_noise=bool(hf.get("router_noise", False)),
                    router_noise_eps=float(hf.get("router_noise_eps", 0.01)),
                    balance_loss_coef=float(hf.get("balance_loss_coef", 0.01)),
                    base_architecture=hf["base_architecture"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{source}: missing or invalid MoE field {e}") from e


def _hashable_json(v) -> bool:
    return isinstance(v, (str, int, float, bool, type(None))) or (
        isinstance(v, list) and all(isinstance(x, (str, int, float, bool, type(None))) for x in v))


# -- config.json schema ------------------------------------------------------------------------------
def check_hf_fields(hf: Any, source: str = "config.json") -> dict:
    """``hf`` as a dict, every key of :data:`HF_FIELDS` it has checked against its JSON type and range
    (a :class:`ConfigError` naming ``source`` and the key). Readers that keep a config.json of any
    architecture as it is (the merger) validate with this alone."""
    if not isinstance(hf, Mapping):
        raise ConfigError(f"{source}: expected a JSON object at the top level, got {_describe(hf)}")
    hf = dict(hf)
    for key, spec in HF_FIELDS.items():
        if key in hf:
            spec.check(hf[key], f"{source}: field {key!r}")
    return hf


def _describe(v: Any) -> str:
    """A JSON value as a user reads it in the file: 'the string "64"', 'a list', 'null'..."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"the boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return f"the string {v!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, Mapping):
        return "an object"
    return type(v).__name__


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    import math
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


@dataclasses.dataclass(frozen=True)
class HFField:
    """The JSON values one config.json key may hold (transformers' own annotations, plus ranges)."""

    kind: str                      # int | number | bool | str | object | token_ids | names | arch | dtype
    nullable: bool = False
    min: float | None = None       # inclusive lower bound for int / number
    max: float | None = None       # inclusive upper bound for number
    positive: bool = False         # number > 0
    required: bool = False
    values: str | None = None      # object: "str" (every value a string) or "id" (an int or a string)

    def describe(self) -> str:
        what = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
                "object": "an object", "token_ids": "a token id or a list of token ids",
                "names": "a list of names", "arch": "a list of architecture names",
                "dtype": "a dtype name such as \"bfloat16\""}[self.kind]
        if self.kind == "int" and self.min is not None:
            what = f"an integer >= {int(self.min)}"
        elif self.kind == "number" and self.positive:
            what = "a number > 0"
        elif self.kind == "number" and self.min is not None and self.max is not None:
            what = f"a number from {self.min:g} to {self.max:g}"
        elif self.kind == "number" and self.min is not None:
            what = f"a number >= {self.min:g}"
        elif self.kind == "object" and self.values == "str":
            what = "an object of strings"
        return what + (" or null" if self.nullable else "")

    def ok(self, v: Any) -> bool:
        if v is None:
            return self.nullable
        if self.kind == "int":
            return _is_int(v) and (self.min is None or v >= self.min)
        if self.kind == "number":
            return (_is_number(v) and (self.min is None or v >= self.min) and (self.max is None or v <= self.max)
                    and (not self.positive or v > 0))
        if self.kind == "bool":
            return isinstance(v, bool)
        if self.kind == "str":
            return isinstance(v, str)
        if self.kind == "object":
            if self.values == "str":
                return isinstance(v, Mapping) and all(isinstance(x, str) for x in v.values())
            if self.values == "id":
                return isinstance(v, Mapping) and all(isinstance(x, str) or _is_int(x) for x in v.values())
            return isinstance(v, Mapping)
        if self.kind == "token_ids":
            return _is_int(v) or (isinstance(v, list) and all(_is_int(x) for x in v))
        if self.kind == "names":
            return isinstance(v, list) and all(isinstance(x, str) and x for x in v)
        if self.kind == "arch":  # transformers writes a list; a bare name is read as a list of one
            return (isinstance(v, str) and bool(v)) or (isinstance(v, list) and all(isinstance(x, str) and x
                                                                                    for x in v))
        if self.kind == "dtype":
            return isinstance(v, str) and v.lower().removeprefix("torch.") in _KNOWN_DTYPE_NAMES
        raise AssertionError(self.kind)

    def check(self, v: Any, where: str) -> None:
        if not self.ok(v):
            raise ConfigError(f"{where}: expected {self.describe()}, got {_describe(v)}")
        if self.kind == "object" and v is not None:
            for key, sub in ROPE_FIELDS.items():
                if key in v:
                    sub.check(v[key], f"{where}.{key}")


_KNOWN_DTYPE_NAMES = set(_DTYPE_NAMES) | {"float64", "double", "half", "float", "bool", "int8", "uint8",
                                         "int16", "int32", "int64", "float8_e4m3fn", "float8_e5m2", "auto"}

#: Every config.json key of the Llama / Mistral / Qwen2 configs (transformers' annotations), with the
#: values accepted. Keys not listed are kept as they are (``extra_hf``) when they hold plain JSON.
HF_FIELDS: dict[str, HFField] = {
    "architectures": HFField("arch", nullable=True),
    "model_type": HFField("str"),
    "vocab_size": HFField("int", min=1, required=True),
    "hidden_size": HFField("int", min=1, required=True),
    "intermediate_size": HFField("int", min=1, required=True),
    "num_hidden_layers": HFField("int", min=1, required=True),
    "num_attention_heads": HFField("int", min=1, required=True),
    "num_key_value_heads": HFField("int", min=1, nullable=True),
    "head_dim": HFField("int", min=1, nullable=True),
    "hidden_act": HFField("str"),
    "max_position_embeddings": HFField("int", min=1),
    "initializer_range": HFField("number", min=0, max=1),
    "rms_norm_eps": HFField("number", positive=True),
    "use_cache": HFField("bool"),
    "pad_token_id": HFField("int", nullable=True),
    "bos_token_id": HFField("int", nullable=True),
    "eos_token_id": HFField("token_ids", nullable=True),
    "pretraining_tp": HFField("int", min=1, nullable=True),
    "tie_word_embeddings": HFField("bool"),
    "rope_theta": HFField("number", positive=True),
    "rope_scaling": HFField("object", nullable=True),
    "rope_parameters": HFField("object", nullable=True),
    "attention_bias": HFField("bool"),
    "attention_dropout": HFField("number", min=0, nullable=True),
    "mlp_bias": HFField("bool"),
    # 0 means no window (Qwen2-MoE writes it when use_sliding_window is false), as null does
    "sliding_window": HFField("int", min=0, nullable=True),
    "use_sliding_window": HFField("bool"),
    "max_window_layers": HFField("int", min=0),
    "layer_types": HFField("names", nullable=True),
    "dtype": HFField("dtype", nullable=True),
    "torch_dtype": HFField("dtype", nullable=True),
    "transformers_version": HFField("str", nullable=True),
    "output_hidden_states": HFField("bool", nullable=True),
    "return_dict": HFField("bool", nullable=True),
    "is_encoder_decoder": HFField("bool"),
    "chunk_size_feed_forward": HFField("int", min=0),
    "id2label": HFField("object", nullable=True, values="str"),
    "label2id": HFField("object", nullable=True, values="id"),
    "problem_type": HFField("str", nullable=True),
}

#: Keys inside ``rope_scaling`` / ``rope_parameters``.
ROPE_FIELDS: dict[str, HFField] = {
    "rope_type": HFField("str"),
    "type": HFField("str"),
    "rope_theta": HFField("number", positive=True),
    "factor": HFField("number", positive=True),
    "low_freq_factor": HFField("number", positive=True),
    "high_freq_factor": HFField("number", positive=True),
    "original_max_position_embeddings": HFField("int", min=1),
}
