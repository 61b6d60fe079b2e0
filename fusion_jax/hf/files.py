"""File names of a Hugging Face model directory, and reading / copying its small JSON files with errors
that name the file (no heavy imports: the merger and the loaders share it).

The generation config and the tokenizer files are passed through unchanged when a checkpoint is
converted or merged, but each JSON one must parse (UTF-8, a JSON object) before it is copied: a damaged
one would otherwise be copied into an output that transformers then refuses to load. The generation
config's token ids are also checked, since generation stops on them.
"""
from __future__ import annotations

import codecs
import json
import os
import shutil
from pathlib import Path
from typing import Any

from fusion_jax.errors import CheckpointError, FusionError

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
# Everything a tokenizer may consist of; copied alongside converted or merged weights.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
#: passthrough files that must hold a JSON object
JSON_FILES = (GENERATION_CONFIG_NAME, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "vocab.json", "added_tokens.json", "chat_template.json")
#: passthrough files that must be UTF-8 text
TEXT_FILES = ("merges.txt", "chat_template.jinja")

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"),
         (codecs.BOM_UTF16_BE, "UTF-16"))


def read_text(path: str | os.PathLike, error: type[FusionError] = CheckpointError) -> str:
    """A UTF-8 text file's contents; ``error`` (naming the file) if it is missing, unreadable or not
    UTF-8 (a UTF-16 or UTF-32 file, as some Windows editors save, is named as such)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from e
    for bom, name in _BOMS:
        if raw.startswith(bom):
            raise error(f"{path}: the file is {name} text; save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start} is {raw[e.start]:#04x}): the file is damaged "
                    "or not what its name says") from None


def read_json(path: str | os.PathLike, error: type[FusionError] = CheckpointError, *,
              expect: type | None = dict) -> Any:
    """Parse a JSON file; ``error`` naming it when it is unreadable, not UTF-8, not JSON (line and column
    given) or, with ``expect``, not of that type (a JSON object by default)."""
    path = Path(path)
    text = read_text(path, error)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): the file is "
                    "truncated or damaged") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    if expect is not None and not isinstance(value, expect):
        want = {dict: "a JSON object", list: "a JSON list"}.get(expect, expect.__name__)
        got = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
               int: "a number", float: "a number"}.get(type(value), type(value).__name__)
        raise error(f"{path}: expected {want} at the top level, got {got}")
    return value


def check_generation_config(path: str | os.PathLike, config: dict) -> None:
    """The generation config's token ids, which generation stops on: ints or lists of ints (or null)."""
    from fusion_jax.models.config import HFField
    ids = HFField("token_ids", nullable=True)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if key in config:
            ids.check(config[key], f"{path}: field {key!r}")


def check_passthrough_files(src: str | os.PathLike) -> list[str]:
    """Check the generation config and tokenizer files present in ``src`` (see the module docstring);
    returns the names present. Raises CheckpointError naming the first damaged file."""
    src = Path(src)
    present = [f for f in (GENERATION_CONFIG_NAME,) + TOKENIZER_FILES if (src / f).is_file()]
    for f in present:
        if f in JSON_FILES:
            value = read_json(src / f)
            if f == GENERATION_CONFIG_NAME:
                check_generation_config(src / f, value)
        elif f in TEXT_FILES:
            read_text(src / f)
    return present


def copy_passthrough_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the generation config and tokenizer files from ``src`` to ``dst`` after checking them."""
    src, dst = Path(src), Path(dst)
    present = check_passthrough_files(src)
    for f in present:
        shutil.copyfile(src / f, dst / f)
    return present
