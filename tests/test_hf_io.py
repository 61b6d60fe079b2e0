"""HF checkpoint I/O: byte-exact round trips, transformers reloads our output, legacy .bin, and a clear
error (naming file and tensor) for every bad input, through ``load`` and through ``fusion-jax convert``."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fusion_jax.cli import main as cli_main  # noqa: E402
from fusion_jax.errors import (CheckpointError, ConfigError, CorruptFileError, FusionError,  # noqa: E402
                               MissingTensorError, ShapeMismatchError, UnknownArchitectureError)
from fusion_jax.hf import load, save  # noqa: E402
from fusion_jax.hf.safetensors_io import HOST_ALIGN, INDEX_NAME, SafetensorsReader, save_tensors  # noqa: E402
from hf_fixtures import cached_tiny_hf_model, make_tiny_hf_model, torch_reference  # noqa: E402

IDS = np.random.RandomState(0).randint(3, 160, (2, 12))


def _tensors(path) -> dict[str, np.ndarray]:
    with SafetensorsReader(path) as r:
        return {n: r.get(n) for n in r.names()}


def _hf_logits(path) -> np.ndarray:
    with torch.no_grad():
        return torch_reference(path)(torch.tensor(IDS)).logits.numpy()


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Llama checkpoint with a tokenizer and generation_config.json, as transformers writes them."""
    path = make_tiny_hf_model(tmp_path_factory.mktemp("src") / "llama", "llama", tokenizer=True)
    assert (path / "generation_config.json").is_file() and (path / "tokenizer.json").is_file()
    return path


# -- round trips -----------------------------------------------------------------------------------
def test_fp32_round_trip_sharded_is_byte_identical_and_transformers_reloads_it(src, tmp_path):
    config, params = load(src)
    assert config.param_dtype == "float32"
    out = save(params, config, tmp_path / "out", max_shard_size="40KB", source_dir=src)
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 2 and all(s.stat().st_size < 40_000 + 8_000 for s in shards)
    index = json.loads((out / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    ours, orig = _tensors(out), _tensors(src)
    assert sorted(ours) == sorted(orig)
    for name, t in orig.items():
        assert ours[name].dtype == t.dtype and ours[name].tobytes() == t.tobytes(), name
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in orig.values())
    for f in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes(), f
    np.testing.assert_array_equal(_hf_logits(out), _hf_logits(src))


def test_bf16_tied_round_trip_keeps_bf16(tmp_path_factory, tmp_path):
    src = cached_tiny_hf_model(tmp_path_factory, "qwen2", dtype="bfloat16")
    config, params = load(src)
    assert config.param_dtype == "bfloat16" and config.tie_word_embeddings
    assert params["layers"]["attn"]["q_proj"]["bias"].dtype == np.dtype("bfloat16")
    out = save(params, config, tmp_path / "out")
    assert [p.name for p in out.glob("*.safetensors")] == ["model.safetensors"]
    ours, orig = _tensors(out), _tensors(src)
    assert sorted(ours) == sorted(orig)   # transformers does not store the tied lm_head either
    for name, t in orig.items():
        assert str(ours[name].dtype) == "bfloat16" and ours[name].tobytes() == t.tobytes(), name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    np.testing.assert_array_equal(_hf_logits(out), _hf_logits(src))


def test_save_casts_on_request_and_refuses_to_clobber(src, tmp_path):
    config, params = load(src)
    out = save(params, config, tmp_path / "bf16", dtype="bf16")
    t = _tensors(out)["model.layers.0.mlp.up_proj.weight"]
    assert str(t.dtype) == "bfloat16"
    with pytest.raises(FusionError, match="already exists"):
        save(params, config, out)
    assert load(out)[0].param_dtype == "bfloat16"


def test_legacy_pytorch_bin_single_and_sharded(src, tmp_path):
    ref = load(src)[1]
    sd = torch_reference(src).state_dict()
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(src / "config.json", single)
    torch.save(sd, single / "pytorch_model.bin")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(src / "config.json", sharded)
    names = sorted(sd)
    weight_map = {}
    for i, part in enumerate((names[::2], names[1::2])):
        fname = f"pytorch_model-0000{i + 1}-of-00002.bin"
        torch.save({k: sd[k] for k in part}, sharded / fname)
        weight_map.update({k: fname for k in part})
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for d in (single, sharded):
        config, params = load(d)
        for a, b in zip(_leaves(params), _leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_legacy_bin_with_code_in_the_pickle_is_refused(src, tmp_path, capsys):
    class Evil:
        def __reduce__(self):
            return (print, ("EXECUTED",))

    d = tmp_path / "evil"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    torch.save({"model.embed_tokens.weight": Evil()}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*weights_only=True"):
        load(d)
    assert "EXECUTED" not in capsys.readouterr().out


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


# -- bad inputs ------------------------------------------------------------------------------------
def _clone(src: Path, root: Path, name: str) -> Path:
    d = root / name
    shutil.copytree(src, d)
    return d


def _rewrite(d: Path, fn) -> None:
    t = _tensors(d / "model.safetensors")
    fn(t)
    (d / "model.safetensors").unlink()
    save_tensors(d, t)


def _edit_config(d: Path, **kw) -> None:
    c = json.loads((d / "config.json").read_text())
    c.update(kw)
    (d / "config.json").write_text(json.dumps(c))


def _missing(d):
    _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))


def _wrong_shape(d):
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", np.zeros((16, 64), np.float32)))


def _truncated(d):
    f = d / "model.safetensors"
    os.truncate(f, f.stat().st_size - 1000)


def _corrupt_header(d):
    f = d / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[8:40] = b"x" * 32
    f.write_bytes(bytes(b))


def _header_too_long(d):
    f = d / "model.safetensors"
    b = bytearray(f.read_bytes())
    b[:8] = (10**9).to_bytes(8, "little")
    f.write_bytes(bytes(b))


def _missing_shard(d):
    idx = json.loads((d / INDEX_NAME).read_text())
    (d / sorted(set(idx["weight_map"].values()))[1]).unlink()


BAD = {
    # name: (corruption, sharded source?, error class, regexes that must all appear in the message)
    "missing_tensor": (_missing, False, MissingTensorError,
                       [r"'model\.layers\.1\.mlp\.up_proj\.weight'", r"model\.safetensors"]),
    "wrong_shape": (_wrong_shape, False, ShapeMismatchError,
                    [r"'model\.layers\.0\.self_attn\.k_proj\.weight'", r"\[16, 64\]", r"\[32, 64\]",
                     r"model\.safetensors", r"config\.json"]),
    "unknown_architecture": (lambda d: _edit_config(d, architectures=["GPT2LMHeadModel"], model_type="gpt2"),
                             False, UnknownArchitectureError, [r"GPT2LMHeadModel", r"config\.json"]),
    "truncated": (_truncated, False, CorruptFileError, [r"model\.safetensors", r"truncated", r"tensor '"]),
    "corrupt_header": (_corrupt_header, False, CorruptFileError, [r"model\.safetensors", r"header"]),
    "header_length": (_header_too_long, False, CorruptFileError, [r"model\.safetensors", r"header length"]),
    "config_vocab": (lambda d: _edit_config(d, vocab_size=200), False, ShapeMismatchError,
                     [r"'model\.embed_tokens\.weight'", r"\[160, 64\]", r"\[200, 64\]", r"config\.json"]),
    "config_hidden": (lambda d: _edit_config(d, hidden_size=96), False, ShapeMismatchError,
                      [r"'model\.embed_tokens\.weight'", r"config\.json"]),
    "config_layers": (lambda d: _edit_config(d, num_hidden_layers=1), False, CheckpointError,
                      [r"unexpected", r"'model\.layers\.1\.", r"config\.json"]),
    "config_unparsable": (lambda d: (d / "config.json").write_text("{not json"), False, ConfigError,
                          [r"config\.json", r"not valid JSON"]),
    "missing_index_shard": (_missing_shard, True, CheckpointError,
                            [r"model\.safetensors\.index\.json", r"model-0000\d-of-\d+\.safetensors",
                             r"does not exist", r"tensor"]),
    "corrupt_index": (lambda d: (d / INDEX_NAME).write_text('{"weight_map": '), True, CorruptFileError,
                      [r"model\.safetensors\.index\.json", r"not valid JSON"]),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), False, CheckpointError,
                   [r"no model\.safetensors"]),
}


@pytest.fixture(scope="module")
def bad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    plain = make_tiny_hf_model(root / "plain", "llama")
    sharded = make_tiny_hf_model(root / "sharded", "llama", max_shard_size="40KB")
    dirs = {}
    for name, (corrupt, use_sharded, _, _) in BAD.items():
        dirs[name] = _clone(sharded if use_sharded else plain, root, name)
        corrupt(dirs[name])
    return dirs


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_gives_clear_error(name, bad_root, tmp_path, capsys):
    _, _, cls, patterns = BAD[name]
    with pytest.raises(cls) as info:
        load(bad_root[name])
    for pat in patterns:
        assert re.search(pat, str(info.value)), (pat, str(info.value))
    assert str(bad_root[name]) in str(info.value)  # names the file at fault, with its path
    # the CLI: exit 2, the same message, nothing at the output path
    out = tmp_path / "out"
    rc = cli_main(["convert", "hf-to-orbax", str(bad_root[name]), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and str(info.value) in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_convert_orbax_to_hf_on_bad_input_exits_2(bad_root, tmp_path, capsys):
    # an HF directory is not an Orbax params checkpoint
    out = tmp_path / "out"
    rc = cli_main(["convert", "orbax-to-hf", str(bad_root["config_vocab"]), str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "not a fusion-jax Orbax params checkpoint" in err and str(bad_root["config_vocab"]) in err
    assert not out.exists()


def test_save_rejects_params_that_disagree_with_config(src, tmp_path):
    config, params = load(src)
    with pytest.raises(ShapeMismatchError, match=r"layers/mlp/gate_proj/kernel.*\[2, 64, 112\]"):
        save(params, config.replace(intermediate_size=64), tmp_path / "a")
    del params["final_norm"]
    with pytest.raises(MissingTensorError, match="model.norm.weight"):
        save(params, config, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- the read path's pieces ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "int8"])
def test_transpose_into_odd_shapes_and_strided_destination(dtype):
    from fusion_jax.hf.mapping import transpose2d, transpose_into
    rng = np.random.RandomState(0)
    for shape in [(37, 5), (1, 19), (100, 33), (16, 16), (17, 1)]:
        a = (rng.standard_normal(shape) * 50).astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else dtype)
        np.testing.assert_array_equal(transpose2d(a), a.T)
        big = np.zeros((shape[1] + 3, shape[0] + 9), a.dtype)
        transpose_into(big[2:2 + shape[1], 4:4 + shape[0]], a)   # a strided view, as a shard slot
        np.testing.assert_array_equal(big[2:2 + shape[1], 4:4 + shape[0]], a.T)
        assert not big[:2].any() and not big[:, :4].any() and not big[:, 4 + shape[0]:].any()


def test_read_path_chunks_slices_casts_and_shared_reads(tmp_path_factory, monkeypatch):
    """Any set of shard boxes (interior slices on every axis, halves, the whole) of one HF tensor, read in
    many tiny chunks, with and without a cast, equals those slices of the param; each HF row is read once
    however many boxes need it (dims deliberately not multiples of 16)."""
    import jax

    from fusion_jax.hf import checkpoint, mapping
    path = cached_tiny_hf_model(tmp_path_factory, "llama", intermediate_size=50, vocab_size=83)
    ref = load(path)[1]
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", 300)       # a few rows per pread
    config, chunked = load(path)
    for a, b in zip(jax.tree.leaves(chunked), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reader = checkpoint._open_reader(path)
    rows_read = []
    read_rows = reader.read_rows
    monkeypatch.setattr(reader, "read_rows", lambda n, a, b, out=None: (rows_read.append(b - a),
                                                                          read_rows(n, a, b, out))[1])
    try:
        for row in mapping.table(config):
            full = np.asarray(mapping.get_path(ref, row.path))
            ours = full[1] if row.stacked else full               # one HF tensor, in our layout
            name = row.hf_name(1) if row.stacked else row.hf_name()
            boxes = [tuple((k // 3, k - k // 4) for k in ours.shape), tuple((0, k // 2) for k in ours.shape),
                     tuple((k // 2, k) for k in ours.shape), tuple((0, k) for k in ours.shape)]
            for dt in (np.dtype(np.float32), np.dtype(ml_dtypes.bfloat16)):
                targets = [(checkpoint.aligned_empty(tuple(b - a for a, b in box), dt), box) for box in boxes]
                rows_read.clear()
                checkpoint._read_tensor_into(reader, name, targets, row.transpose, dt)
                assert sum(rows_read) == reader.shape(name)[0], name      # every HF row exactly once
                for dest, box in targets:
                    assert dest.ctypes.data % HOST_ALIGN == 0
                    np.testing.assert_array_equal(dest, ours[tuple(slice(a, b) for a, b in box)].astype(dt))
    finally:
        reader.close()


def test_reads_are_aligned_and_read_flat_takes_a_flat_range(tmp_path):
    """Every read lands in a 64-byte-aligned buffer (XLA:CPU adopts those without a copy), and
    ``read_flat`` returns elements [lo, hi) of the flat view, refusing ranges outside the tensor."""
    a = np.arange(6 * 7, dtype=np.float32).reshape(6, 7)
    b = (np.arange(5 * 3) / 7).astype(ml_dtypes.bfloat16).reshape(5, 3)
    save_tensors(tmp_path, {"a": a, "b": b})
    with SafetensorsReader(tmp_path) as r:
        for name, want in (("a", a), ("b", b)):
            got = r.get(name)
            assert got.ctypes.data % HOST_ALIGN == 0
            np.testing.assert_array_equal(got, want)
            flat = r.read_flat(name, 3, 11)
            assert flat.ctypes.data % HOST_ALIGN == 0
            np.testing.assert_array_equal(flat, want.reshape(-1)[3:11])
        assert r.read_flat("a", 42, 42).size == 0
        with pytest.raises(ValueError, match="'a'"):
            r.read_flat("a", 40, 43)


def test_malloc_tuning_applies_on_glibc_and_can_be_turned_off():
    import subprocess
    import sys
    code = "from fusion_jax.utils.malloc import retain_freed_memory as r; print(r())"
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "FUSION_JAX_MALLOC_TUNING": "0"})
    import platform
    assert on.stdout.strip() == str(platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")
    assert off.stdout.strip() == "False"
