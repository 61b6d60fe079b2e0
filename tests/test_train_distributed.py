"""Multi-process and multi-device training on CPU give the single-device result.

* two local processes under jax.distributed (localhost coordinator), each reading only its share of
  every batch, end where one process ends; their checkpoints (async, keep-K) and logs are complete
* 8 simulated devices (fsdp x tensor meshes, with and without gradient accumulation) in one process
* a full train state saved on one mesh restored straight into a different sharding, then trained on

Every run is a subprocess (a process's device count and jax.distributed are fixed at start). XLA's LLVM
backend runs at -O0 here: it only changes code generation speed, and both sides of every comparison use it.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

_ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
            XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def _result(stdout: str) -> dict:
    return json.loads([l for l in stdout.splitlines() if l.startswith("RESULT")][-1][6:])


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _toy_cmd(workdir, out, *extra):
    # TensorBoard output is tested in test_train_logging (tensorboardX would import torch here: seconds)
    return [sys.executable, "-m", "fusion_jax.train.toy", "--workdir", str(workdir), "--steps", "6",
            "--save-every", "2", "--keep", "2", "--out", str(out), "--no-tensorboard", *extra]


def _communicate(procs, timeout=300):
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
            outs.append(_result(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


def test_two_processes_match_one(tmp_path):
    port = _free_port()
    # the reference and the two-process run at once: the machine's cores are not idle while one compiles
    procs = [subprocess.Popen(_toy_cmd(tmp_path / "one", tmp_path / "one.npz"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV)]
    procs += [subprocess.Popen(_toy_cmd(tmp_path / "two", tmp_path / "two.npz", "--coordinator", f"localhost:{port}",
                                        "--num-processes", "2", "--process-id", str(i)),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_ENV)
              for i in range(2)]
    ref, p0, p1 = _communicate(procs)
    for r in (p0, p1):
        assert r["step"] == 6 and r["resumed_from"] is None
        np.testing.assert_allclose(r["losses"], ref["losses"], rtol=1e-5)
    a, b = _load(tmp_path / "one.npz"), _load(tmp_path / "two.npz")
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # each process read only its half of every batch; together they read what the single process read
    assert len(p0["reads"]) == len(p1["reads"]) == len(ref["reads"]) // 2 == 6 * 8 // 2
    assert not set(p0["reads"]) & set(p1["reads"])
    assert sorted(p0["reads"] + p1["reads"]) == sorted(ref["reads"])
    # one checkpoint directory written by both processes: keep-2 of the saves at steps 2, 4, 6, each with
    # both processes' data-iterator states; the metrics file is written once (by process 0)
    ckpt = tmp_path / "two" / "checkpoints"
    assert sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) == [4, 6]
    for step in (4, 6):
        assert (ckpt / str(step) / "commit_success.txt").exists()
        assert sorted(n for n in os.listdir(ckpt / str(step) / "data") if n.endswith(".json")) == [
            "process_0-of-2.json", "process_1-of-2.json"]
    logs = tmp_path / "two" / "logs"
    rows = [json.loads(l) for l in open(logs / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_sec"] > 0 and np.isfinite(r["loss"]) for r in rows)


_SCRIPT = textwrap.dedent("""
    import os, json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from fusion_jax import sharding as shd
    from fusion_jax.train import Trainer, TrainerConfig, OptimizerConfig
    from fusion_jax.train.checkpointing import Checkpointer
    from fusion_jax.train.losses import nnx_causal_lm_loss
    from fusion_jax.train.toy import ToyLM, toy_batches
    assert jax.device_count() == 8
    WORK = os.environ["WORK"]
    # identical programs compiled twice (same mesh and accumulation) come from this cache
    jax.config.update("jax_compilation_cache_dir", os.path.join(WORK, "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

    def trainer(mesh, workdir=None, accum=1, resume=True, callbacks=()):
        m = ToyLM(vocab=32, dim=16, hidden=24, layers=2, rngs=nnx.Rngs(0))
        g, p = nnx.split(m, nnx.Param)
        # embed and final_norm frozen: the checkpoint holds a frozen part too
        return Trainer(nnx_causal_lm_loss(g), nnx.to_pure_dict(p),
                       OptimizerConfig(learning_rate=1e-2, weight_decay=0.01, trainable=("layers/", "lm_head")),
                       TrainerConfig(total_steps=4, workdir=workdir, save_every=2, progress=False, resume=resume,
                                     grad_accum_steps=accum, async_checkpointing=False, tensorboard=False),
                       mesh=mesh, param_logical_axes=shd.state_logical_axes(p), callbacks=callbacks)

    def err(x, y):
        return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
                   zip(jax.tree.leaves(x), jax.tree.leaves(y)))

    data = toy_batches(4, 8, 16)
    res = {}
    single = trainer(shd.make_mesh(devices=jax.devices()[:1])).run(data)
    res["single"] = [h["loss"] for h in single.history]
    saved = {}

    def keep_step2(step, metrics, tr):   # what the checkpoint at step 2 holds, as host arrays
        if step == 2:
            saved["state"] = jax.tree.map(np.array, tr.state)

    for name, cfg, accum, wd in [("f2t4", {"fsdp": 2, "tensor": 4}, 1, WORK),
                                 ("d2f2t2", {"data": 2, "fsdp": 2, "tensor": 2}, 2, None)]:
        tr = trainer(shd.make_mesh(cfg), workdir=wd, accum=accum, callbacks=[keep_step2] if wd else [])
        r = tr.run(data)
        res[name] = [h["loss"] for h in r.history]
        res[name + "_err"] = err(r.params, single.params)
        res[name + "_spec"] = str(tr.state.params["layers/up/kernel"].sharding.spec)
        res[name + "_batch_spec"] = str(tr.to_global(data[0])[1]["input_ids"].spec)

    # the f2t4 run saved steps 2 and 4; restore step 2 (params, frozen, optimizer state, rng, step)
    # straight into the data x fsdp x tensor sharding, check it bit for bit and train the last two steps
    c = trainer(shd.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), accum=2, resume=False)
    ck = Checkpointer(os.path.join(WORK, "checkpoints"), save_every=2)
    res["saved_steps"] = ck.all_steps()
    c.state, data_state, meta = ck.restore(2, c.state, c.state_shardings)
    ref = saved["state"]
    res["restored_step"] = int(c.state.step)
    res["restore_err"] = err(c.state.params, ref.params)
    res["restore_opt_err"] = err(c.state.opt_state, ref.opt_state)
    res["restore_frozen_err"] = err(c.state.frozen, ref.frozen)
    res["restore_rng_err"] = err(c.state.rng, ref.rng)
    res["restored_spec"] = str(c.state.params["layers/up/kernel"].sharding.spec)
    res["restored_mu_spec"] = str(c.state.opt_state[1][0].mu["layers/up/kernel"].sharding.spec)
    res["restored_mesh"] = dict(c.state.params["layers/up/kernel"].sharding.mesh.shape)
    res["meta_trainable"] = meta["trainable"]
    cont = c.run(data[2:])
    res["continued"] = [h["loss"] for h in cont.history]
    res["continued_err"] = err(cont.params, single.params)
    print("RESULT" + json.dumps(res))
""")


def test_eight_devices_and_restore_into_other_sharding(tmp_path):
    env = dict(_ENV, XLA_FLAGS=_ENV["XLA_FLAGS"] + " --xla_force_host_platform_device_count=8",
               WORK=str(tmp_path / "w"))
    p = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    r = _result(p.stdout)
    for name in ("f2t4", "d2f2t2"):
        np.testing.assert_allclose(r[name], r["single"], rtol=1e-5, err_msg=name)
        assert r[name + "_err"] < 1e-5, (name, r[name + "_err"])
    assert r["f2t4_spec"] == "P(None, 'fsdp', 'tensor')"
    assert r["d2f2t2_batch_spec"] == "P(('data', 'fsdp'),)", r["d2f2t2_batch_spec"]
    assert r["saved_steps"] == [2, 4]
    assert r["restored_step"] == 2
    assert r["restore_err"] == r["restore_opt_err"] == r["restore_frozen_err"] == r["restore_rng_err"] == 0.0, r
    assert r["restored_spec"] == "P(None, 'fsdp', 'tensor')", r
    assert r["restored_mu_spec"] == "P(None, 'fsdp', 'tensor')", r
    assert r["restored_mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}, r["restored_mesh"]
    assert r["meta_trainable"][0].startswith("layers/")
    np.testing.assert_allclose(r["continued"], r["single"][2:], rtol=1e-5)
    assert r["continued_err"] < 1e-5


def test_initialize_reads_config_then_environment_and_auto_defers_to_jax(monkeypatch):
    """What ``distributed.initialize`` hands to ``jax.distributed.initialize`` (recorded, not run)."""
    import jax
    import pytest

    from fusion_jax.errors import ConfigError
    from fusion_jax.train import distributed
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for k in ("FUSION_COORDINATOR_ADDRESS", "FUSION_NUM_PROCESSES", "FUSION_PROCESS_ID"):
        monkeypatch.delenv(k, raising=False)

    def run(cfg, **kw):
        monkeypatch.setattr(distributed, "_initialized", False)
        calls.clear()
        distributed.initialize(cfg, **kw)
        return calls[0] if calls else None

    assert run(None) is None and run({"coordinator_address": ""}) is None  # single process
    assert run({"coordinator_address": "auto"}) == {}                      # JAX's cluster detection
    assert run(None, auto=True) == {}
    assert run({"coordinator_address": "h:1", "num_processes": 4, "process_id": 3}) == {
        "coordinator_address": "h:1", "num_processes": 4, "process_id": 3}
    monkeypatch.setenv("FUSION_NUM_PROCESSES", "2")
    monkeypatch.setenv("FUSION_PROCESS_ID", "1")
    assert run({"coordinator_address": "h:1"}) == {"coordinator_address": "h:1", "num_processes": 2,
                                                   "process_id": 1}
    monkeypatch.delenv("FUSION_PROCESS_ID")
    with pytest.raises(ConfigError, match="process_id"):
        run({"coordinator_address": "h:1"})
    with pytest.raises(ConfigError, match=r"process_id: 5 is not in \[0, 2\)"):
        run({"coordinator_address": "h:1", "process_id": 5})
