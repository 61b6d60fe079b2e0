"""One stable hash for every place that derives randomness or order from a name.

Python's ``hash`` is salted per process, so anything that must agree between processes, runs and
machines (DARE keep-masks keyed by tensor name, the sampler's per-domain order, the demo corpus split)
hashes with BLAKE2b instead.
"""
from __future__ import annotations

import hashlib


def stable_hash(*parts, digest_size: int = 8) -> int:
    """``digest_size`` bytes of BLAKE2b over ``parts`` (``str()`` of each, joined by U+001F), little-endian.

    A single string part hashes its own UTF-8 bytes, so ``stable_hash(name, digest_size=4)`` is the
    32-bit hash of ``name``.
    """
    blob = "\x1f".join(map(str, parts)).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(blob, digest_size=digest_size).digest(), "little")
