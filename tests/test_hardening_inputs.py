"""Every file type we read, damaged every way, through the command that reads it (in-process
``fusion_jax.cli.main`` / ``fusion_jax.train.cli.main``): exit 2, one message naming the fault, no
traceback, nothing at or beside the output, inputs untouched (tests/hardening.py has the contract and
the generators). A damage that leaves a valid file (a passthrough file's field we do not interpret, an
Orbax file the restore does not need, bytes inside a tensor, which safetensors has no checksum for)
may instead succeed, with the same result as the undamaged input.

File types: safetensors file, safetensors index, config.json (fields from transformers' own config
classes), generation_config.json, tokenizer files, Orbax params checkpoint, the trainer's Orbax
checkpoints, merge YAML, data files (jsonl / json / csv / parquet).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import hardening as H
from hf_fixtures import cached_tiny_hf_model

# -- shared inputs -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return cached_tiny_hf_model(tmp_path_factory, "llama", tokenizer=True)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return cached_tiny_hf_model(tmp_path_factory, "llama", seed=1, max_shard_size="40KB")


@pytest.fixture(scope="module")
def orbax_ckpt(llama, tmp_path_factory):
    from fusion_jax.cli import main
    out = tmp_path_factory.mktemp("orbax") / "ckpt"
    assert main(["convert", "hf-to-orbax", str(llama), str(out)]) == 0
    return out


def _clone(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _params_equal(out: Path, ref: Path) -> None:
    from fusion_jax.hf.orbax_io import restore_params
    import jax
    _, a = restore_params(out)
    _, b = restore_params(ref)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


class Cases:
    """Runs generated cases against one command and collects every broken contract, so that one test
    reports all failing damages of its class at once."""

    def __init__(self, tmp: Path, capfd):
        self.tmp, self.capfd, self.failures, self.count = tmp, capfd, [], 0

    def run(self, case: str, src: Path, damage, argv_of, *, names, may_succeed=None, runner=H.cli):
        """``damage(copy)`` on a fresh copy of ``src``; ``argv_of(copy, out)`` is the command."""
        self.count += 1
        d = _clone(src, self.tmp / f"in{self.count}")
        damage(d)
        before = H.digest(d)
        out = self.tmp / f"out{self.count}"
        o = runner(argv_of(d, out), self.capfd)
        try:
            if o.rc == 0 and may_succeed is not None:
                may_succeed(d, out)
                assert H.digest(d) == before, "an input was modified"
            else:
                assert_names = [n(d) if callable(n) else n for n in names]
                H.assert_clean_error(o, out, names=assert_names, inputs=before)
        except AssertionError as e:
            self.failures.append(f"{case}: {str(e)[:600]}")
        finally:
            shutil.rmtree(d, ignore_errors=True)
            if out.is_dir():
                shutil.rmtree(out)

    def check(self):
        assert self.count, "no case ran"
        assert not self.failures, f"{len(self.failures)} of {self.count} cases broke the contract:\n" + \
            "\n".join(self.failures)


def _to_orbax(d, out):
    return ["convert", "hf-to-orbax", d, out]


# -- safetensors -------------------------------------------------------------------------------------
def _st_header(f: Path) -> tuple[int, dict]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8:8 + n])


def _st_rewrite(f: Path, header: dict) -> None:
    """Replace the header, keeping the data section (the length prefix follows the new header)."""
    n, _ = _st_header(f)
    data = f.read_bytes()[8 + n:]
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    f.write_bytes(struct.pack("<Q", len(h)) + h + data)


def _st_doc_subset(header: dict) -> dict:
    """The header's metadata plus its first and last tensor (every field of an entry appears in both)."""
    tensors = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    keep = ["__metadata__", tensors[0], tensors[-1]]
    return {k: header[k] for k in keep if k in header}


@pytest.mark.parametrize("how", ["truncate", "garble", "append", "delete", "header_types"])
def test_safetensors_file(how, llama, tmp_path, capfd):
    cases = Cases(tmp_path, capfd)
    f = "model.safetensors"
    n, header = _st_header(llama / f)
    size = (llama / f).stat().st_size
    names = [lambda d: d / f]
    if how == "truncate":
        for p in H.truncation_points(size, header_end=8 + n):
            cases.run(f"truncate@{p}", llama, lambda d, p=p: os.truncate(d / f, p), _to_orbax, names=names)
    elif how == "garble":
        for off in (0, 8, 8 + n // 2, 8 + n - 16):
            cases.run(f"garble@{off}", llama, lambda d, o=off: H.garble(d / f, o), _to_orbax, names=names)
        # inside a tensor's bytes: safetensors has no checksum, so this converts (the garbled values)
        cases.run("garble-data", llama, lambda d: H.garble(d / f, 8 + n + 100), _to_orbax, names=names,
                  may_succeed=lambda d, out: None)
    elif how == "append":
        cases.run("append", llama, lambda d: (d / f).write_bytes((d / f).read_bytes() + b"\0" * 16),
                  _to_orbax, names=names)
    elif how == "delete":
        cases.run("delete", llama, lambda d: (d / f).unlink(), _to_orbax, names=["model.safetensors"])
    else:
        sub = _st_doc_subset(header)
        for case, path, value in H.json_type_cases(sub):
            if path == ("__metadata__",) and value is None:
                continue  # the format allows a missing (null) metadata block
            tensor_names = [path[0]] if path[0] != "__metadata__" else []
            cases.run(case, llama, lambda d, p=path, v=value: _st_rewrite(d / f, H.with_value(header, p, v)),
                      _to_orbax, names=names + tensor_names)
        # a tensor's bytes overlapping another's, and two tensors swapping their lengths
        t0, t1 = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
        overlap = H.with_value(header, (t1, "data_offsets"), header[t0]["data_offsets"])
        cases.run("overlap", llama, lambda d: _st_rewrite(d / f, overlap), _to_orbax, names=names)
    cases.check()


def test_safetensors_damage_through_dare(llama, tmp_path, capfd):
    """The same reader serves the merger: a few damages through ``fusion-jax dare``."""
    cases = Cases(tmp_path, capfd)
    f = "model.safetensors"
    n, header = _st_header(llama / f)

    def dare(d, out):
        return ["dare", llama, d, out, "--drop", "0.5", "--quiet"]

    cases.run("truncate", llama, lambda d: os.truncate(d / f, 8 + n + 10), dare, names=[lambda d: d / f])
    cases.run("metadata-list", llama, lambda d: _st_rewrite(d / f, H.with_value(header, ("__metadata__",), [1])),
              dare, names=[lambda d: d / f])
    cases.check()


# -- safetensors index -------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["bytes", "delete", "types", "shards"])
def test_safetensors_index(how, sharded, tmp_path, capfd, tmp_path_factory):
    from fusion_jax.cli import main
    idx = "model.safetensors.index.json"
    ref = tmp_path_factory.mktemp("ref") / "orbax"
    assert main(["convert", "hf-to-orbax", str(sharded), str(ref)]) == 0
    cases = Cases(tmp_path, capfd)
    names = [lambda d: d / idx]
    same = lambda d, out: _params_equal(out, ref)  # noqa: E731
    doc = json.loads((sharded / idx).read_text())
    size = (sharded / idx).stat().st_size
    if how == "bytes":
        for p in H.truncation_points(sharded / idx):
            cases.run(f"truncate@{p}", sharded, lambda d, p=p: os.truncate(d / idx, p), _to_orbax, names=names)
        for off in (0, size // 2, size - 20):
            cases.run(f"garble@{off}", sharded, lambda d, o=off: H.garble(d / idx, o), _to_orbax, names=names)
        cases.run("utf16", sharded, lambda d: H.damage_file(d / idx, "utf16"), _to_orbax, names=names)
        cases.run("list", sharded, lambda d: H.damage_file(d / idx, "json", [doc]), _to_orbax, names=names)
    elif how == "delete":  # without the index every *.safetensors is read: the same model
        cases.run("delete", sharded, lambda d: (d / idx).unlink(), _to_orbax, names=names, may_succeed=same)
    elif how == "types":
        for case, path, value in H.json_type_cases(doc, max_keys=2):
            cases.run(case, sharded, lambda d, p=path, v=value: H.damage_file(d / idx, "json", H.with_value(doc, p, v)),
                      _to_orbax, names=names + [str(path[-1])] if path[0] == "weight_map" and len(path) > 1 else names,
                      may_succeed=same)
    else:
        shards = sorted(set(doc["weight_map"].values()))
        first = next(iter(doc["weight_map"]))
        wrong = H.with_value(doc, ("weight_map", first),
                             next(s for s in shards if s != doc["weight_map"][first]))
        cases.run("wrong-shard", sharded, lambda d: H.damage_file(d / idx, "json", wrong), _to_orbax,
                  names=names + [first])
        escape = H.with_value(doc, ("weight_map", first), "../" + doc["weight_map"][first])
        cases.run("outside", sharded, lambda d: H.damage_file(d / idx, "json", escape), _to_orbax,
                  names=names + [first])
        cases.run("shard-deleted", sharded, lambda d: (d / shards[-1]).unlink(), _to_orbax,
                  names=names + [shards[-1]])
    cases.check()


# -- config.json -------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["truncate", "garble", "delete", "utf16", "not_object"])
def test_config_json_bytes(how, llama, tmp_path, capfd):
    cases = Cases(tmp_path, capfd)
    f = "config.json"
    size = (llama / f).stat().st_size
    names = [lambda d: d / f]
    if how == "truncate":
        for p in H.truncation_points(llama / f):
            cases.run(f"truncate@{p}", llama, lambda d, p=p: os.truncate(d / f, p), _to_orbax, names=names)
    elif how == "garble":
        for off in (0, size // 2, size - 16):
            cases.run(f"garble@{off}", llama, lambda d, o=off: H.garble(d / f, o), _to_orbax, names=names)
    elif how == "delete":
        cases.run("delete", llama, lambda d: (d / f).unlink(), _to_orbax, names=names)
    elif how == "utf16":
        cases.run("utf16", llama, lambda d: H.damage_file(d / f, "utf16"), _to_orbax, names=names + ["UTF-16"])
    else:
        for v in ([json.loads((llama / f).read_text())], "x", 3, None):
            cases.run(f"top={H.kind(v)}", llama, lambda d, v=v: H.damage_file(d / f, "json", v), _to_orbax,
                      names=names)
    cases.check()


def _transformers_accepts(cls, field: str, value) -> bool:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            cls(**{field: value})
            return True
        except Exception:  # noqa: BLE001 - transformers' validation raises many types
            return False


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_config_json_field_types(arch, tmp_path, capfd, tmp_path_factory):
    """Every field of transformers' config class for the architecture (the schema), set to every JSON
    value of another kind. Where transformers rejects the value, we must exit 2 naming the field (an int
    for a float field is accepted by us as that number); where it accepts it, we may accept it too."""
    import transformers
    from fusion_jax.hf.checkpoint import read_config
    src = cached_tiny_hf_model(tmp_path_factory, "llama" if arch == "llama" else arch, tokenizer=False)
    cls = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
           "qwen2": transformers.Qwen2Config}[arch]
    doc = json.loads((src / "config.json").read_text())
    fields = [f.name for f in dataclasses.fields(cls)]
    if arch != "llama":  # the shared fields are covered by llama's run
        fields = [f for f in fields if f not in {g.name for g in dataclasses.fields(transformers.LlamaConfig)}]
    else:
        fields += [k for k in doc if k not in fields]
    float_fields = {f.name for f in dataclasses.fields(cls) if "float" in str(f.type)}
    cases = Cases(tmp_path, capfd)
    for field in fields:
        current = doc.get(field)
        for name, value in H.JSON_VALUES.items():
            if field in doc and H.kind(value) == H.kind(current) and value == current:
                continue
            rejected = not _transformers_accepts(cls, field, value)
            lenient = field in float_fields and H.kind(value) == "int"

            def may_succeed(d, out, field=field, value=value, rejected=rejected, lenient=lenient):
                assert not rejected or lenient, f"accepted {field}={value!r}, which transformers rejects"
                read_config(out)  # what we wrote reads back

            new = dict(doc, **{field: value})
            # a value transformers rejects must be named; one it accepts may describe another model than
            # the weights (attention_bias: true): then the message names config.json and the tensor
            names = [lambda d: d / "config.json"] + ([field] if rejected else [])
            cases.run(f"{field}={name}", src, lambda d, new=new: H.damage_file(d / "config.json", "json", new),
                      _to_orbax, names=names, may_succeed=may_succeed)
    cases.check()


# -- generation config and tokenizer files (passed through) -----------------------------------------
PASSTHROUGH = ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]


@pytest.mark.parametrize("fname", PASSTHROUGH)
def test_passthrough_files(fname, llama, tmp_path, capfd):
    """Damaged bytes: exit 2 naming the file. A field of another JSON kind: exit 2 naming the file and
    field (token ids), or the file copied byte for byte (we do not interpret it). Deleted: converts
    without it."""
    cases = Cases(tmp_path, capfd)
    size = (llama / fname).stat().st_size
    doc = json.loads((llama / fname).read_text())
    names = [lambda d: d / fname]

    def copied(d, out):
        assert (out / fname).read_bytes() == (d / fname).read_bytes()

    for p in H.truncation_points(llama / fname):
        cases.run(f"truncate@{p}", llama, lambda d, p=p: os.truncate(d / fname, p), _to_orbax, names=names)
    for off in (0, size // 2):
        cases.run(f"garble@{off}", llama, lambda d, o=off: H.garble(d / fname, o), _to_orbax, names=names,
                  may_succeed=copied)
    cases.run("utf16", llama, lambda d: H.damage_file(d / fname, "utf16"), _to_orbax, names=names)
    cases.run("list", llama, lambda d: H.damage_file(d / fname, "json", [doc]), _to_orbax, names=names)
    cases.run("delete", llama, lambda d: (d / fname).unlink(), _to_orbax, names=names,
              may_succeed=lambda d, out: not (out / fname).exists() or pytest.fail("a deleted file appeared"))
    # every key of the generation config (whose token ids we check); a tokenizer file is the tokenizers
    # library's business and copied byte for byte, so two of its keys stand for the rest
    for case, path, value in H.json_type_cases(doc, max_keys=10 if fname == "generation_config.json" else 2):
        if len(path) > (2 if fname == "generation_config.json" else 1):
            continue
        cases.run(case, llama, lambda d, p=path, v=value: H.damage_file(d / fname, "json", H.with_value(doc, p, v)),
                  _to_orbax, names=names + [str(path[0])], may_succeed=copied)
    cases.check()


def test_orbax_to_hf_checks_source_dir_files(orbax_ckpt, llama, tmp_path, capfd):
    d = _clone(llama, tmp_path / "src")
    os.truncate(d / "tokenizer_config.json", 10)
    before = H.snapshot(d, orbax_ckpt)
    o = H.cli(["convert", "orbax-to-hf", orbax_ckpt, tmp_path / "out", "--source-dir", d], capfd)
    H.assert_clean_error(o, tmp_path / "out", names=[d / "tokenizer_config.json"], inputs=before)


# -- Orbax params checkpoint -------------------------------------------------------------------------
def _orbax_damages(root: Path, full: bool = True):
    """(case, relative path, damage) for every file and directory of the checkpoint: deleted, emptied,
    halved, garbled (``full=False``: deleted and garbled only)."""
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if p.is_dir():
            yield f"{rel}:delete", rel, "delete", None
            continue
        size = p.stat().st_size
        yield f"{rel}:delete", rel, "delete", None
        if full:
            yield f"{rel}:empty", rel, "truncate", 0
        if size > 2:
            if full:
                yield f"{rel}:half", rel, "truncate", size // 2
            yield f"{rel}:garble", rel, "garble", size // 3


@pytest.mark.parametrize("part", ["params", "config"])
def test_orbax_checkpoint(part, orbax_ckpt, tmp_path, capfd, tmp_path_factory):
    """Every file and directory of an Orbax params checkpoint deleted, emptied, halved, garbled; its
    config.json per field. Exit 2 naming the checkpoint, or (a file the restore does not need) the same
    HF output as the undamaged checkpoint."""
    from fusion_jax.cli import main
    ref = tmp_path_factory.mktemp("ref") / "hf"
    assert main(["convert", "orbax-to-hf", str(orbax_ckpt), str(ref)]) == 0
    cases = Cases(tmp_path, capfd)

    def same(d, out):
        assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()

    def argv(d, out):
        return ["convert", "orbax-to-hf", d, out]

    if part == "params":
        for case, rel, how, arg in _orbax_damages(orbax_ckpt / "params"):
            cases.run(case, orbax_ckpt, lambda d, r=rel, h=how, a=arg: H.damage_file(d / "params" / r, h, a), argv,
                      names=[lambda d: d], may_succeed=same)
    else:
        f = "config.json"
        doc = json.loads((orbax_ckpt / f).read_text())
        for p in H.truncation_points(orbax_ckpt / f):
            cases.run(f"truncate@{p}", orbax_ckpt, lambda d, p=p: os.truncate(d / f, p), argv, names=[lambda d: d / f])
        cases.run("utf16", orbax_ckpt, lambda d: H.damage_file(d / f, "utf16"), argv, names=[lambda d: d / f])
        cases.run("delete", orbax_ckpt, lambda d: (d / f).unlink(), argv, names=[lambda d: d])
        block = dict(doc["fusion_jax"], fingerprints=dict(list(doc["fusion_jax"]["fingerprints"].items())[:1]))
        for case, path, value in H.json_type_cases({"fusion_jax": block,
                                                    "num_hidden_layers": doc["num_hidden_layers"],
                                                    "rope_scaling": {"rope_type": "linear", "factor": 2.0}}):
            base = dict(doc, rope_scaling={"rope_type": "linear", "factor": 2.0} if len(path) > 1 else None)
            new = H.with_value(base, path, value)
            cases.run(case, orbax_ckpt, lambda d, new=new: H.damage_file(d / f, "json", new), argv,
                      names=[lambda d: d / f, str(path[-1])], may_succeed=None if value is not None else same)
    cases.check()


# -- the trainer's Orbax checkpoints -----------------------------------------------------------------
def _toy_argv(workdir, steps):
    return ["--config=configs/toy.py", f"--config.workdir={workdir}", f"--config.trainer.total_steps={steps}",
            "--config.trainer.save_every=4", "--config.trainer.progress=False",
            "--config.trainer.tensorboard=False"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    from fusion_jax.train.cli import main
    w = tmp_path_factory.mktemp("toy") / "run"
    assert main(_toy_argv(w, 8)) == 0
    return w


def test_train_checkpoint_damage(toy_run, tmp_path):
    """Every file and directory of the latest step of a training run damaged; restoring it (what
    ``train.py`` does on resume) raises CheckpointError naming the step, or restores the same state."""
    import jax
    from flax import nnx
    from fusion_jax.errors import CheckpointError
    from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig
    from fusion_jax.train.checkpointing import Checkpointer
    from fusion_jax.train.losses import nnx_causal_lm_loss
    from fusion_jax.train.toy import ToyLM, get_config

    c = get_config()
    g, p = nnx.split(ToyLM(rngs=nnx.Rngs(0)), nnx.Param)
    tr = Trainer(nnx_causal_lm_loss(g), nnx.to_pure_dict(p), OptimizerConfig.from_config(c.optimizer),
                 TrainerConfig(total_steps=8))
    ref, _, _ = Checkpointer(toy_run / "checkpoints", save_every=4).restore(8, tr.state, tr.state_shardings)
    failures, n = [], 0
    step = toy_run / "checkpoints" / "8"
    for case, rel, how, arg in _orbax_damages(step, full=False):
        n += 1
        w = _clone(toy_run, tmp_path / f"w{n}")
        H.damage_file(w / "checkpoints" / "8" / rel, how, arg)
        ck = None
        try:
            ck = Checkpointer(w / "checkpoints", save_every=4)
            got, _, _ = ck.restore(8, tr.state, tr.state_shardings)
            for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        except CheckpointError as e:
            msg = str(e)
            if str(w / "checkpoints") not in msg or len(msg) > 1500 or "\n" in msg:
                failures.append(f"{case}: message {msg[:300]!r}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{case}: {type(e).__name__}: {str(e)[:300]}")
        finally:
            if ck is not None:
                ck.close()
            shutil.rmtree(w, ignore_errors=True)
    assert not failures, "\n".join(failures)


def test_train_py_resume_from_damaged_checkpoint(toy_run, tmp_path, capfd):
    """Through ``train.py``: a truncated data file of the latest step -> exit 2 naming the step."""
    w = _clone(toy_run, tmp_path / "w")
    d = max((w / "checkpoints" / "8" / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    os.truncate(d, d.stat().st_size // 2)
    o = H.train(_toy_argv(w, 9), capfd)
    H.assert_clean_error(o, None, names=[w / "checkpoints" / "8"])


# -- merge YAML --------------------------------------------------------------------------------------
MERGE_DOC = {"merge_method": "dare_ties", "base_model": "base",
             "models": [{"model": "a", "parameters": {"weight": 0.5, "density": 0.5}},
                        {"model": "b", "parameters": {"weight": 0.5, "density": 0.5}}],
             "parameters": {"normalize": True}, "dtype": "float32", "tokenizer_source": "base"}


@pytest.fixture(scope="module")
def merge_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    for name, seed in (("base", 0), ("a", 1), ("b", 2)):
        shutil.copytree(cached_tiny_hf_model(tmp_path_factory, "llama", seed=seed, tokenizer=True), root / name)
    return root


def _merge_case(merge_models, tmp_path, capfd, write, names) -> H.Outcome:
    cfg = merge_models / f"cfg-{len(list(merge_models.glob('cfg-*')))}.yml"
    write(cfg)
    out = tmp_path / "out"
    before = H.snapshot(merge_models / "base", merge_models / "a", merge_models / "b")
    o = H.cli(["merge", cfg, out, "--quiet"], capfd)
    H.assert_clean_error(o, out, names=[n(cfg) if callable(n) else n for n in names], inputs=before)
    return o


@pytest.mark.parametrize("how", ["truncate", "delete", "garble", "utf16", "safetensors", "not_mapping"])
def test_merge_yaml_bytes(how, merge_models, tmp_path, capfd):
    import yaml
    text = yaml.safe_dump(MERGE_DOC, sort_keys=False)

    def write(cfg):
        if how == "truncate":
            cfg.write_text(text[: len(text) // 3])
        elif how == "garble":
            cfg.write_text(text)
            H.garble(cfg, len(text) // 2)
        elif how == "utf16":
            cfg.write_bytes(text.encode("utf-16"))
        elif how == "not_mapping":
            cfg.write_text("- merge_method: linear\n")
        elif how == "safetensors":
            cfg.write_bytes((merge_models / "a" / "model.safetensors").read_bytes())
    if how == "delete":
        o = H.cli(["merge", merge_models / "nope.yml", tmp_path / "out", "--quiet"], capfd)
        H.assert_clean_error(o, tmp_path / "out", names=["nope.yml"])
        return
    # a YAML cut short may still parse (then what it lacks is named)
    _merge_case(merge_models, tmp_path, capfd, write, [lambda cfg: cfg.name] if how != "truncate" else [])


def _merge_type_cases():
    out = []
    for case, path, value in H.json_type_cases(MERGE_DOC, max_keys=8):
        if path[:2] == ("models", 0) or path[0] != "models":
            out.append(pytest.param(case, path, value, id=case))
    return out


@pytest.mark.parametrize("case,path,value", _merge_type_cases())
def test_merge_yaml_field_types(case, path, value, merge_models, tmp_path, capfd):
    """Every key of a merge YAML set to every JSON value of another kind. Where mergekit's own schema
    (its pydantic MergeConfiguration) rejects the document, or a density leaves [0, 1], we must exit 2
    naming the key; where mergekit accepts it, we may merge."""
    import yaml
    from mergekit.config import MergeConfiguration
    doc = H.with_value(MERGE_DOC, path, value)
    try:
        MergeConfiguration.model_validate(doc)
        rejected = False
    except Exception:  # noqa: BLE001 - pydantic's ValidationError
        rejected = True
    rejected = rejected or (path[-1] == "density" and H.kind(value) in ("int", "float") and not 0 <= value <= 1)
    cfg = merge_models / f"cfg-{case}.yml"
    cfg.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    before = H.snapshot(*(merge_models / m for m in ("base", "a", "b")))
    o = H.cli(["merge", cfg, out, "--quiet"], capfd)
    if o.rc == 0 and not rejected:
        assert (out / "model.safetensors").is_file()
        assert H.snapshot(*(merge_models / m for m in ("base", "a", "b"))) == before
        return
    named = [[k for k in path if isinstance(k, str)][-1]] if rejected and value is not None else []
    H.assert_clean_error(o, out, names=named, inputs=before)


# -- data files --------------------------------------------------------------------------------------
ROWS = [{"prompt": f"question {i}?", "response": f"answer {i}.", "domain": "text"} for i in range(6)]


def _write_data(path: Path, rows) -> None:
    fmt = path.suffix
    if fmt == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == ".json":
        path.write_text(json.dumps(rows))
    elif fmt == ".csv":
        import csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("fmt", [".jsonl", ".json", ".csv", ".parquet"])
def test_data_files(fmt, tmp_path):
    """``load_examples`` (what every train.py method reads data with): DataError naming the file for
    every damage, or examples that are all text (a file cut at a row boundary is a shorter file)."""
    from fusion_jax.data.loading import load_examples
    from fusion_jax.errors import DataError
    clean = tmp_path / f"clean{fmt}"
    _write_data(clean, ROWS)
    size = clean.stat().st_size
    damages = [(f"truncate@{p}", lambda f, p=p: os.truncate(f, p)) for p in H.truncation_points(clean)]
    damages += [(f"garble@{o}", lambda f, o=o: H.garble(f, o)) for o in (0, size // 2, size - 20)]
    damages += [("delete", lambda f: f.unlink())]
    if fmt != ".parquet":
        damages += [("utf16", lambda f: H.damage_file(f, "utf16"))]
    for field in ROWS[0]:
        for name, value in H.JSON_VALUES.items():
            if fmt == ".csv" and H.kind(value) in ("list", "object"):
                continue
            rows = [dict(r) for r in ROWS]
            rows[2][field] = value
            damages.append((f"{field}={name}", lambda f, rows=rows: _write_data(f, rows)))
    failures = []
    for i, (case, damage) in enumerate(damages):
        f = tmp_path / f"d{i}{fmt}"
        shutil.copy(clean, f)
        try:
            damage(f)
        except Exception:  # noqa: BLE001 - a writer that cannot even express the damage
            continue
        before = H.digest(f) if f.exists() else {}
        try:
            ex = load_examples(f, domain=None, cache_dir=tmp_path / "cache")
            bad = [e for e in ex if not all(isinstance(e[k], str) for k in ("prompt", "response", "domain"))]
            if bad or len(ex) > len(ROWS):
                failures.append(f"{case}: accepted {bad[:1] or len(ex)}")
        except DataError as e:
            if str(f) not in str(e) or "\n" in str(e).strip():
                failures.append(f"{case}: message {str(e)[:300]!r}")
        except Exception as e:  # noqa: BLE001
            failures.append(f"{case}: {type(e).__name__}: {str(e)[:300]}")
        if f.exists() and H.digest(f) != before:
            failures.append(f"{case}: the data file was modified")
    assert not failures, "\n".join(failures)


def test_data_file_through_train_py(tmp_path, capfd, tmp_path_factory):
    """A damaged data file through ``train.py`` (UltraFuser fusing its own specialists): exit 2 naming
    it, before any training."""
    domains = ("text", "code", "math")
    spec = [cached_tiny_hf_model(tmp_path_factory, "llama", seed=s, tokenizer=True) for s in (0, 1, 2)]
    files = {}
    for split in ("train", "eval"):
        for d in domains:
            files[(split, d)] = tmp_path / f"{split}_{d}.jsonl"
            _write_data(files[(split, d)], ROWS)
    bad = files[("eval", "math")]
    os.truncate(bad, bad.stat().st_size - 7)
    argv = ["--config=configs/ultrafuser.py:smoke", f"--config.output_dir={tmp_path / 'runs'}",
            "--config.specialists.paths=(" + ",".join(f"'{p}'" for p in spec) + ")"]
    argv += [f"--config.data.{split}_files.{d}={f}" for (split, d), f in files.items()]
    before = H.snapshot(bad, *spec)
    o = H.train(argv, capfd)
    H.assert_clean_error(o, None, names=[bad], inputs=before)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.orbax*"))


def test_damaged_orbax_in_a_real_process(orbax_ckpt, llama, tmp_path):
    """In a real process (where Orbax's abandoned reads and writers used to print "Event loop is
    closed" and "Exception ignored" tracebacks after the message, some at interpreter exit): several
    damaged checkpoints (and, where a tmpfs can be mounted, a full disk) in a row, each exactly one line."""
    import subprocess
    import sys
    cases = []
    for name, damage in (("no_ocdbt", lambda d: shutil.rmtree(d / "params" / "ocdbt.process_0")),
                         ("no_manifest", lambda d: (d / "params" / "manifest.ocdbt").unlink()),
                         ("cut_data", lambda d: os.truncate(max((d / "params").rglob("d/*"),
                                                                key=lambda p: p.stat().st_size), 100))):
        d = _clone(orbax_ckpt, tmp_path / name)
        damage(d)
        cases.append(["convert", "orbax-to-hf", str(d), str(tmp_path / f"out_{name}")])
    import contextlib
    with contextlib.ExitStack() as stack:
        if H.can_mount():
            fs = stack.enter_context(H.tmpfs(tmp_path / "fs", "96k"))
            cases.append(["convert", "hf-to-orbax", str(llama), str(fs / "out")])
        code = ("import sys, json\nfrom fusion_jax.cli import main\n"
                "for argv in json.loads(sys.argv[1]):\n    print('rc', main(argv), flush=True)\n")
        p = subprocess.run([sys.executable, "-c", code, json.dumps(cases)], capture_output=True, text=True,
                           cwd=H.REPO, env=H.subprocess_env(), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split().count("2") == len(cases), p.stdout
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == len(cases) and all(ln.startswith("error: ") for ln in lines), p.stderr[-4000:]
    assert all(len(ln) < 1000 for ln in lines), "a message pastes TensorStore's spec"


# -- config.json read by the merger (its own reader, fusion_jax/merging/executor.py) ------------------
def _cfg_damages():
    def edit(**kw):
        def f(d):
            c = json.loads((d / "config.json").read_text())
            for k, v in kw.items():
                if v is ...:
                    c.pop(k)
                else:
                    c[k] = v
            (d / "config.json").write_text(json.dumps(c))
        return f
    return [
        pytest.param("truncated", lambda d: os.truncate(d / "config.json", 30), id="truncated"),
        pytest.param("utf16", lambda d: H.damage_file(d / "config.json", "utf16"), id="utf16"),
        pytest.param("list", lambda d: H.damage_file(d / "config.json", "json", [1]), id="list"),
        pytest.param("no_layers", edit(num_hidden_layers=...), id="no_layers"),
        pytest.param("str_hidden", edit(hidden_size="64"), id="str_hidden"),
        pytest.param("zero_heads", edit(num_attention_heads=0), id="zero_heads"),
    ]


@pytest.mark.parametrize("name,damage", _cfg_damages())
def test_config_json_through_dare(name, damage, llama, tmp_path, capfd, tmp_path_factory):
    base = cached_tiny_hf_model(tmp_path_factory, "llama", seed=1, tokenizer=True)
    d = _clone(llama, tmp_path / "ft")
    damage(d)
    before = H.snapshot(d, base)
    o = H.cli(["dare", base, d, tmp_path / "out", "--drop", "0.5", "--quiet"], capfd)
    H.assert_clean_error(o, tmp_path / "out", names=[d / "config.json"], inputs=before)
