"""The distillation wing's teacher stores, damaged every way, through the command that reads them
(``fusion-jax teacher-pass`` reusing a finished store, in-process): exit 2, one message naming the damaged
file and how to recover, no traceback, the store left as it was (tests/hardening.py has the contract).

Damages: the manifest truncated, garbled, of the wrong JSON type in every field a reader uses; a shard
truncated, with its header or a tensor's bytes garbled (caught by the SHA-256 in the manifest). A store
missing its manifest or a shard is an unfinished one, not an error: the pass recomputes what is missing
and ends with the same bytes."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import distill_models as fx
import hardening as H
from fusion_jax.distill import store as st


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A student, a teacher of another tokenizer, a corpus file and the finished teacher store."""
    root = tmp_path_factory.mktemp("stores")
    m = {"student": fx.make_model(root / "student", kind="bpe", vocab=300, seed=1),
         "teacher": fx.make_model(root / "teacher", kind="unigram", vocab=420, arch="Qwen2ForCausalLM", seed=2)}
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": t[:30], "response": t[30:90]}) + "\n" for t in fx.texts(12)))
    m["data"], m["root"] = data, root
    assert _pass(m, root / "good", root / "good_runs").rc == 0
    m["store"] = root / "good" / "t"
    assert (m["store"] / st.MANIFEST).is_file() and len(list(m["store"].glob("shard-*"))) >= 2
    return m


def _pass(m, store_dir: Path, runs: Path, capfd=None):
    from fusion_jax.cli import main
    argv = ["teacher-pass", "configs/fusellm.py:smoke", f"--config.student.path={m['student']}",
            "--config.teachers.names=('t',)", f"--config.teachers.paths=('{m['teacher']}',)",
            "--config.data.domains=('text',)", f"--config.data.train_files.text={m['data']}",
            f"--config.output_dir={runs}", "--config.name=hard", "--config.trainer.progress=False",
            "--config.teacher_pass.shard_sequences=5", f"--config.teacher_pass.store_dir={store_dir}"]
    if capfd is None:
        return H.Outcome(main(argv), "", "")
    return H.run_main(main, argv, capfd)


MISSING = object()   # a field's value that means: delete the field


def _manifest_cases() -> list:
    cases = [("manifest-list", "json", ["not", "an", "object"])]
    for key in ("n_sequences", "n_tokens", "shard_sequences", "bytes_per_token", "codec", "shards", "fingerprints"):
        for name, value in (("null", None), ("string", "x"), ("negative", -3), ("list", [1])):
            cases.append((f"{key}={name}", "field", ((key,), value)))
    cases += [("codec.k=0", "field", (("codec", "k"), 0)), ("codec.k=string", "field", (("codec", "k"), "x")),
              ("codec.k=digits", "field", (("codec", "k"), "3")),
              ("codec.variable=string", "field", (("codec", "variable"), "no")),
              ("codec.vocab_size=string", "field", (("codec", "vocab_size"), "big")),
              ("codec.missing", "field", (("codec", "vocab_size"), MISSING)),
              ("shard0.bytes=string", "field", (("shards", 0, "bytes"), "big")),
              ("shard0.file=other", "field", (("shards", 0, "file"), "shard-00009.safetensors")),
              ("shard0.sequences=short", "field", (("shards", 0, "sequences"), [0])),
              ("shard1.tokens=gap", "field", (("shards", 1, "tokens"), [1, 2]))]
    return cases


def _damage(store: Path, target: str, how: str, arg) -> str:
    """Apply one damage; returns the file name the message must name."""
    if target == "manifest":
        f = store / st.MANIFEST
        if how == "field":
            path, value = arg
            doc = json.loads(f.read_text())
            if value is MISSING:
                del H.get_path(doc, path[:-1])[path[-1]]
            else:
                doc = H.with_value(doc, path, value)
            f.write_text(json.dumps(doc))
        elif how == "truncate":
            H.damage_file(f, "truncate", f.stat().st_size // 2)
        else:
            H.damage_file(f, how, arg)
        return st.MANIFEST
    f = store / st.shard_name(int(target[-1]))
    if how == "truncate":
        H.damage_file(f, "truncate", f.stat().st_size - 7)
    elif how == "garble-header":
        H.garble(f, 12, 6)
    elif how == "garble-data":
        H.garble(f, f.stat().st_size - 20, 4)
    else:
        H.damage_file(f, how, arg)
    return f.name


CASES = ([("manifest", "truncate", None, "truncate"), ("manifest", "garble", 3, "garble")]
         + [("manifest", how, arg, cid) for cid, how, arg in _manifest_cases()]
         + [(f"shard{i}", how, None, f"shard{i}-{how}") for i in (0, 1)
            for how in ("truncate", "garble-header", "garble-data")])


@pytest.mark.parametrize("target,how,arg", [c[:3] for c in CASES], ids=[c[3] for c in CASES])
def test_damaged_store(target, how, arg, made, tmp_path, capfd):
    stores = tmp_path / "stores"
    shutil.copytree(made["store"].parent, stores)
    name = _damage(stores / "t", target, how, arg)
    before = H.snapshot(stores)
    o = _pass(made, stores, tmp_path / "runs", capfd)
    msg = H.assert_clean_error(o, None, names=(name,), inputs=before)
    assert "rerun" in msg and str(stores / "t") in msg, msg
    assert len(msg) < 600, msg


@pytest.mark.parametrize("missing", [st.MANIFEST, st.shard_name(1)])
def test_a_store_missing_a_file_is_finished_not_refused(missing, made, tmp_path, capfd):
    """No manifest or a shard gone = an interrupted pass: the rerun keeps the finished shards, recomputes
    what is missing and writes the same store."""
    stores = tmp_path / "stores"
    shutil.copytree(made["store"].parent, stores)
    (stores / "t" / missing).unlink()
    kept = {p.name: p.read_bytes() for p in (stores / "t").glob("shard-*")}
    o = _pass(made, stores, tmp_path / "runs", capfd)
    assert o.rc == 0, o
    now = {p.name: p.read_bytes() for p in (stores / "t").glob("shard-*")}
    assert {k: now[k] for k in kept} == kept
    assert now == {p.name: p.read_bytes() for p in made["store"].glob("shard-*")}
    assert (stores / "t" / st.MANIFEST).read_text() == (made["store"] / st.MANIFEST).read_text()
