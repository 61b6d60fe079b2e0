"""The lm-evaluation-harness adapter, offline: harness tasks defined on local files (a YAML task + jsonl
in the test's tmp dir, no hub), run through ``lm_eval.simple_evaluate`` with ``--model fusion-jax``, and
compared request by request with lm-eval's own transformers backend (``hf``) on the same tiny model:
multiple-choice log-likelihoods, rolling log-likelihoods (perplexity) and greedy ``generate_until``. The
fused model runs the same tasks and matches its PyTorch export (``trust_remote_code``) the same way.
Skipped when lm-eval is not installed (``pip install 'fusion-jax[lm-eval]'``)."""
from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
lm_eval = pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")
from hf_fixtures import make_tiny_hf_model  # noqa: E402

TASKS = {
    "fj_choice": {"output_type": "multiple_choice", "doc_to_text": "{{question}}", "doc_to_target": "{{label}}",
                  "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}]},
    "fj_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                   "metric_list": [{"metric": "word_perplexity"}]},
    "fj_generate": {"output_type": "generate_until", "doc_to_text": "{{question}}", "doc_to_target": "{{answer}}",
                    "generation_kwargs": {"until": ["\n", "."], "max_gen_toks": 10, "do_sample": False},
                    "metric_list": [{"metric": "exact_match"}]},
}
ROWS = [{"question": "the quick brown", "choices": [" fox", " dog", " lazy"], "label": 0, "answer": "fox",
         "text": "the quick brown fox jumps over the lazy dog"},
        {"question": "fusion of", "choices": [" models", " the", " jumps over"], "label": 1, "answer": "models",
         "text": "fusion of models and the lazy dog sleeps all day long in the sun"},
        {"question": "jumps", "choices": [" over", " under"], "label": 0, "answer": "over",
         "text": "jumps over"}]


def _tasks(tmp_path):
    import yaml
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    d = tmp_path / "tasks"
    d.mkdir()
    for name, spec in TASKS.items():
        t = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
             "test_split": "test", **spec}
        (d / f"{name}.yaml").write_text(yaml.safe_dump(t))
    return d


def _run(model, model_args, tasks_dir):
    import fusion_jax.eval.harness  # noqa: F401  (registers "fusion-jax")
    from lm_eval.tasks import TaskManager
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks_dir)), device="cpu",
                                   batch_size=4)


def _responses(res):
    """Per task: each document's raw model responses (log-likelihoods or texts), in document order."""
    out = {}
    for task, samples in res["samples"].items():
        out[task] = [[r[0] if isinstance(r, list) else r for r in s["resps"]]
                     for s in sorted(samples, key=lambda s: s["doc_id"])]
    return out


def _compare(ours, ref):
    for task in TASKS:
        for a_doc, b_doc in zip(ours[task], ref[task]):
            for a, b in zip(a_doc, b_doc):
                if task == "fj_generate":
                    assert a == b
                elif task == "fj_choice":     # (logprob, greedy)
                    assert a[0] == pytest.approx(b[0], abs=2e-4) and bool(a[1]) == bool(b[1])
                else:
                    assert a == pytest.approx(b, abs=5e-4)


def test_plain_model_matches_lm_evals_transformers_backend(tmp_path):
    path = make_tiny_hf_model(tmp_path / "llama", "llama", tokenizer=True, vocab_size=320)
    tasks = _tasks(tmp_path)
    ours = _run("fusion-jax", f"pretrained={path}", tasks)
    ref = _run("hf", f"pretrained={path},dtype=float32", tasks)
    assert ours["results"]["fj_choice"]["acc,none"] == ref["results"]["fj_choice"]["acc,none"]
    _compare(_responses(ours), _responses(ref))


def test_fused_model_matches_its_pytorch_export(tmp_path):
    import jax

    from fusion_jax.hf import load_model
    from fusion_jax.ultrafuser.export import save_fused
    from fusion_jax.ultrafuser.model import FusedModel
    paths = [make_tiny_hf_model(tmp_path / f"s{i}", "llama", seed=i, tokenizer=True, vocab_size=320)
             for i in range(2)]
    fm = FusedModel.from_models([load_model(p) for p in paths], ["a", "b"], gate_hidden=8)
    fm.gate["w2"] = jax.random.normal(jax.random.key(1), fm.gate["w2"].shape)
    out = save_fused(fm, tmp_path / "fused", tokenizer_dir=paths[0])
    tasks = _tasks(tmp_path)
    ours = _run("fusion-jax", f"pretrained={out}", tasks)
    ref = _run("hf", f"pretrained={out},dtype=float32,trust_remote_code=True", tasks)
    _compare(_responses(ours), _responses(ref))
