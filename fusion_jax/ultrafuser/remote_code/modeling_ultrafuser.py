"""An UltraFuser fused model (arXiv 2403.08281) exported by fusion-jax, as a transformers model.

    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

K specialists (HF checkpoints under ``specialists/<name>/``, loaded with ``AutoModelForCausalLM``) read
the same tokens; a gate ``g(h) = w2 . relu(h W1 + b1) + b2`` scores each specialist's final hidden state;
the fused logits are ``sum_k softmax_k(g(h_k)) * logits_k`` (``gate.safetensors``). One token sequence
feeds every specialist (what HF tools pass; fusion-jax can also give each specialist the prompt in its
own template). There is no KV cache: each step re-reads the whole sequence, so it is exact everywhere and
slow for long generations (fusion-jax's decoder caches per specialist).
"""
import os

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_ultrafuser import UltraFuserConfig


class UltraFuserForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = UltraFuserConfig
    base_model_prefix = "fused"
    main_input_name = "input_ids"

    def __init__(self, config, specialists=None):
        super().__init__(config)
        self.specialists = torch.nn.ModuleList(specialists or [])
        D, H = config.hidden_size, config.gate_hidden_size
        self.gate_w1 = torch.nn.Parameter(torch.zeros(D, H))
        self.gate_b1 = torch.nn.Parameter(torch.zeros(H))
        self.gate_w2 = torch.nn.Parameter(torch.zeros(H))
        self.gate_b2 = torch.nn.Parameter(torch.zeros(()))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, config=None, **kwargs):
        """Load the specialists (``specialists/<name>/``) and the gate (``gate.safetensors``) of a local
        export directory. ``dtype``/``torch_dtype``/``attn_implementation`` are passed to the specialists."""
        from safetensors.torch import load_file
        root = str(pretrained_model_name_or_path)
        if not os.path.isdir(root):
            raise OSError(f"{root}: an UltraFuser export is a local directory")
        if not isinstance(config, UltraFuserConfig):
            config = UltraFuserConfig.from_pretrained(root)
        keep = {k: kwargs[k] for k in ("dtype", "torch_dtype", "attn_implementation", "device_map") if k in kwargs}
        specs = [AutoModelForCausalLM.from_pretrained(os.path.join(root, "specialists", n), **keep)
                 for n in config.specialists]
        model = cls(config, specs)
        gate = load_file(os.path.join(root, "gate.safetensors"))
        with torch.no_grad():
            for k in ("w1", "b1", "w2", "b2"):
                getattr(model, f"gate_{k}").copy_(gate[f"gate.{k}"].to(torch.float32))
        return model.eval()

    def _supports_default_dynamic_cache(self=None):   # no KV cache (see the module docstring)
        return False

    def get_input_embeddings(self):
        return self.specialists[0].get_input_embeddings()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids=None, attention_mask=None, labels=None, return_gate_weights=False, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        # positions count real tokens (0 on left padding), as the specialists' own generate does
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        scores, logits = [], []
        for spec in self.specialists:
            body = getattr(spec, spec.base_model_prefix)       # the decoder without its lm_head
            h = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     use_cache=False).last_hidden_state          # after the final norm
            logits.append(spec.get_output_embeddings()(h).to(torch.float32))
            h = h.to(torch.float32)
            scores.append(torch.relu(h @ self.gate_w1 + self.gate_b1) @ self.gate_w2 + self.gate_b2)
        w = torch.softmax(torch.stack(scores), dim=0)           # [K, B, S]
        fused = torch.einsum("kbs,kbsv->bsv", w, torch.stack(logits))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(fused[:, :-1].reshape(-1, fused.shape[-1]),
                                                     labels[:, 1:].reshape(-1), ignore_index=-100)
        out = CausalLMOutputWithPast(loss=loss, logits=fused)
        if return_gate_weights:
            out["gate_weights"] = w
        return out
