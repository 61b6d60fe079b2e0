"""transformers config of an UltraFuser fused model exported by fusion-jax (see modeling_ultrafuser.py)."""
from transformers import PretrainedConfig


class UltraFuserConfig(PretrainedConfig):
    model_type = "ultrafuser_fused"

    def __init__(self, specialists=(), gate_hidden_size=512, hidden_size=0, vocab_size=0, **kwargs):
        self.specialists = list(specialists)          # subdirectories of specialists/, in gate order
        self.gate_hidden_size = int(gate_hidden_size)
        self.hidden_size = int(hidden_size)
        self.vocab_size = int(vocab_size)
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
