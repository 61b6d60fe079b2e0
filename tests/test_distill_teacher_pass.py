"""The teacher pass: its top-k, log-probabilities and cross-entropies against transformers (the same
checkpoint, float32), resume after SIGKILL with the same store bytes, and 8 simulated devices giving
the same store bytes (and the same distillation loss) as one."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import distill_models as fx

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent

# one script for the subprocess runs: a pass over the fixture corpus (argv: model dir, store dir, R)
def fixture_pass(model, out, R, slow=False):
    """The pass the subprocesses run: the fixture corpus, top-6, small shards."""
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.distill import data as dd
    from fusion_jax.distill import store as st
    from fusion_jax.distill.teacher_pass import run_teacher_pass
    tok = load_tokenizer(model)
    corpus = dd.fit(dd.Corpus(tuple({"domain": "x", "text": t} for t in fx.texts(40)), "document"), [tok], 48)
    if slow:   # a shard every 0.3 s, so the test can kill the pass between two shards
        write = st.write_shard
        st.write_shard = lambda *a, **k: (write(*a, **k), time.sleep(0.3))[0]
    run_teacher_pass(model, tok, dd.tokenize(tok, corpus), out, fingerprints={"corpus": corpus.fingerprint(),
                     "tokenizer": "t"}, k=6, batch_per_device=2, shard_sequences=int(R), pad_multiple=16,
                     progress=False, log=lambda m: None)


PASS = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_distill_teacher_pass import fixture_pass
    fixture_pass(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "slow")
""").format(tests=str(TESTS))


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    return fx.make_model(root / "qwen", kind="unigram", vocab=420, arch="Qwen2ForCausalLM", seed=3)


def _run(args, env=None, **kw):
    return subprocess.run([sys.executable, "-c", PASS, *map(str, args)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300, **kw)


def _digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(d).iterdir())}


@pytest.mark.parametrize("arch,kind,vocab", [("Qwen2ForCausalLM", "unigram", 420), ("MistralForCausalLM", "bpe", 300)])
def test_store_matches_transformers(tmp_path, arch, kind, vocab):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.distill import data as dd
    from fusion_jax.distill.teacher_pass import run_teacher_pass
    m = fx.make_model(tmp_path / "m", kind=kind, vocab=vocab, arch=arch, hidden=32, layers=2, seed=5)
    tok = load_tokenizer(m)
    corpus = dd.fit(dd.Corpus(tuple({"domain": "x", "text": t} for t in fx.texts(6)), "document"), [tok], 40)
    seqs = dd.tokenize(tok, corpus)
    s = run_teacher_pass(m, tok, seqs, tmp_path / "store", fingerprints={"corpus": "c", "tokenizer": "t"}, k=8,
                         batch_per_device=3, shard_sequences=4, pad_multiple=16, logit_chunk=7, progress=False,
                         log=lambda x: None)
    ref = AutoModelForCausalLM.from_pretrained(str(m), torch_dtype=torch.float32).eval()
    for i in range(len(seqs)):
        ids = seqs.ids[i]
        with torch.no_grad():
            lp = torch.log_softmax(ref(torch.tensor(ids[None].astype(np.int64))).logits[0].double(), -1).numpy()
        d = s.sequence(i)
        kth = np.sort(lp, -1)[:, -8]
        got = np.take_along_axis(lp, d.ids, -1)
        assert (got >= kth[:, None] - 1e-4).all()                    # the stored ids are the top 8
        np.testing.assert_allclose(d.values[:, 0], got[:, 0], atol=5e-3)
        np.testing.assert_allclose(d.values - d.values[:, :1], got - got[:, :1], atol=s.codec.logit_step / 2 + 1e-4)
        ce = -lp[np.arange(len(ids) - 1), ids[1:]]
        np.testing.assert_allclose(d.ce[:-1], ce, rtol=2e-3)
        assert d.ce[-1] == 0
        np.testing.assert_allclose(s.seq_ce[i], ce.mean(), rtol=2e-3)


def test_resume_after_sigkill_gives_the_same_bytes(teacher, tmp_path):
    fixture_pass(teacher, tmp_path / "full", 4)
    p = subprocess.Popen([sys.executable, "-c", PASS, str(teacher), str(tmp_path / "cut"), "4", "slow"], cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "cut" / "shard-00001.safetensors").is_file():
            assert p.poll() is None and time.time() < deadline, "the pass ended before the kill"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    cut = tmp_path / "cut"
    n_shards = json.loads((cut / "plan.json").read_text())["n_shards"]
    have = sorted(cut.glob("shard-*.safetensors"))
    assert 2 <= len(have) < n_shards and not (cut / "manifest.json").exists()
    mtimes = {q.name: q.stat().st_mtime_ns for q in have}
    again = _run([teacher, cut, 4, "fast"])
    assert again.returncode == 0, again.stderr[-2000:]
    assert all(q.stat().st_mtime_ns == mtimes[q.name] for q in have)          # finished shards not redone
    want = _digest(tmp_path / "full")
    got = {k: v for k, v in _digest(cut).items() if not k.startswith(".")}
    assert got == want


EIGHT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding
    from fusion_jax import sharding as shd
    from fusion_jax.distill.loss import make_distill_loss
    from fusion_jax.models import CausalLM, ModelConfig, param_logical_axes
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
    graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    B, S, C, k = 8, 12, 3, 4
    am = np.ones((B, S), np.int32); am[::3, 9:] = 0
    batch = {"input_ids": rng.integers(0, 64, (B, S)).astype(np.int32), "attention_mask": am, "loss_mask": am,
             "fusion_mask": am.astype(np.float32), "t_ids": rng.integers(0, 64, (B, S, C, k)).astype(np.int32),
             "t_values": rng.normal(size=(B, S, C, k)).astype(np.float32),
             "t_count": rng.integers(0, k + 1, (B, S, C)).astype(np.int32),
             "t_ce": rng.uniform(1, 3, (B, C)).astype(np.float32)}
    f = make_distill_loss(graphdef, lam=0.9, method="avgce", chunk=5)
    out = {}
    for name, devs in (("one", jax.devices()[:1]), ("all", jax.devices())):
        mesh = shd.make_mesh(None, devices=devs)
        p = shd.place_params(params, param_logical_axes(cfg), mesh)
        b = shd.put_replicated_batch(batch, mesh)
        loss, g = jax.jit(lambda q, b: jax.value_and_grad(lambda q: f(q, b, None)[0])(q))(p, b)
        out[name] = [float(loss), float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(g)))]
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_same_store_and_loss(teacher, tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    fixture_pass(teacher, tmp_path / "one", 5)
    eight = _run([teacher, tmp_path / "eight", 5, "fast"], env=env)
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert _digest(tmp_path / "one") == _digest(tmp_path / "eight")
    r = subprocess.run([sys.executable, "-c", EIGHT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT"))[6:])
    np.testing.assert_allclose(res["all"], res["one"], rtol=1e-5)
