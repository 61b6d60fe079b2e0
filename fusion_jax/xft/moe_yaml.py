"""An MoE from several dense specialists, as ``mergekit-moe`` builds it from its YAML (mergekit 0.1.5,
``mergekit/scripts/moe.py``, ``mergekit/moe/{config,router,mixtral,qwen}.py``).

YAML keys: ``base_model`` (attention, norms, embeddings, head), ``experts`` (each ``source_model`` with
``positive_prompts`` / ``negative_prompts``, optional ``noise_scale`` / ``residual_scale``),
``gate_mode`` (hidden | cheap_embed | random | uniform_random), ``experts_per_token`` (2),
``shared_experts`` (exactly one: Qwen2-MoE output), ``dtype``, ``architecture`` (mixtral | qwen).

Router weights, as mergekit computes them (one vector per expert and layer, the rows of ``gate.weight``):

* ``hidden`` (= ``hidden_last``): tokenise ``bos + prompt`` for each prompt (LEFT padded with the BOS id,
  as mergekit sets the tokenizer), run the base model (mergekit loads it in bfloat16; so do we) and take
  the residual stream ENTERING each layer (transformers' ``hidden_states[:-1]``) at the last position,
  averaged over the prompts; minus the same for the negative prompts; L2-normalised per layer. Position
  ids are 0..S-1 for every row, padding included, as transformers uses when none are passed.
* ``cheap_embed``: the masked sum of the prompts' token embeddings, normalised, the same for every
  layer (negative prompts subtracted, normalised again).
* ``random``: N(0, 1); ``uniform_random``: U(-1/sqrt(D), 1/sqrt(D)). Drawn from our explicit seed
  (mergekit draws from torch's unseeded global generator, so no two runs of it agree).

Output: Mixtral (no shared expert; Llama / Mistral bases) or Qwen2-MoE (one shared expert, whose own
gate vector becomes ``shared_expert_gate``; ``norm_topk_prob`` true; a bias-free base gets zero q/k/v
biases), written by :func:`fusion_jax.xft.assemble.write_moe`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.errors import CheckpointError, ConfigError
from fusion_jax.hf.checkpoint import read_config
from fusion_jax.models.config import ModelConfig, canonical_dtype
from fusion_jax.utils.configs import as_mapping
from fusion_jax.xft.assemble import ExpertSource, write_moe

GATE_MODES = ("hidden", "hidden_last", "cheap_embed", "random", "uniform_random")
_KEYS = {"base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts", "architecture"}
_EXPERT_KEYS = {"source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"}


@dataclasses.dataclass(frozen=True)
class Expert:
    source_model: Path
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclasses.dataclass(frozen=True)
class MoEYaml:
    base_model: Path
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = 2
    shared_experts: tuple[Expert, ...] = ()
    architecture: str | None = None


def _model_path(value: Any, where: str) -> Path:
    """A local model directory (relative to the working directory, as mergekit resolves it)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model directory, got {value!r}")
    p = Path(value).absolute()
    if not (p / "config.json").is_file():
        if "+" in value or "@" in value:
            raise ConfigError(f"{where}: {value!r}: LoRA (+) and revision (@) references are not supported; "
                              "give a local model directory")
        raise CheckpointError(f"{where}: {value}: no such model directory (no config.json)")
    return p


def _prompts(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str) or not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(value)


def _expert(d: Any, where: str) -> Expert:
    d = as_mapping(d, where, sorted(_EXPERT_KEYS))
    if "source_model" not in d:
        raise ConfigError(f"{where}.source_model: missing")
    kw = {}
    for k in ("noise_scale", "residual_scale"):
        if d.get(k) is not None:
            if isinstance(d[k], bool) or not isinstance(d[k], (int, float)):
                raise ConfigError(f"{where}.{k}: expected a number, got {d[k]!r}")
            kw[k] = float(d[k])
    return Expert(_model_path(d["source_model"], f"{where}.source_model"),
                  _prompts(d.get("positive_prompts"), f"{where}.positive_prompts"),
                  _prompts(d.get("negative_prompts"), f"{where}.negative_prompts"), **kw)


def read_moe_yaml(path: str | os.PathLike, *, allow_all_same: bool = False) -> MoEYaml:
    """Parse and check a mergekit-moe YAML (the checks of mergekit's ``is_bad_config`` included)."""
    import yaml
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror or e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(raw) - _KEYS
    if unknown:
        raise ConfigError(f"{path}: {sorted(unknown)[0]}: unknown option (known: {', '.join(sorted(_KEYS))})")
    if "base_model" not in raw:
        raise ConfigError(f"{path}: base_model: missing")
    if not isinstance(raw.get("experts"), list) or not raw["experts"]:
        raise ConfigError(f"{path}: experts: expected a non-empty list")
    experts = tuple(_expert(d, f"experts[{i}]") for i, d in enumerate(raw["experts"]))
    shared = tuple(_expert(d, f"shared_experts[{i}]") for i, d in enumerate(raw.get("shared_experts") or []))
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise ConfigError(f"{path}: gate_mode: {mode!r} is not supported (supported: {', '.join(GATE_MODES)}; "
                          "hidden_avg averages over padded positions and is left out)")
    k = raw.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"{path}: experts_per_token: must be an integer >= 1, got {k!r}")
    if len(experts) < k:
        raise ConfigError(f"{path}: experts_per_token={k} but only {len(experts)} experts are listed")
    arch = raw.get("architecture")
    if arch is not None and str(arch).lower() not in ("mixtral", "qwen"):
        raise ConfigError(f"{path}: architecture: {arch!r} is not supported (mixtral or qwen)")
    dtype = raw.get("dtype")
    if dtype is not None:
        try:
            dtype = canonical_dtype(str(dtype))
        except ConfigError:
            raise ConfigError(f"{path}: dtype: {dtype!r} is not supported (float32, bfloat16 or float16)") from None
    cfg = MoEYaml(_model_path(raw["base_model"], "base_model"), experts, mode, dtype, k, shared,
                  None if arch is None else str(arch).lower())
    if mode not in ("random", "uniform_random"):
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise ConfigError(f"{path}: experts[{i}].positive_prompts: gate_mode {mode} needs prompts")
        first = (experts[0].positive_prompts, experts[0].negative_prompts)
        if len(experts) > 1 and all((e.positive_prompts, e.negative_prompts) == first for e in experts[1:]):
            raise ConfigError(f"{path}: every expert has the same prompts: the router could not tell them apart")
    if not allow_all_same and len(experts) > 1 and all(e.source_model == experts[0].source_model for e in experts):
        raise ConfigError(f"{path}: every expert is the same model ({experts[0].source_model}): the MoE would "
                          "compute the same function at a higher cost (pass --allow-all-same to build it "
                          "anyway, e.g. to train it)")
    if shared:
        has = [bool(e.positive_prompts) for e in shared]
        if any(has) and not all(has):
            raise ConfigError(f"{path}: shared_experts: give prompts to every shared expert or to none")
    return cfg


# -- output architecture ---------------------------------------------------------------------------
def output_config(cfg: MoEYaml, base: ModelConfig) -> ModelConfig:
    """The MoE's ModelConfig: mergekit's choice (Qwen2-MoE with a shared expert, else Mixtral)."""
    if base.is_moe:
        raise ConfigError(f"base_model {cfg.base_model}: is already an MoE ({base.architecture})")
    qwen = bool(cfg.shared_experts)
    if cfg.architecture == "mixtral" and qwen:
        raise ConfigError("architecture: mixtral has no shared experts (remove shared_experts or use qwen)")
    if cfg.architecture == "qwen" and not qwen:
        raise ConfigError("architecture: qwen needs exactly one entry in shared_experts")
    moe = dict(num_experts=len(cfg.experts), num_experts_per_tok=cfg.experts_per_token, router="softmax",
               norm_topk_prob=True, sliding_window=None, sliding_layers=None)
    if not qwen:
        if base.attention_family not in ("LlamaForCausalLM", "MistralForCausalLM") or base.attention_bias:
            raise ConfigError(f"base_model {cfg.base_model}: a Mixtral output needs a Llama or Mistral base "
                              f"without attention biases (got {base.architecture}); add a shared expert for "
                              "a Qwen2-MoE output")
        return base.replace(architecture="MixtralForCausalLM", **moe)
    if len(cfg.shared_experts) != 1:
        raise ConfigError(f"shared_experts: Qwen2-MoE takes exactly one shared expert, got {len(cfg.shared_experts)}")
    if cfg.gate_mode not in ("random", "uniform_random") and not cfg.shared_experts[0].positive_prompts:
        raise ConfigError("shared_experts[0].positive_prompts: the Qwen2-MoE shared expert gate needs prompts")
    if base.o_bias:
        raise ConfigError(f"base_model {cfg.base_model}: Qwen2-MoE has no o_proj bias")
    return base.replace(architecture="Qwen2MoeForCausalLM", attention_bias=True, o_bias=False,
                        moe_intermediate_size=base.intermediate_size,
                        shared_expert_intermediate_size=base.intermediate_size, **moe)


# -- gates -------------------------------------------------------------------------------------------
def _tokenizer(base_dir: Path):
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(base_dir))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"base_model {base_dir}: cannot load its tokenizer ({e}); gate_mode hidden and "
                              "cheap_embed tokenise the prompts") from e
    # mergekit-moe's settings: left padding with the BOS id (EOS when there is no BOS)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _tokenize(tok, prompts) -> tuple[np.ndarray, np.ndarray]:
    enc = tok([(tok.bos_token or "") + p for p in prompts], return_tensors="np", padding=True,
              add_special_tokens=False)
    return np.asarray(enc["input_ids"], np.int32), np.asarray(enc["attention_mask"], np.int32)


def _normalize(v: np.ndarray) -> np.ndarray:
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-8)


def gate_vectors(cfg: MoEYaml, *, seed: int = 0, hidden_dtype: str = "bfloat16") -> np.ndarray:
    """``[L, G, D]`` float32 router rows: one per expert, then one per shared expert that has prompts
    (or in a random mode), in mergekit's order. ``hidden_dtype``: the base model's dtype for ``hidden``."""
    base = read_config(cfg.base_model)
    L, D, V = base.num_layers, base.hidden_size, base.vocab_size
    need = list(cfg.experts)
    random = cfg.gate_mode in ("random", "uniform_random")
    if cfg.shared_experts and (random or any(e.positive_prompts for e in cfg.shared_experts)):
        need += list(cfg.shared_experts)
    if random:
        key = jax.random.key(seed)
        if cfg.gate_mode == "random":
            return np.asarray(jax.random.normal(key, (L, len(need), D), jnp.float32))
        scale = 1.0 / np.sqrt(D)
        return np.asarray(jax.random.uniform(key, (L, len(need), D), jnp.float32, -scale, scale))
    tok = _tokenizer(cfg.base_model)
    if cfg.gate_mode == "cheap_embed":
        from fusion_jax.hf.checkpoint import open_checkpoint
        _, reader = open_checkpoint(cfg.base_model)
        try:
            embed = reader.get("model.embed_tokens.weight").astype(np.float32)
        finally:
            reader.close()

        def state(prompts):
            ids, mask = _tokenize(tok, prompts)
            if ids.max(initial=0) >= V:
                raise ConfigError(f"base_model {cfg.base_model}: its tokenizer yields ids >= vocab_size {V}")
            e = (embed[ids] * mask[..., None]).sum(axis=(0, 1))[None]
            return np.repeat(_normalize(e), L, axis=0)
    else:
        state = _hidden_state_fn(cfg.base_model, tok, hidden_dtype)
    vecs = []
    for e in need:
        v = state(e.positive_prompts)
        if e.negative_prompts:
            v = v - state(e.negative_prompts)
        vecs.append(_normalize(v))
    return np.stack(vecs, axis=1).astype(np.float32)


def _hidden_state_fn(base_dir: Path, tok, dtype: str):
    """prompts -> [L, D]: the last position's residual stream entering each layer, mean over prompts."""
    from flax import nnx

    from fusion_jax.hf import load_model
    model = load_model(base_dir, param_dtype=dtype, dtype=dtype)
    V = model.config.vocab_size
    graphdef, state = nnx.split(model)

    @jax.jit
    def layer_inputs(state, ids, mask, pos):
        out = nnx.merge(graphdef, state)(ids, attention_mask=mask, positions=pos, return_logits=False,
                                         return_layer_inputs=True)
        return out.layer_inputs[:, :, -1, :].astype(jnp.float32).mean(axis=1)

    def fn(prompts):
        ids, mask = _tokenize(tok, prompts)
        if ids.max(initial=0) >= V:
            raise ConfigError(f"base_model {base_dir}: its tokenizer yields ids >= vocab_size {V}")
        pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
        return np.asarray(layer_inputs(state, ids, mask, pos))
    return fn


# -- build -------------------------------------------------------------------------------------------
def build_moe(config_path: str | os.PathLike, out_dir: str | os.PathLike, *, seed: int = 0,
              allow_all_same: bool = False, hidden_dtype: str = "bfloat16", overwrite: bool = False) -> Path:
    """``fusion-jax moe CONFIG.yml OUT``: parse, compute the gates, write the MoE checkpoint."""
    cfg = read_moe_yaml(config_path, allow_all_same=allow_all_same)
    base = read_config(cfg.base_model)
    moe_config = output_config(cfg, base)
    gates = gate_vectors(cfg, seed=seed, hidden_dtype=hidden_dtype)      # [L, G, D]
    E = len(cfg.experts)
    computed = {("layers", "mlp", "router", "kernel"): np.swapaxes(gates[:, :E], 1, 2)}   # ours: [L, D, E]
    shared = None
    if moe_config.has_shared_expert:
        s = cfg.shared_experts[0]
        shared = ExpertSource(s.source_model, s.noise_scale, s.residual_scale)
        computed[("layers", "mlp", "shared_expert_gate", "kernel")] = np.swapaxes(gates[:, E:E + 1], 1, 2)
    experts = [ExpertSource(e.source_model, e.noise_scale, e.residual_scale) for e in cfg.experts]
    return write_moe(out_dir, moe_config, cfg.base_model, experts, computed, shared=shared, dtype=cfg.dtype,
                     key=jax.random.key(seed), overwrite=overwrite)
