"""The fused model: N specialists stacked on an "expert" axis plus one shared gate.

``FusedModel`` holds one graphdef (all specialists share an architecture), the specialists' params as a
pure-dict pytree with a leading expert axis, and the gate params. Forward and loss run all specialists in
one ``jax.vmap``; see :mod:`fusion_jax.ultrafuser.fusion` for the math. Decoding (greedy, sampling, stop
strings) is :mod:`fusion_jax.ultrafuser.decoding` on the engine of :mod:`fusion_jax.eval.generation`.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fusion_jax.errors import ConfigError
from fusion_jax.ultrafuser import fusion
from fusion_jax.ultrafuser.gate import GateConfig, init_gate


def check_compatible(configs: Sequence[Any], names: Sequence[str]) -> None:
    """All specialists must share architecture, shapes and vocabulary (one tokenizer, stacked params),
    and everything else the one shared graph computes with (rope, norm eps, activation, windows): the
    stacked forward runs every specialist with the first one's config, and the export writes it."""
    ref = configs[0]
    keys = ("architecture", "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
            "num_kv_heads", "head_dim", "tie_word_embeddings", "attention_bias", "o_bias", "mlp_bias",
            "rope_theta", "rope_scaling", "rms_norm_eps", "hidden_act", "sliding_window", "sliding_layers",
            "max_position_embeddings")
    for cfg, name in zip(configs[1:], names[1:]):
        for k in keys:
            a, b = getattr(ref, k, None), getattr(cfg, k, None)
            if a != b:
                what = "vocabularies" if k == "vocab_size" else "architectures"
                raise ConfigError(
                    f"specialists {names[0]!r} and {name!r} have different {what}: {k} = {a} vs {b} "
                    "(UltraFuser stacks specialists of one architecture and one tokenizer)")


@dataclasses.dataclass
class FusedModel:
    graphdef: Any                     # nnx GraphDef of one specialist (CausalLM)
    config: Any                       # its ModelConfig
    params: Any                       # pure dict, every leaf [K, ...]
    gate: dict                        # gate params
    gate_config: GateConfig
    names: tuple[str, ...]

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_models(cls, models: Sequence[nnx.Module], names: Sequence[str], *, gate: dict | None = None,
                    gate_hidden: int = 512, key: jax.Array | None = None) -> "FusedModel":
        if len(models) != len(names):
            raise ConfigError("one name per specialist is required")
        check_compatible([m.config for m in models], list(names))
        splits = [nnx.split(m, nnx.Param) for m in models]
        graphdef = splits[0][0]
        params = fusion.stack_trees([nnx.to_pure_dict(s[1]) for s in splits])
        cfg = models[0].config
        gcfg = GateConfig(input_size=cfg.hidden_size, hidden_size=gate_hidden, num_experts=len(models),
                          specialist_names=tuple(names))
        if gate is None:
            gate = init_gate(key if key is not None else jax.random.key(0), gcfg)
        return cls(graphdef, cfg, params, gate, gcfg, tuple(names))

    @property
    def num_experts(self) -> int:
        return len(self.names)

    def specialist_params(self, k: int):
        return fusion.unstack_tree(self.params, k)

    def specialist(self, k: int) -> nnx.Module:
        return nnx.merge(self.graphdef, self.specialist_params(k))

    # -- per-specialist functions (vmapped by fusion.*) ----------------------------------------------
    def hidden_fn(self, p, ids, mask):
        return nnx.merge(self.graphdef, p)(ids, attention_mask=mask, return_hidden=True,
                                           return_logits=False).hidden

    def head_fn(self, p, h):
        return nnx.merge(self.graphdef, p).logits_from_hidden(h)

    def loss(self, params, gate, batch, chunk: int = 128):
        return fusion.fused_loss(self.hidden_fn, self.head_fn, params, gate, batch, chunk)

    def logits(self, params, gate, input_ids, attention_mask):
        """Full fused logits [B,S,V] and gate weights [K,B,S] (small inputs only)."""
        hidden = fusion.stacked_hidden(self.hidden_fn, params, input_ids, attention_mask)
        return fusion.fused_logits(self.head_fn, params, gate, hidden)

    # -- training through fusion_jax.train.Trainer ------------------------------------------------------
    def train_params(self) -> dict:
        """The params pytree the trainer holds: ``{"specialists": stacked params, "gate": gate}``.
        Stage 1 trains ``^gate/`` only (specialists frozen: no gradients, no optimizer state)."""
        return {SPECIALISTS: self.params, GATE: self.gate}

    def set_train_params(self, tree: dict) -> "FusedModel":
        self.params, self.gate = tree[SPECIALISTS], tree[GATE]
        return self

    def train_logical_axes(self) -> dict:
        """Logical axes matching :meth:`train_params` (the gate is small: replicated)."""
        return {SPECIALISTS: self.logical_axes(),
                GATE: jax.tree.map(lambda x: (None,) * np.ndim(x), self.gate)}

    def trainer_loss_fn(self, chunk: int = 128):
        """``loss_fn(params, batch, rng)`` for :class:`fusion_jax.train.Trainer` (see :func:`trainer_loss`)."""
        return partial(trainer_loss, self.hidden_fn, self.head_fn, self.names, int(chunk))

    # -- sharding -------------------------------------------------------------------------------------
    def logical_axes(self):
        """Pure-dict tree of logical axes for the stacked params: ("expert",) + each param's axes."""
        from fusion_jax.models import param_logical_axes
        axes = param_logical_axes(self.config)
        return jax.tree.map(lambda ax: ("expert",) + tuple(ax), axes, is_leaf=lambda x: isinstance(x, tuple))

    def shardings(self, mesh: Mesh, rules=None):
        from fusion_jax import sharding
        p_sh = sharding.logical_to_mesh_sharding(self.logical_axes(), mesh, rules, shapes=self.params)
        g_sh = jax.tree.map(lambda _: NamedSharding(mesh, P()), self.gate)
        return p_sh, g_sh


SPECIALISTS, GATE = "specialists", "gate"


def to_fused_batch(batch: dict) -> dict:
    """Trainer layout -> :func:`fusion.fused_loss` layout.

    In: ``input_ids``/``attention_mask`` [B, K, S] (example first, as the trainer and the sampler want),
    ``loss_mask`` [B, S] with 1 where ``input_ids[:, k, t]`` is a response token (the
    :mod:`fusion_jax.data.templates` convention). Out: ids/mask [K, B, S]; ``labels[t]`` = the token
    position t predicts (``input_ids[:, 0, t + 1]``: response tokens are the same in all K rows) and
    ``loss_mask[t]`` shifted to match.
    """
    ids = jnp.asarray(batch["input_ids"])
    first = ids[:, 0]
    return {
        "input_ids": jnp.swapaxes(ids, 0, 1),
        "attention_mask": jnp.swapaxes(jnp.asarray(batch["attention_mask"]), 0, 1),
        "labels": jnp.pad(first[:, 1:], ((0, 0), (0, 1))),
        "loss_mask": jnp.pad(jnp.asarray(batch["loss_mask"], jnp.float32)[:, 1:], ((0, 0), (0, 1))),
    }


def trainer_loss(hidden_fn, head_fn, names, chunk, params, batch, rng):
    """Mean response-token CE of the fused model; aux: ``num_tokens`` and the mean gate weight of each
    specialist over response tokens (``gate_weight/<name>``)."""
    del rng
    loss, aux = fusion.fused_loss(hidden_fn, head_fn, params[SPECIALISTS], params[GATE],
                                  to_fused_batch(batch), chunk)
    n = jnp.maximum(aux["tokens"], 1.0)
    out = {"num_tokens": aux["tokens"]}
    for k, name in enumerate(names):
        out[f"gate_weight/{name}"] = aux["gate_weight_sum"][k] / n
    return loss, out
