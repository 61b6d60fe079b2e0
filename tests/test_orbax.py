"""Orbax params checkpoints: exact save -> restore, ``fusion-jax convert`` both ways, and (8 simulated
devices) HF load straight into target shardings + Orbax restore into a different sharding."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from fusion_jax.cli import main as cli_main
from fusion_jax.hf import load
from fusion_jax.hf.orbax_io import read_orbax_config, restore_params, save_params
from fusion_jax.hf.safetensors_io import SafetensorsReader
from hf_fixtures import cached_tiny_hf_model

REPO = Path(__file__).resolve().parents[1]


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("arch,dtype", [("llama3", "float32"), ("qwen2", "bfloat16")])
def test_save_restore_identical_pytree(arch, dtype, tmp_path_factory, tmp_path):
    config, params = load(cached_tiny_hf_model(tmp_path_factory, arch, dtype=dtype))
    out = save_params(tmp_path / "ckpt", params, config)
    assert read_orbax_config(out) == config
    config2, restored = restore_params(out)
    assert config2 == config
    _assert_same_tree(restored, params)
    assert not list(tmp_path.glob(".ckpt*"))  # no temporary left beside the output


def test_convert_hf_to_orbax_to_hf_is_byte_identical(tmp_path_factory, tmp_path, capsys):
    src = cached_tiny_hf_model(tmp_path_factory, "mistral", dtype="bfloat16", tokenizer=True)
    assert cli_main(["convert", "hf-to-orbax", str(src), str(tmp_path / "orbax")]) == 0
    assert (tmp_path / "orbax" / "tokenizer.json").is_file()
    assert cli_main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(tmp_path / "hf"),
                     "--max-shard-size", "60KB"]) == 0
    assert "wrote" in capsys.readouterr().out
    out = tmp_path / "hf"
    assert (out / "model.safetensors.index.json").is_file()
    for f in ("tokenizer.json", "generation_config.json"):
        assert (out / f).read_bytes() == (src / f).read_bytes()
    with SafetensorsReader(src) as a, SafetensorsReader(out) as b:
        assert sorted(a.names()) == sorted(b.names())
        for n in a.names():
            assert a.dtype(n) == b.dtype(n) and a.get(n).tobytes() == b.get(n).tobytes(), n
    # refuses to clobber an existing output, exit 2
    assert cli_main(["convert", "orbax-to-hf", str(tmp_path / "orbax"), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


_RESHARD_SCRIPT = textwrap.dedent("""
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    import jax, numpy as np
    from flax import nnx
    from fusion_jax import sharding as sh
    from fusion_jax.hf import load
    from fusion_jax.hf.orbax_io import restore_params, save_params
    from fusion_jax.models import CausalLM
    src, out = sys.argv[1], sys.argv[2]
    assert jax.device_count() == 8
    config, ref = load(src)                                   # one device
    abstract = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    axes = sh.state_logical_axes(abstract)
    shapes = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    def shardings(mesh_cfg):
        return sh.params_shardings(shapes, axes, sh.make_mesh(mesh_cfg))
    def check(params, target):
        errs, bad = [], []
        for (path, x), r, t in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(ref),
                                   jax.tree.leaves(target)):
            if not x.sharding.is_equivalent_to(t, x.ndim):
                bad.append(jax.tree_util.keystr(path))
            errs.append(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(r, np.float32)))))
            for s in x.addressable_shards:                   # every shard holds exactly its slice
                assert np.array_equal(np.asarray(s.data), np.asarray(r)[s.index])
        return dict(max_err=max(errs), bad=bad)
    from fusion_jax.hf import safetensors_io as sio
    nread = [0]
    pread = sio._pread_into
    def counting(fd, buf, offset, where):
        nread[0] += len(buf)
        return pread(fd, buf, offset, where)
    sio._pread_into = counting
    res = {"file_bytes": sio.SafetensorsReader(src).total_bytes()}
    a = shardings({"fsdp": 8})
    params = load(src, shardings=a)[1]                        # HF -> straight into fsdp=8
    res["load_fsdp8"] = check(params, a)
    res["bytes_read_fsdp8"] = nread[0]
    nread[0] = 0
    b = shardings({"fsdp": 2, "tensor": 4})                   # replicated dims: shared shards
    res["load_fsdp2_tensor4"] = check(load(src, shardings=b)[1], b)
    res["bytes_read_fsdp2_tensor4"] = nread[0]
    res["load_spec"] = str(params["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec)
    save_params(out, params, config)
    cfg2, restored = restore_params(out, target_shardings=b)  # Orbax -> fsdp=2 x tensor=4
    res["restore_fsdp2_tensor4"] = check(restored, b)
    res["restore_spec"] = str(restored["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec)
    res["n_devices"] = len(restored["embed"]["embedding"].sharding.device_set)
    print("RESULT" + json.dumps(res))
""")


def test_load_and_restore_into_target_shardings_on_8_devices(tmp_path_factory, tmp_path):
    # hidden 64 / fsdp 8, intermediate 112 / tensor 4, vocab 160 / tensor 4 all divide: nothing falls back
    src = cached_tiny_hf_model(tmp_path_factory, "llama")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    p = subprocess.run([sys.executable, "-c", _RESHARD_SCRIPT, str(src), str(tmp_path / "ckpt")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-4000:]
    res = json.loads(p.stdout.split("RESULT")[-1])
    # the process reads every byte of the checkpoint exactly once, however the 8 devices split it
    assert res["bytes_read_fsdp8"] == res["file_bytes"] == res["bytes_read_fsdp2_tensor4"], res
    for k in ("load_fsdp8", "load_fsdp2_tensor4", "restore_fsdp2_tensor4"):
        assert res[k]["max_err"] == 0.0 and res[k]["bad"] == [], (k, res[k])
    assert res["load_spec"] == "P(None, 'fsdp')", res
    assert res["restore_spec"] == "P(None, 'fsdp', 'tensor')", res
    assert res["n_devices"] == 8


def test_never_retrieved_orbax_and_tensorstore_errors_are_dropped_others_kept():
    """asyncio's "exception was never retrieved" records after a failed Orbax read: an abandoned Orbax
    task (Orbax frames in its message) and a TensorStore read's own future (no Python frames, a status
    error) are dropped, the caller reports the failure once; any other asyncio error passes through."""
    import logging

    from fusion_jax.utils.orbax_errors import _FILTER

    def record(msg, exc=None):
        return logging.LogRecord("asyncio", logging.ERROR, "asyncio/base_events.py", 1, msg, None,
                                 (type(exc), exc, None) if exc is not None else None)

    ts = ValueError('OUT_OF_RANGE: Error reading "lm_head.kernel/0.0" in OCDBT database at local file "/x/params/": '
                    'Requested byte range [0, 10) is not valid for value of size 5')
    assert not _FILTER.filter(record("Future exception was never retrieved", ts))
    assert not _FILTER.filter(record("Task exception was never retrieved\nfuture: <Task coro=<f() at "
                                     "/site-packages/orbax/checkpoint/x.py:1>>"))
    assert _FILTER.filter(record("Future exception was never retrieved", ValueError("a user's own error")))
    assert _FILTER.filter(record("Task exception was never retrieved\nfuture: <Task coro=<mine() at /app/x.py:1>>"))


def test_never_awaited_orbax_coroutines_are_silent_others_warn(tmp_path):
    """A coroutine Orbax created and abandoned unstarted warns "was never awaited" when collected: dropped
    for a coroutine whose code is in an ``/orbax/`` file; the same warning of any other coroutine is shown."""
    orbax_dir = tmp_path / "site" / "orbax"
    orbax_dir.mkdir(parents=True)
    (orbax_dir / "fake_store.py").write_text("async def _get_array_metadatas():\n    return 1\n")
    (tmp_path / "mine.py").write_text("async def mine():\n    return 1\n")
    code = textwrap.dedent(f"""
        import gc, importlib.util, sys
        from fusion_jax.utils.orbax_errors import quiet_orbax_noise
        quiet_orbax_noise()
        def load(name, path):
            spec = importlib.util.spec_from_file_location(name, path)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
        orbax_like = load("fake_store", {str(orbax_dir / "fake_store.py")!r})
        mine = load("mine", {str(tmp_path / "mine.py")!r})
        c = orbax_like._get_array_metadatas(); del c; gc.collect()
        c = mine.mine(); del c; gc.collect()
    """)
    p = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "coroutine 'mine' was never awaited" in p.stderr
    assert "_get_array_metadatas" not in p.stderr, p.stderr
