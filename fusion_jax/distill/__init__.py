"""FuseLLM / FuseChat distillation."""
