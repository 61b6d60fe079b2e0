"""The UltraFuser gate: one small MLP shared by every specialist.

``g(h) = w2 . relu(W1 h + b1) + b2`` maps one specialist's last hidden state ``h`` ([D], the final
RMSNorm'ed state) to a scalar; the mixture weights of a token are ``softmax_k g(h_k)`` over the N
specialists (arXiv 2403.08281, section 3). Params are a plain dict pytree so that they save as
safetensors as they are.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.errors import CheckpointError

GATE_WEIGHTS = "gate.safetensors"
GATE_CONFIG = "gate_config.json"


@dataclasses.dataclass(frozen=True)
class GateConfig:
    input_size: int            # the specialists' hidden size D
    hidden_size: int = 512     # the paper's gate width
    num_experts: int = 3
    specialist_names: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["specialist_names"] = list(self.specialist_names)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "GateConfig":
        d = dict(d)
        d["specialist_names"] = tuple(d.get("specialist_names", ()))
        return cls(**{k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}})


def init_gate(key: jax.Array, cfg: GateConfig) -> dict:
    """He-normal first layer; zero second layer so that training starts from uniform weights."""
    k1, _ = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (cfg.input_size, cfg.hidden_size), jnp.float32)
        * np.sqrt(2.0 / cfg.input_size),
        "b1": jnp.zeros((cfg.hidden_size,), jnp.float32),
        "w2": jnp.zeros((cfg.hidden_size,), jnp.float32),
        "b2": jnp.zeros((), jnp.float32),
    }


def gate_scores(gate: dict, hidden: jax.Array) -> jax.Array:
    """[..., D] -> [...] scalar scores, computed in float32."""
    h = hidden.astype(jnp.float32)
    z = jax.nn.relu(h @ gate["w1"] + gate["b1"])
    return z @ gate["w2"] + gate["b2"]


def gate_weights(gate: dict, hidden: jax.Array) -> jax.Array:
    """Stacked hidden states [K, ..., D] -> mixture weights [K, ...] (softmax over the K specialists)."""
    return jax.nn.softmax(gate_scores(gate, hidden), axis=0)


def save_gate(gate: dict, cfg: GateConfig, out_dir: str | Path) -> None:
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"gate.{k}": np.asarray(jax.device_get(v), np.float32) for k, v in gate.items()}
    save_file(tensors, str(out / GATE_WEIGHTS), metadata={"format": "fusion_jax.ultrafuser.gate"})
    (out / GATE_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def load_gate(in_dir: str | Path) -> tuple[dict, GateConfig]:
    from safetensors.numpy import load_file

    d = Path(in_dir)
    for name in (GATE_WEIGHTS, GATE_CONFIG):
        if not (d / name).is_file():
            raise CheckpointError(f"gate file {d / name} does not exist")
    cfg = GateConfig.from_dict(json.loads((d / GATE_CONFIG).read_text()))
    raw = load_file(str(d / GATE_WEIGHTS))
    gate = {}
    want = {"w1": (cfg.input_size, cfg.hidden_size), "b1": (cfg.hidden_size,), "w2": (cfg.hidden_size,), "b2": ()}
    for k, shape in want.items():
        name = f"gate.{k}"
        if name not in raw:
            raise CheckpointError(f"{d / GATE_WEIGHTS}: tensor {name} is missing")
        if tuple(raw[name].shape) != shape:
            raise CheckpointError(f"{d / GATE_WEIGHTS}: tensor {name} has shape {raw[name].shape}, expected {shape}")
        gate[k] = jnp.asarray(raw[name])
    return gate, cfg
