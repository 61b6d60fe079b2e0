"""The ``tokenizer:`` block, ``chat_template`` and multi-document configs, against mergekit 0.1.5.

Two tiny models with different vocabularies (300 and 330 tokens); the output vocabulary, every token's
embedding and head rows, the padding rows, config.json's vocab_size and the saved tokenizer files are
compared with mergekit's. mergekit's union gives new tokens ids in hash-map order (different on every
run), so the union is compared token by token; fixed sources are compared byte for byte.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from fusion_jax.cli import main
from fusion_jax.errors import ConfigError
from fusion_jax.hf.safetensors_io import SafetensorsReader
from fusion_jax.merging import merge
from fusion_jax.merging.testing import llama_config, make_family, random_weights, write_checkpoint

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    ca, cb = llama_config(vocab=300), llama_config(vocab=330)
    a = write_checkpoint(root / "a", ca, random_weights(ca, 0))
    b = write_checkpoint(root / "b", cb, random_weights(cb, 1), tokenizer_words=("zebra xylophone quokka",) * 3)
    return a, b


def _mergekit(cfg, out):
    pytest.importorskip("mergekit")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(cfg))), str(out),
              MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, lazy_unpickle=False))


def _load(path):
    with SafetensorsReader(path) as r:
        return {n: r.get(n).astype(np.float32) for n in r.names()}


def _linear(a, b, **extra):
    return {"merge_method": "linear", "base_model": str(a), "dtype": "float32",
            "models": [{"model": str(a), "parameters": {"weight": 0.6}},
                       {"model": str(b), "parameters": {"weight": 0.4}}], **extra}


def _same_as_mergekit(cfg, tmp_path, same_ids: bool):
    _mergekit(cfg, tmp_path / "mk")
    merge(cfg, tmp_path / "fj", quiet=True)
    tm = transformers.AutoTokenizer.from_pretrained(tmp_path / "mk")
    tf = transformers.AutoTokenizer.from_pretrained(tmp_path / "fj")
    vm, vf = tm.get_vocab(), tf.get_vocab()
    assert set(vm) == set(vf)
    if same_ids:
        assert vm == vf
    wm, wf = _load(tmp_path / "mk"), _load(tmp_path / "fj")
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        assert wm[n].shape == wf[n].shape
        for tok in vm:
            np.testing.assert_array_equal(wf[n][vf[tok]], wm[n][vm[tok]], err_msg=f"{n}: row of {tok!r}")
        # padding rows: the mean of the real rows (float32 here: torch sums them in its own order)
        np.testing.assert_allclose(wf[n][len(vf):], wm[n][len(vm):], rtol=1e-5, atol=1e-7)
    for n in wm:
        if "embed" not in n and "lm_head" not in n:
            np.testing.assert_array_equal(wf[n], wm[n], err_msg=n)
    cm, cf = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("mk", "fj"))
    assert cm["vocab_size"] == cf["vocab_size"] == wm["model.embed_tokens.weight"].shape[0]
    return tmp_path / "mk", tmp_path / "fj"


def test_union_with_tokens_and_padding(pair, tmp_path):
    a, b = pair
    cfg = _linear(a, b, tokenizer={"source": "union", "pad_to_multiple_of": 64, "tokens": {
        "<|im_start|>": {"source": {"kind": "model_token", "model": str(a), "token": "<s>"}},
        "<|im_end|>": {"source": {"kind": "zero"}},
        "</s>": {"source": str(b), "force": True}}})
    mk, fj = _same_as_mergekit(cfg, tmp_path, same_ids=False)
    # the same added tokens with the same settings (mergekit's ids are in hash-map order), the same
    # tokenizer_config.json
    added = [sorted(json.dumps({k: v for k, v in t.items() if k != "id"}, sort_keys=True)
                    for t in json.loads((d / "tokenizer.json").read_text())["added_tokens"]) for d in (mk, fj)]
    assert added[0] == added[1]
    assert (fj / "tokenizer_config.json").read_bytes() == (mk / "tokenizer_config.json").read_bytes()


def test_model_source_named_template_identical_files(pair, tmp_path):
    a, b = pair
    mk, fj = _same_as_mergekit(_linear(a, b, tokenizer={"source": str(b)}, chat_template="chatml"), tmp_path,
                               same_ids=True)
    for f in sorted(p.name for p in mk.iterdir() if "token" in p.name or "chat" in p.name):
        assert (fj / f).read_bytes() == (mk / f).read_bytes(), f


def test_tokenizer_source_base_and_auto_template(pair, tmp_path):
    a, b = pair
    mk, fj = _same_as_mergekit(_linear(a, b, tokenizer_source="base", chat_template="auto"), tmp_path,
                               same_ids=True)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (fj / f).read_bytes() == (mk / f).read_bytes(), f


def test_jinja_chat_template_without_a_vocabulary(tmp_path):
    base, fts = make_family(tmp_path / "m", n_finetunes=1, seed=2)
    jinja = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    cfg = {"merge_method": "linear", "chat_template": jinja,
           "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                      {"model": str(fts[0]), "parameters": {"weight": 0.5}}]}
    merge(cfg, tmp_path / "fj", quiet=True)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "fj")
    assert tok.chat_template == jinja
    with pytest.raises(ConfigError, match="chat_template"):
        merge(dict(cfg, chat_template="not-a-template"), tmp_path / "bad", quiet=True)
    assert not (tmp_path / "bad").exists()


def test_own_chat_templates_render_like_mergekits():
    """The templates used when mergekit is not installed render every conversation as mergekit's do."""
    import importlib.resources

    from transformers.utils.chat_template_utils import render_jinja_template

    from fusion_jax.merging.chat_templates import TEMPLATES
    pytest.importorskip("mergekit")
    convs = [[{"role": "user", "content": "Hi there "}],
             [{"role": "system", "content": " Be brief."}, {"role": "user", "content": "What is 2+2?"},
              {"role": "assistant", "content": "4"}],
             [{"role": "user", "content": "a"}, {"role": "assistant", "content": " b "}, {"role": "user", "content": "c"}],
             [{"role": "system", "content": "S"}, {"role": "user_context", "content": "ctx"},
              {"role": "user", "content": "q"}]]

    def render(t, conv, gen):
        try:
            return render_jinja_template(conversations=[conv], chat_template=t, add_generation_prompt=gen,
                                         bos_token="<s>", eos_token="</s>")[0][0]
        except Exception as e:  # noqa: BLE001  (a template refusing a conversation must refuse in both)
            return f"error {type(e).__name__}"

    for name, ours in TEMPLATES.items():
        theirs = importlib.resources.files("mergekit._data.chat_templates").joinpath(name + ".jinja").read_text()
        for conv in convs:
            for gen in (False, True):
                assert render(ours, conv, gen) == render(theirs, conv, gen), (name, conv, gen)


# -- multi-document configs ------------------------------------------------------------------------

def _digest(path):
    import hashlib
    with SafetensorsReader(path) as r:
        h = hashlib.sha256()
        for n in sorted(r.names()):
            h.update(n.encode() + r.get(n).tobytes())
    return h.hexdigest()


def test_multi_document_config_equals_the_merges_run_one_by_one(tmp_path):
    base, fts = make_family(tmp_path / "m", n_finetunes=3, seed=3, dtype="bfloat16", tokenizer=False)
    first = {"name": "step1", "merge_method": "slerp", "base_model": str(fts[0]), "parameters": {"t": 0.4},
             "models": [{"model": str(fts[0])}, {"model": str(fts[1])}], "dtype": "bfloat16"}
    final = {"merge_method": "dare_ties", "base_model": str(base), "dtype": "bfloat16",
             "models": [{"model": "step1", "parameters": {"weight": 0.6, "density": 0.5}},
                        {"model": str(fts[2]), "parameters": {"weight": 0.4, "density": 0.5}}]}
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all([final, first]))  # the output first: order follows dependencies
    assert main(["merge", str(path), str(tmp_path / "out"), "--intermediate-dir", str(tmp_path / "steps"),
                 "--quiet", "--seed", "4"]) == 0
    one = {k: v for k, v in first.items() if k != "name"}
    merge(one, tmp_path / "s1", quiet=True, seed=4)
    two = dict(final, models=[{"model": str(tmp_path / "s1"), "parameters": {"weight": 0.6, "density": 0.5}},
                              final["models"][1]])
    merge(two, tmp_path / "s2", quiet=True, seed=4)
    assert _digest(tmp_path / "steps" / "step1") == _digest(tmp_path / "s1")
    assert _digest(tmp_path / "out") == _digest(tmp_path / "s2")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_multi_document_failure_leaves_nothing(tmp_path, capsys):
    base, fts = make_family(tmp_path / "m", n_finetunes=2, seed=5, tokenizer=False)
    first = {"name": "avg", "merge_method": "linear",
             "models": [{"model": str(fts[0]), "parameters": {"weight": 1}},
                        {"model": str(fts[1]), "parameters": {"weight": 1}}]}
    bad = {"merge_method": "ties", "base_model": str(base),  # fails at run time: a missing model
           "models": [{"model": "avg", "parameters": {"weight": 1, "density": 0.5}},
                      {"model": str(tmp_path / "nope"), "parameters": {"weight": 1, "density": 0.5}}]}
    path = tmp_path / "multi.yml"
    path.write_text(yaml.safe_dump_all([first, bad]))
    assert main(["merge", str(path), str(tmp_path / "out"), "--intermediate-dir", str(tmp_path / "steps"),
                 "--quiet"]) == 2
    assert "document 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "steps" / "avg").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    cyc = [dict(first, name="x", models=[{"model": "y", "parameters": {"weight": 1}}]),
           dict(first, name="y", models=[{"model": "x", "parameters": {"weight": 1}}])]
    path.write_text(yaml.safe_dump_all(cyc))
    assert main(["merge", str(path), str(tmp_path / "out"), "--quiet"]) == 2
    assert "cycle" in capsys.readouterr().err
