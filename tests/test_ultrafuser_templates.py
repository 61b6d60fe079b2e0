"""Specialist templates from the config: a format string, or "chat" for the tokenizer's chat template."""
from __future__ import annotations

import numpy as np
import pytest

from fusion_jax.data.templates import encode_prompts
from fusion_jax.data.tokenizer import train_tokenizer
from fusion_jax.errors import ConfigError
from fusion_jax.ultrafuser import config as ucfg
from fusion_jax.ultrafuser.data import CHAT_TEMPLATE, render_sets, templates_from_config


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    texts = ["the quick brown fox jumps over the lazy dog", "def add(a, b): return a + b", "2 + 2 = 4"] * 30
    return train_tokenizer(texts, tmp_path_factory.mktemp("tok") / "t", vocab_size=300, min_frequency=1)


def test_chat_word_uses_the_tokenizers_chat_template_and_responses_stay_aligned(tok):
    ts = templates_from_config(["text", "chat"], {"text": "Q: {prompt}\nA: ", "chat": CHAT_TEMPLATE})
    assert not ts[0].chat and ts[1].chat
    want = tok.apply_chat_template([{"role": "user", "content": "add two numbers"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok.decode(encode_prompts(tok, ts[1], ["add two numbers"])[0]) == want
    ex = {"text": [{"prompt": "add two numbers", "response": "def add(a, b): return a + b"}]}
    arr = render_sets(tok, ex, ts, seq_len=64, max_prompt_len=40)["text"]
    ids, mask = arr["input_ids"][0], arr["loss_mask"][0]
    # the response tokens sit at the same positions in both templates' rows
    resp = np.flatnonzero(mask)
    assert len(resp) and np.array_equal(ids[0, resp], ids[1, resp])
    assert not np.array_equal(ids[0], ids[1])


def test_config_accepts_chat_and_rejects_a_template_without_prompt():
    c = ucfg.get_config("smoke")
    c.specialists.templates.code = CHAT_TEMPLATE
    ucfg.validate(c)
    c.specialists.templates.code = "no placeholder"
    with pytest.raises(ConfigError, match="specialists.templates.code"):
        ucfg.validate(c)


def test_bos_can_be_left_out_for_tokenizers_without_one(tok):
    with_bos, without = (templates_from_config(["a"], {"a": "Q: {prompt}\nA: "}, bos=b)[0] for b in (True, False))
    a, b = encode_prompts(tok, with_bos, ["hi"])[0], encode_prompts(tok, without, ["hi"])[0]
    assert a[0] == tok.bos_token_id and a[1:] == b and tok.bos_token_id not in b


def test_chat_templates_render_the_whole_conversation_before_the_response(tok, tmp_path):
    """A multi-turn chat row: the chat template sees the system turn and every earlier turn; a
    format-string template renders the last user turn; the response stays aligned in both rows."""
    import json

    from fusion_jax.data.loading import load_examples
    turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2 + 2"},
             {"role": "assistant", "content": "4"}, {"role": "user", "content": "add two numbers"},
             {"role": "assistant", "content": "def add(a, b): return a + b"}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": turns}) + "\n")
    ex = load_examples(f, domain="text", cache_dir=tmp_path / "cache")
    ts = templates_from_config(["text", "chat"], {"text": "Q: {prompt}\nA: ", "chat": CHAT_TEMPLATE})
    want = tok.apply_chat_template(turns[:4], tokenize=False, add_generation_prompt=True)
    assert "be brief" in want and "2 + 2" in want
    assert tok.decode(encode_prompts(tok, ts[1], [ex[0]["prompt"]], [ex[0]["messages"]])[0]) == want
    assert tok.decode(encode_prompts(tok, ts[0], [ex[0]["prompt"]])[0][1:]) == "Q: add two numbers\nA: "
    arr = render_sets(tok, {"text": ex}, ts, seq_len=128, max_prompt_len=100)["text"]
    ids, mask = arr["input_ids"][0], arr["loss_mask"][0]
    resp = np.flatnonzero(mask)
    assert len(resp) and np.array_equal(ids[0, resp], ids[1, resp])
    chat_prompt = encode_prompts(tok, ts[1], [ex[0]["prompt"]], [ex[0]["messages"]])[0]
    row = ids[1][arr["attention_mask"][0, 1].astype(bool)]
    assert list(row[:len(chat_prompt)]) == chat_prompt  # the chat row carries the earlier turns
