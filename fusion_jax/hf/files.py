"""File names of a Hugging Face model directory (no heavy imports: the merger and the loaders share it)."""
from __future__ import annotations

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Everything a tokenizer may consist of; copied alongside converted or merged weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
