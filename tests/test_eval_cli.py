"""``fusion-jax generate`` and ``fusion-jax eval`` end to end on tiny models, in process: plain HF, Orbax
and fused directories; resumable records; bad input is exit 2 with nothing written. Plus the scoring
engine against the losses the UltraFuser pipeline reports, and the ToRA tool loop's glue."""
from __future__ import annotations

import json

import jax
import pytest

from fusion_jax.cli import main
from hf_fixtures import make_tiny_hf_model

torch = pytest.importorskip("torch")   # hf_fixtures builds the tiny checkpoint with transformers


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("m") / "llama", "llama", tokenizer=True, vocab_size=320)


@pytest.fixture(scope="module")
def fused_dir(tmp_path_factory, model_dir):
    from fusion_jax.hf import load_model
    from fusion_jax.ultrafuser.export import save_fused
    from fusion_jax.ultrafuser.model import FusedModel
    other = make_tiny_hf_model(tmp_path_factory.mktemp("m2") / "llama", "llama", seed=1, tokenizer=True,
                               vocab_size=320)
    fm = FusedModel.from_models([load_model(model_dir), load_model(other)], ["text", "math"], gate_hidden=8)
    fm.gate["w2"] = jax.random.normal(jax.random.key(1), fm.gate["w2"].shape)
    return save_fused(fm, tmp_path_factory.mktemp("f") / "fused", tokenizer_dir=model_dir,
                      templates={"text": "User: {prompt}\n", "math": "Q: {prompt}\nA:"}), fm


def _gen(path, *extra, capsys=None):
    rc = main(["generate", str(path), "--max-new-tokens", "6", "--quiet", *extra])
    return rc, (capsys.readouterr() if capsys else None)


def test_generate_plain_orbax_and_fused(model_dir, fused_dir, tmp_path, capsys):
    from fusion_jax.hf import load
    from fusion_jax.hf.orbax_io import save_params
    rc, out = _gen(model_dir, "--prompt", "the quick brown", capsys=capsys)
    assert rc == 0 and out.out.strip()
    # the same greedy text from the Orbax copy of the same weights
    cfg, params = load(model_dir)
    save_params(tmp_path / "orbax", params, cfg, source_dir=model_dir)
    rc, out2 = _gen(tmp_path / "orbax", "--prompt", "the quick brown", capsys=capsys)
    assert rc == 0 and out2.out == out.out
    # several prompts and samples to a JSONL file; a fused directory in each specialist's template
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "fusion of"}\n{"prompt": "the lazy"}\n')
    dest = tmp_path / "out.jsonl"
    rc, _ = _gen(fused_dir[0], "--prompts", str(prompts), "--output", str(dest), "--temperature", "1.0",
                 "--num-samples", "2", "--top-k", "20", capsys=capsys)
    rows = [json.loads(x) for x in dest.read_text().splitlines()]
    assert rc == 0 and len(rows) == 4 and {r["sample"] for r in rows} == {0, 1}


def test_generate_bad_input_exits_2(model_dir, tmp_path, capsys):
    for args in (["generate", str(tmp_path / "nope"), "--prompt", "x"],
                 ["generate", str(model_dir)],
                 ["generate", str(model_dir), "--prompt", "x", "--num-samples", "3"],
                 ["generate", str(model_dir), "--prompts", str(tmp_path / "missing.txt")]):
        assert main(args) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_eval_writes_a_report_and_resumes(model_dir, tmp_path, capsys):
    data = tmp_path / "heldout.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r, "domain": d}) + "\n" for p, r, d in
                            [("the quick", "brown fox", "text"), ("def f():", "return 1", "code"),
                             ("2 + 2 =", "4 #### 4", "math")]))
    out = tmp_path / "ev"
    args = ["eval", str(model_dir), "--tasks", "loss,gsm8k,code_jsonl", "--data", f"loss={data}",
            "--data", "gsm8k=demo", "--data", "code_jsonl=demo", "--limit", "2", "--max-new-tokens", "4",
            "--out", str(out), "--quiet"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["tasks"]) == {"loss", "gsm8k", "code_jsonl"}
    assert set(report["tasks"]["loss"]) == {"text", "code", "math"}
    assert report["tasks"]["gsm8k"]["problems"] == 2 and "pass@1" in report["tasks"]["code_jsonl"]
    assert (out / "report.md").read_text().startswith("# Evaluation")
    # an interrupted run: the report is gone and the last record torn mid-line; the rerun keeps the rest
    (out / "report.json").unlink()
    rec = out / "records" / "gsm8k.jsonl"
    first = rec.read_text().splitlines()[0]
    rec.write_text(first + "\n" + '{"id": "demo_math/1", "answ')
    assert main(args) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["tasks"] == report["tasks"]
    assert rec.read_text().splitlines()[0] == first
    # other options on the same --out are refused (results would mix)
    capsys.readouterr()
    assert main(args[:-1] + ["--seed", "3", "--quiet"]) == 2
    assert "other options" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--tasks", "loss,nope"], ["--tasks", "gsm8k"], ["--tasks", "loss", "--data",
                                 "loss=/does/not/exist.jsonl"], ["--tasks", "code_jsonl", "--data",
                                 "code_jsonl=demo", "--k", "5"]])
def test_eval_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path, capsys, bad):
    out = tmp_path / "ev"
    assert main(["eval", str(model_dir), "--out", str(out), *bad]) == 2
    assert capsys.readouterr().err.startswith("error: ")
    assert not out.exists()


def test_scores_equal_the_losses_the_ultrafuser_pipeline_reports(model_dir, fused_dir):
    """One implementation checked against the other: plain (``eval.loss.lm_loss``) and fused
    (``ultrafuser.evaluate``) response losses on the same rendered arrays."""
    from fusion_jax import sharding
    from fusion_jax.data.templates import PromptTemplate, render_dataset
    from fusion_jax.eval.loss import lm_loss, make_lm_eval
    from fusion_jax.eval.models import load_eval_model
    from fusion_jax.eval.scoring import response_loss
    from fusion_jax.ultrafuser import evaluate as uev
    m = load_eval_model(model_dir)
    exs = [{"prompt": f"the quick {i}", "response": "brown fox jumps " * (1 + i % 3), "domain": "text"}
           for i in range(5)]
    r = render_dataset(m.tokenizer, exs, PromptTemplate("t", "A: {prompt}\n"), 32, domains=("text",))
    arrays = {k: r[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    mesh = sharding.make_mesh()
    ref = lm_loss(make_lm_eval(m.decoder.graphdef), m.params, arrays, 4, mesh)
    assert response_loss(m.decoder, m.params, arrays, 4, chunk=8)["loss"] == pytest.approx(ref, rel=1e-5)

    path, fm = fused_dir
    f = load_eval_model(path)
    assert f.kind == "ultrafuser" and f.views == 2 and [t.name for t in f.templates] == ["text", "math"]
    r = render_dataset(f.tokenizer, exs, list(f.templates), 40, domains=("text",))
    arrays = {k: r[k] for k in ("input_ids", "attention_mask", "loss_mask")}
    ref, _ = uev.fused_loss_and_weights(uev.make_fused_eval(fm, 8), fm.train_params(), arrays, 4, mesh, fm.names)
    assert response_loss(f.decoder, f.params, arrays, 4, chunk=16)["loss"] == pytest.approx(ref, rel=1e-5)


def test_tool_use_glue_runs_programs_and_survives_bad_ones(model_dir, tmp_path, monkeypatch):
    """ToRA through math_task: the model's program runs in the sandbox and its output comes back; a
    program that loops forever is stopped, scored wrong, and the other problems still count."""
    from fusion_jax.eval import tasks as T
    from fusion_jax.eval.generation import Completion, GenerationConfig
    from fusion_jax.eval.models import load_eval_model
    from fusion_jax.eval.sandbox import Limits, run_programs
    m = load_eval_model(model_dir)
    tok = m.tokenizer
    script = {"good": "```python\nprint(6 * 7)\n```", "loop": "```python\nwhile True:\n    pass\n```"}

    def fake_generate(decoder, params, prompts, config, *, tokenizer=None, progress=False):
        out = []
        for p in prompts:
            text = tok.decode(p, skip_special_tokens=True)
            kind = "good" if "forty" in text else "loop"
            if "```output" in text:      # second round: answer from the program's output
                out.append([Completion([], "The answer is\n#### " + text.rsplit("```output\n", 1)[1].split("\n")[0]
                                       if kind == "good" else "#### 0", "eos")])
            else:
                out.append([Completion([], script[kind], "stop")])
        return out

    monkeypatch.setattr(T, "generate", fake_generate)
    problems = [{"id": "a", "question": "What is forty-two?", "answer": "42"},
                {"id": "b", "question": "What is nothing?", "answer": "7"}]
    rec = T.Records(tmp_path / "tora.jsonl")
    res = T.math_task(m, problems, rec, GenerationConfig(max_new_tokens=8), template="raw", tool_rounds=2,
                      run_fn=lambda codes: run_programs(codes, limits=Limits(timeout_s=2.0)))
    assert res["problems"] == 2 and res["accuracy"] == 0.5
    assert rec.rows["a"]["correct"] == [True] and "```output\n42" in rec.rows["a"]["outputs"][0]
    assert "TimeoutError" in rec.rows["b"]["outputs"][0] and rec.rows["b"]["correct"] == [False]
