"""FuseLLM and FuseChat end to end at smoke size on one shared demo-zoo cache: the report's schema and
files; FuseLLM on 8 simulated devices (``python train.py``, as a TPU/GPU user runs it) giving the
1-device report; FuseChat resuming every finished stage; and bad input through ``fusion-jax
teacher-pass`` (a store of another corpus or tokenizer, tokenizers that disagree on the text, a teacher
whose vocabulary does not match its tokenizer, a tokenizer without a known word-start marker): a clear
``error:`` line, exit 2, nothing half-written."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import distill_models as fx
from notebooks import check_committed_clean, execute
from fusion_jax.distill.config import get_config
from fusion_jax.distill.pipeline import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


def _smoke(method, zoo, out):
    c = get_config(method, "smoke")
    c.zoo.cache_dir = str(zoo)
    c.output_dir = str(out)
    c.trainer.progress = False
    return c


def _eight_devices(method, zoo, out) -> dict:
    """``python train.py --config=configs/<method>.py:smoke`` on 8 simulated devices; its report."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    p = subprocess.run([sys.executable, "train.py", f"--config=configs/{method}.py:smoke",
                        f"--config.zoo.cache_dir={zoo}", f"--config.output_dir={out}", "--config.trainer.progress=False"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((out / f"{method}_smoke" / "run.json").read_text())["mesh"]["fsdp"] == 8
    return json.loads((out / f"{method}_smoke" / "report.json").read_text())


def test_fusellm_smoke_and_eight_devices(zoo, tmp_path):
    r = run(_smoke("fusellm", zoo, tmp_path / "runs"))
    out = tmp_path / "runs" / "fusellm_smoke"
    report = json.loads((out / "report.json").read_text())
    models = {"student", "distilled", "baseline", "qwen2", "mistral"}
    assert set(report["eval_nats_per_byte"]) == models
    assert set(report["eval_nats_per_token"]) == {"student", "distilled", "baseline"}
    for row in report["eval_nats_per_byte"].values():
        assert set(row) == {"text", "code", "math", "all"} and all(0 < v < 20 for v in row.values())
    assert report["candidates"] == ["ref", "qwen2", "mistral"]
    assert abs(sum(report["mince_choice"].values()) - 1) < 1e-6
    assert all(s["bytes_per_token"] <= 30 for s in report["stores"].values())
    assert {"distilled_beats_clm_only_all", "teacher_qwen2_better_than_student"} <= set(report["checks"])
    for f in ("report.md", "run.json", "eval.png", "loss_curves.png", "distilled/config.json",
              "baseline/model.safetensors"):
        assert (out / f).is_file(), f
    assert "nats per UTF-8 byte" in (out / "report.md").read_text()
    assert r["report"]["checks"] == report["checks"]

    report8 = _eight_devices("fusellm", zoo, tmp_path / "runs8")
    out8 = tmp_path / "runs8" / "fusellm_smoke"
    for name in ("ref", "qwen2", "mistral"):   # the same stores, byte for byte
        a, b = (hashlib.sha256(b"".join(f.read_bytes() for f in sorted((o / "work" / "stores" / name).iterdir())))
                .hexdigest() for o in (out, out8))
        assert a == b, name
    for m, row in report["eval_nats_per_byte"].items():
        np.testing.assert_allclose([report8["eval_nats_per_byte"][m][d] for d in row], list(row.values()), rtol=2e-5,
                                   err_msg=m)


def test_fusechat_smoke_and_resume(zoo, tmp_path):
    c = _smoke("fusechat", zoo, tmp_path / "runs")
    run(c)
    out = tmp_path / "runs" / "fusechat_smoke"
    report = json.loads((out / "report.json").read_text())
    assert set(report["eval_nats_per_byte"]) == {"merged", "target_qwen2", "target_mistral", "baseline", "pivot",
                                                 "qwen2", "mistral"}
    assert report["merge_config"]["merge_method"] == "varm"
    assert {"merged_beats_pivot_all", "merged_beats_sft_only_all"} <= set(report["checks"])
    for f in ("merged/config.json", "targets/qwen2/config.json", "targets/mistral/model.safetensors"):
        assert (out / f).is_file(), f
    # a rerun resumes every stage (nothing is trained or evaluated again) and writes the same report
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("targets/*/model.safetensors")}
    again = run(c)
    assert again["report"]["eval_nats_per_byte"] == report["eval_nats_per_byte"]
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp
    # and on 8 simulated devices, the same report up to float32 reduction order
    report8 = _eight_devices("fusechat", zoo, tmp_path / "runs8")
    for m, row in report["eval_nats_per_byte"].items():
        np.testing.assert_allclose([report8["eval_nats_per_byte"][m][d] for d in row], list(row.values()), rtol=2e-5,
                                   err_msg=m)


# -- bad input ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    m = {"student": fx.make_model(root / "student", kind="bpe", vocab=500, seed=1),
         "teacher": fx.make_model(root / "teacher", kind="unigram", vocab=420, arch="Qwen2ForCausalLM", seed=2),
         "other": fx.make_model(root / "other", kind="bpe", vocab=330, arch="MistralForCausalLM", seed=3)}
    m["lower"] = fx.make_model(root / "lower", tokenizer_dir=fx.lowercase_tokenizer(root / "lower.tok"), seed=4)
    m["wordpiece"] = fx.make_model(root / "wordpiece", tokenizer_dir=fx.wordpiece_tokenizer(root / "wp.tok"), seed=5)
    data = root / "train.jsonl"
    # short texts: no tokenizer needs them split, so the corpus is the same whatever the teachers
    data.write_text("".join(json.dumps({"prompt": t[:30], "response": t[30:100]}) + "\n" for t in fx.texts(8)))
    m["data"] = data
    return m


def _cli(models, tmp_path, teacher, *extra, name="bad"):
    from fusion_jax.cli import main
    args = ["teacher-pass", "configs/fusellm.py:smoke", f"--config.student.path={models['student']}",
            "--config.teachers.names=('t',)", f"--config.teachers.paths=('{models[teacher]}',)",
            "--config.data.domains=('text',)", f"--config.data.train_files.text={models['data']}",
            f"--config.output_dir={tmp_path / 'runs'}", f"--config.name={name}", "--config.trainer.progress=False",
            f"--config.teacher_pass.store_dir={tmp_path / 'stores'}", *extra]
    return main(args)


def _digest(d: Path) -> str:
    return hashlib.sha256(b"".join(p.name.encode() + p.read_bytes() for p in sorted(Path(d).rglob("*"))
                                   if p.is_file())).hexdigest()


def test_bad_input_is_a_clear_error_and_writes_nothing(models, tmp_path, capsys):
    assert _cli(models, tmp_path, "teacher", "--config.data.max_train_examples=6", name="good") == 0
    stores = tmp_path / "stores"
    before = _digest(stores)
    capsys.readouterr()
    cases = [
        # a store of another corpus (other examples) at the same place
        (("teacher", "--config.data.max_train_examples=5"), "holds a store made for another corpus"),
        # a store of another tokenizer: another teacher under the same name
        (("other", "--config.data.max_train_examples=6"), "stores/t holds a store made for another tokenizer"),
        # the teacher's own checkpoint with the student's tokenizer (500 tokens for 420 rows)
        (("teacher", f"--config.teachers.tokenizers=('{models['student']}',)"), "does not match its tokenizer"),
        # a tokenizer that lower-cases: its pieces spell another text than the student's
        (("lower",), "spell different texts"),
        # WordPiece: no word-start marker an alignment knows
        (("wordpiece",), "cannot tell its word-start marker"),
    ]
    for i, (args, msg) in enumerate(cases):
        assert _cli(models, tmp_path, *args, name=f"bad{i}") == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, (args, err)
        assert "Traceback" not in err
        assert _digest(stores) == before                      # the existing stores are untouched
        assert not (stores / "ref.tmp").exists()
        assert not list((tmp_path / "runs" / f"bad{i}").glob("*.json"))   # no report, nothing written
    assert sorted(p.name for p in stores.iterdir()) == ["ref", "t"]


# -- the notebook ---------------------------------------------------------------------------------------------
NB = REPO / "colab" / "fusellm_tpu.ipynb"


def test_notebook_is_committed_clean():
    pytest.importorskip("nbformat")
    check_committed_clean(NB, ("PRESET", "METHOD", "STUDENT_PATH", "TEACHER_PATHS", "TRAIN_FILES", "OUTPUT_DIR",
                               "ZOO_CACHE_DIR", "INSTALL"), runs="fusion_jax.distill.pipeline.run")


def test_notebook_runs_smoke_on_cpu(zoo, tmp_path):
    pytest.importorskip("nbformat")
    pytest.importorskip("nbclient")
    params = {"PRESET": "smoke", "CHECKOUT": str(REPO), "INSTALL": False, "OUTPUT_DIR": str(tmp_path / "runs"),
              "ZOO_CACHE_DIR": str(zoo), "MAX_NEW_TOKENS": 4, "OVERRIDES": {"trainer.progress": False}}
    r = execute(NB, params, tmp_path / "work")
    report = json.loads((tmp_path / "runs" / "fusellm_smoke" / "report.json").read_text())
    assert "distilled" in report["eval_nats_per_byte"]
    assert "CPU fallback" in r.stdout and "preset 'smoke'" in r.stdout and "distilled student:" in r.stdout
    assert r.images == 2
    assert not any((tmp_path / "work").iterdir())
