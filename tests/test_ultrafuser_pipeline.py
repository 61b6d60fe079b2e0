"""The UltraFuser job on tiny fixture specialists: bad configs fail before training; stage 1 leaves the
specialists bit-identical and trains the gate; stage 2 trains everything; export -> loader round trip."""
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from ultrafuser_fixtures import NAMES, fixture_config, fixture_flags, make_fixture

from fusion_jax.errors import CheckpointError, ConfigError, DataError, FusionError
from fusion_jax.ultrafuser import pipeline
from fusion_jax.ultrafuser.config import get_config, validate

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return make_fixture(tmp_path_factory.mktemp("uf_fixture"))


def _set(c, key, value):
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value


BAD = [
    # (override key, value or fixture key, error type, message fragment)
    ("specialists.paths", ("text", "code", "@odd_vocab"), ConfigError, "different vocabularies"),
    ("specialists.paths", ("text", "@odd_arch", "math"), ConfigError, "different architectures: num_layers"),
    ("specialists.paths", ("text", "code", "/nonexistent/math"), CheckpointError, "does not exist"),
    ("specialists.paths", ("text", "code", "@no_weights"), CheckpointError, "no \\*.safetensors"),
    ("data.eval_files.math", "", DataError, "data.eval_files.math: domain 'math' has no eval data"),
    ("data.train_files.code", "/nonexistent/code.jsonl", DataError, "no such file"),
    ("data.train_files.text", "@empty", DataError, "empty"),
    ("specialists.templates.code", "no placeholder", ConfigError, "specialists.templates.code"),
    ("stage1.batch_per_domain", 0, ConfigError, "stage1.batch_per_domain"),
    ("stage1.nope", 1, ConfigError, "stage1.nope: unknown option"),
    ("preset", "nope", ConfigError, "preset: 'nope' is unknown"),
]


@pytest.mark.parametrize("key,value,err,msg", BAD, ids=[f"{b[0]}={b[1]}" for b in BAD])
def test_bad_config_fails_before_training(fx, tmp_path, key, value, err, msg):
    root = fx["root"]
    (root / "no_weights").mkdir(exist_ok=True)
    (root / "no_weights" / "config.json").write_text((Path(fx["paths"][0]) / "config.json").read_text())
    (root / "empty.jsonl").write_text("")
    special = {"odd_vocab": fx["odd_vocab"], "odd_arch": fx["odd_arch"], "no_weights": str(root / "no_weights"),
               "empty": str(root / "empty.jsonl")}
    by_name = dict(zip(NAMES, fx["paths"]))

    def resolve(v):
        if isinstance(v, tuple):
            return tuple(resolve(x) for x in v)
        if isinstance(v, str) and v.startswith("@"):
            return special[v[1:]]
        return by_name.get(v, v) if isinstance(v, str) and key == "specialists.paths" else v

    c = fixture_config(fx, tmp_path)
    if key.endswith(".nope"):
        c.stage1.unlock()
    _set(c, key, resolve(value))
    with pytest.raises(err, match=msg):
        pipeline.run(c)
    assert not (tmp_path / "ultrafuser_tiny" / "work" / "stage1").exists()


def test_unknown_preset_and_option_are_config_errors():
    with pytest.raises(ConfigError, match="preset: 'paperr' is unknown"):
        validate(get_config("paperr"))
    with pytest.raises(ConfigError, match="paper preset fuses real specialists"):
        validate(get_config("paper"))
    c = get_config("smoke")
    c.unlock()
    c.zoo.hidden = 3
    with pytest.raises(ConfigError, match="zoo.hidden: unknown option"):
        validate(c)


def test_cli_reports_config_errors_with_exit_2(fx, tmp_path):
    r = subprocess.run([sys.executable, "train.py"] + fixture_flags(fx, tmp_path, **{"data.eval_files.code": ""}),
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: data.eval_files.code: domain 'code' has no eval data" in r.stderr


@pytest.fixture(scope="module")
def staged(fx, tmp_path_factory):
    """Load the fixture specialists, render the fixture data, run stage 1 then stage 2 (snapshots)."""
    from fusion_jax import sharding
    from fusion_jax.data.loading import examples_from_config
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.ultrafuser import data as udata
    from fusion_jax.ultrafuser.export import load_specialists

    out = tmp_path_factory.mktemp("uf_staged")
    c = validate(fixture_config(fx, out))
    tok = load_tokenizer(fx["paths"][0])
    train_ex, _ = examples_from_config(c.data, list(NAMES))
    sets = udata.render_sets(tok, train_ex, udata.templates_from_config(NAMES, c.specialists.templates),
                             int(c.data.seq_len), int(c.data.max_prompt_len))
    mesh = sharding.make_mesh(None)
    fm = load_specialists(fx["paths"], NAMES, mesh=mesh, gate_hidden=int(c.gate_hidden), key=jax.random.key(0))
    host = lambda t: jax.tree.map(lambda x: np.array(jax.device_get(x)), t)  # noqa: E731
    snaps = {"before": host(fm.train_params())}
    pipeline.run_stage(1, fm, sets, c, mesh, out / "work")
    snaps["stage1"] = host(fm.train_params())
    pipeline.run_stage(2, fm, sets, c, mesh, out / "work")
    snaps["stage2"] = host(fm.train_params())
    return {"fm": fm, "snaps": snaps, "out": out, "sets": sets, "c": c, "mesh": mesh}


def _leaves_equal(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_stage1_trains_only_the_gate(staged):
    s = staged["snaps"]
    # stage 1: specialists bit-identical, gate trained
    assert _leaves_equal(s["before"]["specialists"], s["stage1"]["specialists"])
    assert not _leaves_equal(s["before"]["gate"], s["stage1"]["gate"])
    # ... and the stage-1 checkpoint holds no frozen params and no optimizer state for them
    ckpt = staged["out"] / "work" / "stage1" / "checkpoints"
    last = max(int(p.name) for p in ckpt.iterdir() if p.name.isdigit())
    assert not (ckpt / str(last) / "frozen").exists()
    import json
    meta = json.loads(next((ckpt / str(last) / "meta").glob("*")).read_text())
    assert all(p.startswith("gate/") for p in meta["trainable"])
    assert any(p.startswith("specialists/") for p in meta["frozen"])
    # stage 2 trains the specialists too
    assert not _leaves_equal(s["stage1"]["specialists"], s["stage2"]["specialists"])
    assert not _leaves_equal(s["stage1"]["gate"], s["stage2"]["gate"])


def test_export_and_loader_round_trip(staged, tmp_path):
    from fusion_jax.ultrafuser import evaluate as uev
    from fusion_jax.ultrafuser.export import load_fused, save_fused

    fm, mesh = staged["fm"], staged["mesh"]
    save_fused(fm, tmp_path / "fused", templates={"text": "{prompt}"}, tokenizer_dir=None)
    # each specialist is a plain HF checkpoint
    for n in NAMES:
        assert (tmp_path / "fused" / "specialists" / n / "config.json").is_file()
    fm2, meta = load_fused(tmp_path / "fused", mesh=mesh)
    assert meta["specialists"] == list(NAMES) and fm2.names == fm.names
    assert _leaves_equal(jax.device_get(fm.train_params()), jax.device_get(fm2.train_params()))
    ev = uev.make_fused_eval(fm, 16)
    arrays = {k: v[:4] for k, v in staged["sets"]["math"].items()}
    a = uev.fused_loss_and_weights(ev, fm.train_params(), arrays, 4, mesh, NAMES)
    b = uev.fused_loss_and_weights(uev.make_fused_eval(fm2, 16), fm2.train_params(), arrays, 4, mesh, NAMES)
    assert a == b
    with pytest.raises(FusionError, match="fused.json"):
        load_fused(tmp_path)
