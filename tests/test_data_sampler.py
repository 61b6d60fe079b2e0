"""DomainBalancedSampler: balance, epochs without replacement, determinism, resume, process shares."""
from __future__ import annotations

import collections

import numpy as np
import pytest

from fusion_jax.data.sampler import DomainBalancedSampler, epoch_permutation
from fusion_jax.errors import ConfigError, DataError

SIZES = {"text": 7, "code": 5, "math": 11}


def _data(sizes=SIZES, seq=4):
    # every example is identifiable: ids[j] = (domain number * 1000 + j) repeated along the sequence
    out = {}
    for k, (d, n) in enumerate(sorted(sizes.items())):
        uid = (k + 1) * 1000 + np.arange(n)
        out[d] = {"input_ids": np.repeat(uid[:, None], seq, 1).astype(np.int32),
                  "loss_mask": np.ones((n, seq), np.int8)}
    return out


def _uid_domain(uid):
    return sorted(SIZES)[uid // 1000 - 1]


def _sampler(data=None, per_domain=2, **kw):
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return DomainBalancedSampler(_data() if data is None else data, per_domain, **kw)


def test_every_batch_is_balanced_and_interleaved():
    s = _sampler(per_domain=3)
    assert s.domains == ("code", "math", "text") and s.global_batch_size == 9
    for _ in range(10):
        b = next(s)
        assert b["input_ids"].shape == (9, 4) and b["domain_id"].dtype == np.int32
        np.testing.assert_array_equal(b["domain_id"], np.arange(9) % 3)
        doms = [_uid_domain(u) for u in b["input_ids"][:, 0]]
        assert doms == [s.domains[i % 3] for i in range(9)]
        assert collections.Counter(doms) == {d: 3 for d in SIZES}


def test_each_epoch_visits_every_example_once():
    per = 2
    s = _sampler(per_domain=per)
    n_batches = 5 * 11  # five epochs of the largest domain and more of the others
    stream = collections.defaultdict(list)
    for _ in range(n_batches):
        b = next(s)
        for did, uid in zip(b["domain_id"], b["input_ids"][:, 0]):
            stream[s.domains[did]].append(int(uid))
    for d, n in SIZES.items():
        seq = stream[d]
        full = len(seq) // n
        assert full >= 5
        for e in range(full):
            epoch = seq[e * n:(e + 1) * n]
            assert len(set(epoch)) == n, (d, e, epoch)  # no repeat within an epoch, all covered
        # epochs are shuffled differently
        assert seq[:n] != seq[n:2 * n]


def test_deterministic_and_seed_dependent():
    a = [next(_sampler(seed=5)) for _ in range(1)]
    it1, it2, it3 = _sampler(seed=5), _sampler(seed=5), _sampler(seed=6)
    b1 = [next(it1) for _ in range(8)]
    b2 = [next(it2) for _ in range(8)]
    b3 = [next(it3) for _ in range(8)]
    for x, y in zip(b1, b2):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    np.testing.assert_array_equal(a[0]["input_ids"], b1[0]["input_ids"])
    assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(b1, b3))


def test_resume_mid_stream_gives_identical_following_batches():
    s = _sampler(seed=3)
    for _ in range(13):
        next(s)
    state = s.get_state()
    assert state == {"step": 13}
    expected = [next(s) for _ in range(6)]
    r = _sampler(seed=3)
    r.set_state(state)
    got = [next(r) for _ in range(6)]
    for x, y in zip(got, expected):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    assert r.get_state() == {"step": 19}
    with pytest.raises(DataError, match="set_state"):
        r.set_state({"position": 3})


def test_two_process_shares_concatenate_to_one_process_batch():
    one = _sampler(per_domain=4, seed=1)
    p0 = _sampler(per_domain=4, seed=1, process_index=0, process_count=2)
    p1 = _sampler(per_domain=4, seed=1, process_index=1, process_count=2)
    assert p0.local_batch_size == p1.local_batch_size == 6 and p0.global_batch_size == 12
    for _ in range(7):
        g, a, b = next(one), next(p0), next(p1)
        for k in g:
            np.testing.assert_array_equal(np.concatenate([a[k], b[k]]), g[k], err_msg=k)
        # a share of 6 = 2 x 3 domains rows stays balanced
        assert collections.Counter(a["domain_id"].tolist()) == {0: 2, 1: 2, 2: 2}
    with pytest.raises(ConfigError, match="not divisible by the 5 processes"):
        _sampler(per_domain=4, process_index=0, process_count=5)


def test_independent_of_domain_order_and_of_other_domains():
    data = _data()
    rev = dict(reversed(list(data.items())))
    a, b = _sampler(data, seed=2), _sampler(rev, seed=2)
    for _ in range(5):
        x, y = next(a), next(b)
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # adding a domain does not change the order in which another domain's examples are drawn
    more = dict(data, zeta={k: v[:3] for k, v in data["code"].items()})
    s, t = _sampler(data, seed=2), _sampler(more, seed=2)
    code_s, code_t = [], []
    for _ in range(6):
        bs, bt = next(s), next(t)
        code_s += bs["input_ids"][bs["domain_id"] == s.domains.index("code"), 0].tolist()
        code_t += bt["input_ids"][bt["domain_id"] == t.domains.index("code"), 0].tolist()
    assert code_s == code_t
    np.testing.assert_array_equal(epoch_permutation(5, 2, "code", 0), epoch_permutation(5, 2, "code", 0))


def test_bad_inputs_fail_clearly():
    data = _data()
    bad = dict(data, math={"input_ids": data["math"]["input_ids"], "loss_mask": data["math"]["loss_mask"][:3]})
    with pytest.raises(DataError, match=r"domain 'math': array 'loss_mask' has 3 rows"):
        _sampler(bad)
    empty = dict(data, code={k: v[:0] for k, v in data["code"].items()})
    with pytest.raises(DataError, match=r"domain 'code': no examples"):
        _sampler(empty)
    other = dict(data, code={"input_ids": data["code"]["input_ids"]})
    with pytest.raises(DataError, match=r"domain 'math': arrays .* differ from domain 'code'"):
        _sampler(other)
    with pytest.raises(ConfigError, match="per_domain"):
        _sampler(per_domain=0)
