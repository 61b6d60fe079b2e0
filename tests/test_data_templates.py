"""Prompt templates: aligned response tokens across templates, response-only loss masks, truncation."""
import numpy as np
import pytest

from hf_fixtures import make_tiny_tokenizer

from fusion_jax.data.templates import (PromptTemplate, layout_multi, render_dataset, render_example,
                                       render_multi, split_by_domain)
from fusion_jax.errors import DataError

TEMPLATES = [PromptTemplate("a", "User: {prompt}\nAssistant:\n"), PromptTemplate("b", "[INST] {prompt} [/INST]"),
             PromptTemplate("c", "### Instruction:\n{prompt}\n\n### Response: Let's think step by step.\n")]
EXAMPLES = [{"domain": "text", "prompt": "the quick brown fox", "response": "jumps over the lazy dog"},
            {"domain": "code", "prompt": "def add(a, b):", "response": "return a + b"},
            {"domain": "math", "prompt": "2 + 2", "response": "= 4"}]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(tmp_path_factory.mktemp("tok")))


def test_response_tokens_aligned_across_templates(tok):
    S = 192  # long enough that nothing is truncated
    r = render_dataset(tok, EXAMPLES, TEMPLATES, S)
    N, K = len(EXAMPLES), len(TEMPLATES)
    assert r["input_ids"].shape == (N, K, S) and r["loss_mask"].shape == (N, S)
    for n, ex in enumerate(EXAMPLES):
        resp = tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        r0 = int(r["response_start"][n])
        pos = np.nonzero(r["loss_mask"][n])[0]
        # the loss mask covers exactly the response tokens (and its eos), at the same place in every row
        np.testing.assert_array_equal(pos, np.arange(r0, r0 + len(resp)))
        for k, t in enumerate(TEMPLATES):
            np.testing.assert_array_equal(r["input_ids"][n, k, pos], resp)
            # everything before the response is exactly this template's prompt (bos first), left-padded
            prompt = [tok.bos_token_id] + tok(t.prompt.replace("{prompt}", ex["prompt"]),
                                              add_special_tokens=False)["input_ids"]
            real = np.nonzero(r["attention_mask"][n, k])[0]
            np.testing.assert_array_equal(r["input_ids"][n, k, real[0]:r0], prompt)
            assert real[-1] == r0 + len(resp) - 1                 # right padding after the response
            assert (r["attention_mask"][n, k, :real[0]] == 0).all()  # left padding before the prompt
            # positions count real tokens only: each template starts at 0 whatever its padding
            assert r["positions"][n, k, real[0]] == 0 and r["positions"][n, k, real[-1]] == len(real) - 1


def test_loss_mask_only_on_response_tokens(tok):
    r = render_example(tok, EXAMPLES[0], TEMPLATES[0], 96)
    prompt_len = 1 + len(tok(TEMPLATES[0].prompt.replace("{prompt}", EXAMPLES[0]["prompt"]),
                             add_special_tokens=False)["input_ids"])
    resp_len = len(tok(EXAMPLES[0]["response"], add_special_tokens=False)["input_ids"]) + 1
    expect = np.zeros(96, np.int32)
    expect[prompt_len:prompt_len + resp_len] = 1
    np.testing.assert_array_equal(r["loss_mask"], expect)
    assert r["attention_mask"].sum() == prompt_len + resp_len
    assert r["input_ids"][prompt_len + resp_len - 1] == tok.eos_token_id


def test_truncation_keeps_the_end_of_the_prompt_and_alignment():
    prompts = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [1, 20, 21]]
    resp = [50, 51, 52, 53, 54, 55]
    out = layout_multi(prompts, resp, seq_len=12, pad_id=0, max_prompt_len=4)
    # prompt budget max(12 - 6, 4) = 6: the long prompt keeps its last 6 tokens
    np.testing.assert_array_equal(out["input_ids"][0, :6], [5, 6, 7, 8, 9, 10])
    np.testing.assert_array_equal(out["input_ids"][1, :6], [0, 0, 0, 1, 20, 21])
    np.testing.assert_array_equal(out["input_ids"][:, 6:], [resp, resp])
    np.testing.assert_array_equal(out["loss_mask"], [0] * 6 + [1] * 6)
    assert layout_multi(prompts, resp, 12, 0, truncation="drop") is None


def test_errors(tok):
    with pytest.raises(DataError, match="no \\{prompt\\}"):
        PromptTemplate("bad", "no placeholder")
    with pytest.raises(DataError, match="format the response differently"):
        render_multi(tok, EXAMPLES[0], [TEMPLATES[0], PromptTemplate("x", "{prompt}", response="A: {response}")], 32)
    with pytest.raises(DataError, match="domain 'math' has no examples"):
        split_by_domain(render_dataset(tok, EXAMPLES[:2], TEMPLATES[0], 32))
    with pytest.raises(DataError, match="column 'response'"):
        render_dataset(tok, [{"domain": "text", "prompt": "x"}], TEMPLATES[0], 32)


def test_turn_aware_truncation_keeps_bos_system_turn_and_template(tmp_path):
    """A long conversation loses its OLDEST turns first; BOS, the system turn, the last user turn's end and
    the generation prompt stay. A long format-string prompt loses the start of the user's text, never BOS or
    the template's words."""
    from fusion_jax.data.tokenizer import load_tokenizer, train_tokenizer
    texts = ["the system says hello to the user and the assistant answers"] * 20
    train_tokenizer(texts, tmp_path / "tok", vocab_size=300)
    tok = load_tokenizer(tmp_path / "tok")
    long = " ".join(f"word{i}" for i in range(60))
    messages = [{"role": "system", "content": "SYSTEM RULES"},
                {"role": "user", "content": "old question " + long}, {"role": "assistant", "content": "old answer " + long},
                {"role": "user", "content": "middle question"}, {"role": "assistant", "content": "middle answer"},
                {"role": "user", "content": "final question ends here"}]
    ex = {"domain": "text", "prompt": "final question ends here", "response": "ok", "messages": messages}
    chat = PromptTemplate("chat", chat=True)
    S = 120
    r = render_example(tok, ex, chat, S, max_prompt_len=60)
    prompt_ids = r["input_ids"][: int(r["response_start"])]
    text = tok.decode(prompt_ids)
    assert prompt_ids[0] == tok.bos_token_id
    assert "SYSTEM RULES" in text and "final question ends here" in text and text.endswith("assistant\n")
    assert "old question" not in text and "middle question" in text  # whole old turns went first
    # a last user turn longer than the budget itself: its START is cut, the system turn stays
    ex2 = dict(ex, prompt=long + " tail", messages=[messages[0], {"role": "user", "content": long + " tail"}])
    r2 = render_example(tok, ex2, chat, 64, max_prompt_len=40)
    t2 = tok.decode(r2["input_ids"][: int(r2["response_start"])])
    assert r2["input_ids"][0] == tok.bos_token_id and "SYSTEM RULES" in t2 and "word59 tail" in t2
    assert "word0 " not in t2 and int(r2["response_start"]) <= 62
    # a format-string template keeps BOS and its own words; the user's text loses its start
    fmt = PromptTemplate("m", "### Instruction:\n{prompt}\n\n### Response:\n")
    r3 = render_example(tok, {"domain": "text", "prompt": long, "response": "ok"}, fmt, 48, max_prompt_len=30)
    p3 = r3["input_ids"][: int(r3["response_start"])]
    t3 = tok.decode(p3)
    assert p3[0] == tok.bos_token_id and t3.startswith("<s>### Instruction:\n") and t3.endswith("### Response:\n")
    assert "word59" in t3 and "word0 " not in t3 and len(p3) <= 46
