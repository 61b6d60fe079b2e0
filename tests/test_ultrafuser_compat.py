"""Specialists stack into ONE graph, so they must agree on everything that graph computes with."""
from __future__ import annotations

import pytest

from fusion_jax.errors import ConfigError
from fusion_jax.models import ModelConfig
from fusion_jax.ultrafuser.model import check_compatible

BASE = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)


@pytest.mark.parametrize("field,value,what", [
    ("vocab_size", 65, "vocabularies"), ("num_layers", 3, "architectures"),
    ("rope_theta", 1e6, "architectures"), ("rms_norm_eps", 1e-5, "architectures"),
    ("hidden_act", "gelu", "architectures"), ("sliding_window", 16, "architectures"),
])
def test_any_difference_the_shared_graph_would_hide_is_refused(field, value, what):
    check_compatible([BASE, BASE.replace()], ["a", "b"])
    with pytest.raises(ConfigError, match=f"different {what}: {field}"):
        check_compatible([BASE, BASE.replace(**{field: value})], ["a", "b"])
