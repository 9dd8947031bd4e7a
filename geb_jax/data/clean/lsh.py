"""MinHash-LSH, the pure parts: signatures, band keys, the S-curve, the band layout, clusters.

Read `choose_bands` first: it is the one decision here. A pair of documents whose shingle sets
have Jaccard similarity s agrees on each MinHash value with probability s, so with `bands`
bands of `rows` values each it shares at least one band key (becomes a candidate) with
probability 1 - (1 - s^rows)^bands: the S-curve. Candidates are then confirmed by the
estimated Jaccard (the fraction of equal values over all `num_perm` values) >= threshold.

Used by the streaming `dedup.NearDuplicateDeduper` (layout and confirmation) and by the Beam
pipeline (geb_jax/data/beam/), which runs signature -> band_keys -> GroupByKey -> candidate
pairs -> estimated_jaccard -> clusters. `signature` gives exactly datasketch's MinHash values
(datasketch >= 2.0, default "affine32" scheme: SHA-1 truncated to 32 bits, a MurmurHash3
finaliser, then h -> a*h + b mod 2^32), so both paths index the same numbers. See
docs/data.md "MinHash near-duplicate removal" for the measured recall and precision.
"""
from __future__ import annotations

import functools
import hashlib
import math
import struct
from typing import Iterable

import numpy as np

from geb_jax.errors import ConfigError

_FMIX32 = (16, 0x85EBCA6B, 13, 0xC2B2AE35, 16)  # MurmurHash3 fmix32: shift, mul, shift, mul, shift
_MAX_HASH = 0xFFFFFFFF  # datasketch's value for "no shingle seen" (an empty document)


# ------------------------------------------------------------------------------ S-curve

def collision_probability(s, bands: int, rows: int):
    """P(a pair at Jaccard `s` shares at least one band key) = 1 - (1 - s^rows)^bands."""
    s = np.asarray(s, dtype=np.float64)
    return 1.0 - (1.0 - s ** rows) ** bands


def detection_probability(s, bands: int, rows: int, num_perm: int, threshold: float):
    """P(a pair at Jaccard `s` is a candidate AND its estimated Jaccard >= `threshold`).

    Exact under the MinHash model (each of the `num_perm` values agrees independently with
    probability s): X ~ Binomial(num_perm, s) values agree, at uniformly random positions; the
    bands use the first bands*rows positions. Vectorised over `s`.
    """
    from scipy.stats import binom  # only the studies need it

    need = math.ceil(threshold * num_perm - 1e-9)  # smallest count with count/n >= threshold
    x = np.arange(max(need, 0), num_perm + 1)
    hit = np.array([band_hit_given_agreements(num_perm, bands, rows, int(k)) for k in x])
    s = np.asarray(s, dtype=np.float64)
    return (binom.pmf(x, num_perm, s[..., None]) * hit).sum(axis=-1)


@functools.lru_cache(maxsize=None)
def band_hit_given_agreements(num_perm: int, bands: int, rows: int, x: int) -> float:
    """P(some band is all-equal | x of the num_perm values agree, at random positions).

    Inclusion-exclusion over bands, in exact integers:
    P(no band full) = sum_k (-1)^k C(b, k) C(n - k r, x - k r) / C(n, x).
    """
    none_full = sum((-1) ** k * math.comb(bands, k) * math.comb(num_perm - k * rows, x - k * rows)
                    for k in range(bands + 1) if x - k * rows >= 0)
    return 1.0 - none_full / math.comb(num_perm, x)


def choose_bands(num_perm: int, threshold: float, *, high: float | None = None,
                 low: float | None = None, min_recall: float = 0.995) -> tuple[int, int]:
    """(bands, rows) for `num_perm` MinHash values, chosen on the S-curve.

    Criterion: among layouts with bands * rows <= num_perm and bands >= 2, keep those that make
    a pair at Jaccard `high` (default threshold + min(0.05, (1 - threshold) / 2), i.e. 0.85
    for 0.8) a candidate with probability >= `min_recall`; of these take the one with the
    lowest candidate probability at `low` (default threshold - 0.3, i.e. 0.5: fewest wasted
    Jaccard checks), then the one with the higher recall at `threshold`. Unlike datasketch's
    `_optimal_param` (which minimises the area under the curve on each side of the threshold
    with equal weights and gives (9, 13) at 128 / 0.8: only 69% of pairs at 0.85 are
    candidates) this pins the miss rate where the target is. Examples: (128, 0.8) -> (14, 7);
    (256, 0.8) -> (25, 10).
    """
    if not 0.0 < threshold < 1.0:
        raise ConfigError(f"near-dedup threshold={threshold!r}: expected 0 < threshold < 1.")
    high = min(1.0, threshold + min(0.05, (1.0 - threshold) / 2)) if high is None else high
    low = max(0.0, threshold - 0.3) if low is None else low
    best = None
    for bands in range(2, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            if collision_probability(high, bands, rows) < min_recall:
                continue
            rank = (float(collision_probability(low, bands, rows)),
                    -float(collision_probability(threshold, bands, rows)))
            if best is None or rank < best[0]:
                best = (rank, (bands, rows))
    if best is None:
        raise ConfigError(
            f"near-dedup: no band layout of num_perm={num_perm} MinHash values catches pairs "
            f"at Jaccard {high:.2f} with probability >= {min_recall}: raise "
            f"data.clean.near_dedup_num_perm or set near_dedup_bands / near_dedup_rows.")
    return best[1]


# ----------------------------------------------------------------------------- signatures

def _fmix32(h: np.ndarray) -> np.ndarray:
    s1, m1, s2, m2, s3 = (np.uint32(c) for c in _FMIX32)
    h = h ^ (h >> s1)
    h = h * m1
    h = h ^ (h >> s2)
    h = h * m2
    return h ^ (h >> s3)


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The affine maps h -> a*h + b mod 2^32 (a odd), drawn as datasketch draws them."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    return a, b


def signature(shingle_set: Iterable[bytes], num_perm: int, seed: int = 1, *,
              perms: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """The MinHash signature, shape (num_perm,), uint64 holding 32-bit values.

    Equal to datasketch.MinHash(num_perm, seed) after update() with each shingle. Pass
    `perms=permutations(num_perm, seed)` to skip redrawing them for every document.
    """
    a, b = permutations(num_perm, seed) if perms is None else perms
    hv = np.fromiter((struct.unpack("<I", hashlib.sha1(x).digest()[:4])[0]
                      for x in shingle_set), dtype=np.uint32)
    if hv.size == 0:
        return np.full(num_perm, _MAX_HASH, dtype=np.uint64)
    hv = _fmix32(hv)
    with np.errstate(over="ignore"):
        values = hv[:, None] * a[None, :] + b[None, :]  # (shingles, num_perm), wraps mod 2^32
    return values.min(axis=0).astype(np.uint64)


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[bytes]:
    """One key per band: 2-byte band index + 8-byte BLAKE2b of the band's values.

    Two documents share a key iff (up to a 2^-64 digest collision) they agree on all `rows`
    values of that band; the index keeps equal values in different bands apart.
    """
    if bands * rows > len(sig):
        raise ValueError(f"bands*rows = {bands * rows} > signature length {len(sig)}")
    values = np.asarray(sig, dtype="<u8")
    return [struct.pack("<H", i) + hashlib.blake2b(values[i * rows:(i + 1) * rows].tobytes(),
                                                   digest_size=8).digest()
            for i in range(bands)]


def estimated_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of equal MinHash values: an unbiased estimate of the Jaccard similarity."""
    if len(a) != len(b):
        raise ValueError(f"signatures of different lengths: {len(a)} and {len(b)}")
    return float(np.count_nonzero(np.asarray(a) == np.asarray(b))) / len(a)


# ------------------------------------------------------------------------------- clusters

def clusters(pairs: Iterable[tuple[int, int]]) -> dict[int, int]:
    """Connected components of the pair graph: doc -> smallest doc id in its component.

    Only documents that appear in some pair are keys. Union-find with path halving; the root
    of each set is always its smallest member, so the result is deterministic.
    """
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for u, v in pairs:
        ru, rv = find(u), find(v)
        if ru != rv:
            parent[max(ru, rv)] = min(ru, rv)
    return {x: find(x) for x in parent}
