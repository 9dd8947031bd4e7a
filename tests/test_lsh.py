"""MinHash-LSH (geb_jax/data/clean/lsh.py): S-curve against simulation, signatures against
datasketch, band keys against datasketch's MinHashLSH, clusters against scipy, recall on
planted near-duplicates, and the near_dedup config fields."""
from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from geb_jax.data.clean import CleaningConfigError, build_steps, lsh
from geb_jax.data.clean.chain import CleaningConfig
from geb_jax.data.clean.dedup import NearDuplicateDeduper, shingles
from tests.conftest import REPO_ROOT, load_experiment


def _experiment():
    return load_experiment('lsh_quality')


# ------------------------------------------------------------------------------ S-curve

@pytest.mark.parametrize("s, bands, rows, num_perm", [(0.85, 25, 10, 256), (0.8, 14, 7, 128),
                                                      (0.9, 9, 13, 128), (0.6, 5, 3, 20)])
def test_s_curve_and_detection_match_simulation(s, bands, rows, num_perm):
    """Closed form and exact detection probability vs 40,000 simulated pairs: each MinHash
    value agrees independently with probability s (the MinHash model)."""
    rng = np.random.default_rng(0)
    trials = 40_000
    agree = rng.random((trials, num_perm)) < s  # (trials, num_perm)
    banded = agree[:, :bands * rows].reshape(trials, bands, rows)  # (trials, b, r)
    candidate = banded.all(axis=2).any(axis=1)
    confirmed = candidate & (agree.mean(axis=1) >= 0.8)
    for measured, predicted in ((candidate.mean(), lsh.collision_probability(s, bands, rows)),
                                (confirmed.mean(),
                                 lsh.detection_probability(s, bands, rows, num_perm, 0.8))):
        sd = np.sqrt(max(predicted * (1 - predicted), 1e-4) / trials)
        assert abs(measured - predicted) < 5 * sd, (measured, predicted)


def test_detection_is_below_the_s_curve_and_exact_at_the_ends():
    s = np.array([0.0, 0.5, 0.8, 0.85, 1.0])
    det = lsh.detection_probability(s, 25, 10, 256, 0.8)
    assert np.all(det <= lsh.collision_probability(s, 25, 10) + 1e-12)
    assert det[0] == 0.0 and det[-1] == pytest.approx(1.0)
    # all num_perm values agree: every band is full
    assert lsh.band_hit_given_agreements(256, 25, 10, 256) == 1.0
    # fewer agreements than rows: no band can be full
    assert lsh.band_hit_given_agreements(256, 25, 10, 9) == 0.0


def test_choose_bands_meets_its_criterion():
    for num_perm in (128, 256):
        b, r = lsh.choose_bands(num_perm, 0.8)
        assert b * r <= num_perm and b >= 2
        assert lsh.collision_probability(0.85, b, r) >= 0.995
        low = lsh.collision_probability(0.5, b, r)
        # no layout that also catches 0.85 makes fewer pairs at 0.5 candidates
        for bb in range(2, num_perm + 1):
            for rr in range(1, num_perm // bb + 1):
                if lsh.collision_probability(0.85, bb, rr) >= 0.995:
                    assert lsh.collision_probability(0.5, bb, rr) >= low - 1e-15
    with pytest.raises(lsh.ConfigError, match="near_dedup_num_perm"):
        lsh.choose_bands(2, 0.8)  # 2 values cannot catch 0.85 with p >= 0.995
    with pytest.raises(lsh.ConfigError, match="threshold"):
        lsh.choose_bands(128, 1.0)


# ---------------------------------------------------------------------------- signatures

def _random_sets(rng, count, size):
    return [{f"w{x} {y}".encode() for x, y in rng.integers(0, 500, (size, 2))}
            for _ in range(count)]


@pytest.mark.parametrize("num_perm, seed", [(128, 1), (256, 1), (64, 7)])
def test_signature_equals_datasketch(num_perm, seed):
    from datasketch import MinHash
    rng = np.random.default_rng(seed)
    for shingle_set in _random_sets(rng, 5, 60) + [set(), {b"one"}]:
        m = MinHash(num_perm=num_perm, seed=seed)
        for x in shingle_set:
            m.update(x)
        sig = lsh.signature(shingle_set, num_perm, seed)
        assert sig.dtype == np.uint64 and sig.shape == (num_perm,)
        np.testing.assert_array_equal(sig, m.hashvalues.astype(np.uint64))


def test_band_keys_give_datasketch_lsh_candidates():
    """Pairs sharing a band key == pairs datasketch's MinHashLSH(params=(b, r)) returns."""
    from datasketch import MinHash, MinHashLSH
    rng = np.random.default_rng(3)
    base = _random_sets(rng, 12, 80)
    sets = base + [set(list(s)[:70]) | {b"x%d" % i} for i, s in enumerate(base)]
    bands, rows, n = 8, 4, 64
    index = MinHashLSH(num_perm=n, params=(bands, rows))
    sigs, ours = [], {}
    for doc, s in enumerate(sets):
        m = MinHash(num_perm=n)
        m.update_batch(list(s))
        index.insert(doc, m)
        sigs.append(m)
        for key in lsh.band_keys(lsh.signature(s, n), bands, rows):
            ours.setdefault(key, set()).add(doc)
    for doc, m in enumerate(sigs):
        mine = set().union(*(g for g in ours.values() if doc in g))
        assert mine == set(index.query(m)), doc
    keys = lsh.band_keys(np.zeros(8, np.uint64), 2, 4)
    assert keys[0] != keys[1]  # equal values in different bands: different keys
    assert lsh.estimated_jaccard(sigs[0].hashvalues, sigs[0].hashvalues) == 1.0
    assert lsh.estimated_jaccard(sigs[0].hashvalues, sigs[12].hashvalues) == \
        pytest.approx(sigs[0].jaccard(sigs[12]))


# ------------------------------------------------------------------------------ clusters

def test_clusters_match_scipy_connected_components():
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    rng = np.random.default_rng(5)
    docs = 200
    pairs = [tuple(int(x) for x in p) for p in rng.integers(0, docs, (150, 2))]
    got = lsh.clusters(pairs)
    u, v = zip(*pairs)
    graph = coo_matrix((np.ones(len(pairs)), (u, v)), shape=(docs, docs))
    _, label = connected_components(graph, directed=False)
    smallest = {}
    for doc in range(docs):
        smallest.setdefault(label[doc], doc)  # docs visited in increasing order
    expected = {d: smallest[label[d]] for d in set(itertools.chain(*pairs))}
    assert got == expected
    assert lsh.clusters([]) == {}


# ---------------------------------------------------------------------- planted corpus

def test_recall_on_planted_near_duplicates():
    """The default layout collapses every planted pair at true (brute-force) Jaccard >= 0.9
    and >= 95% at >= 0.85, none at <= 0.5; the pre-issue-16 layout misses more at 0.85-0.9."""
    exp = _experiment()
    result = exp.run(families=60, copies=3, words=300, low=0.3, seed=1, threshold=0.8,
                     sample=2000, focus=0.5, progress=lambda m: None)
    default, _, before = result["layouts"]
    assert (default["bands"], default["rows"], default["num_perm"]) == (25, 10, 256)
    assert default["summary"]["pairs_at_least_0.85"] >= 50
    assert default["summary"]["recall_at_least_0.85"] >= 0.95
    assert all(b["recall"] == 1.0 for b in default["bins"] if b["lo"] >= 0.9 - 1e-9)
    for lay in result["layouts"]:
        assert lay["summary"]["confirmed_at_most_0.5"] == 0
    assert before["summary"]["recall_at_least_0.85"] < default["summary"]["recall_at_least_0.85"]


def test_streaming_deduper_on_planted_families():
    """The chain's deduper keeps each base and drops a copy iff it is a near duplicate of an
    earlier kept document: every copy at true Jaccard >= 0.9 goes, every copy <= 0.5 stays."""
    exp = _experiment()
    texts, groups = exp.planted_corpus(40, 3, 300, 0.3, seed=2, focus=0.3)
    sets = [shingles(t, "en", 5) for t in texts]
    nd = NearDuplicateDeduper()
    kept = [nd({"text": t, "lang": "en"}) is not None for t in texts]
    assert (nd.bands, nd.rows) == (25, 10)
    seen = {"high": 0, "low": 0}
    for base, *copies in groups:
        assert kept[base]
        for c in copies:
            j = max(exp.exact_jaccard(sets[c], sets[k]) for k in range(c) if kept[k])
            if j >= 0.9:
                assert not kept[c], j
                seen["high"] += 1
            if j <= 0.5:
                assert kept[c], j
                seen["low"] += 1
    assert seen["high"] >= 10 and seen["low"] >= 10, seen


# -------------------------------------------------------------------------------- config

def test_near_dedup_config_fields():
    assert CleaningConfig().near_dedup_layout == (25, 10)
    assert CleaningConfig(near_dedup_num_perm=128).near_dedup_layout == (14, 7)
    assert CleaningConfig(near_dedup_bands=16, near_dedup_rows=8).near_dedup_layout == (16, 8)
    step = [s for s in build_steps(CleaningConfig(near_dedup_bands=16, near_dedup_rows=8,
                                                  perplexity=False))
            if s.name == "near_dedup"][0]
    assert (step.fn.bands, step.fn.rows) == (16, 8)
    for bad in ({"near_dedup_bands": 4}, {"near_dedup_bands": 30, "near_dedup_rows": 10},
                {"near_dedup_bands": 1, "near_dedup_rows": 8}):
        with pytest.raises(CleaningConfigError, match="near_dedup_bands"):
            CleaningConfig(**bad)
    with pytest.raises(CleaningConfigError, match="near_dedup_threshold=1.0"):
        CleaningConfig(near_dedup_threshold=1.0)
    CleaningConfig(near_dedup=False, near_dedup_threshold=1.0)  # off: not checked


def test_quality_script_runs_in_a_fresh_process(tmp_path):
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, "experiments/lsh_quality.py", "--families", "10",
                        "--sample", "100", "--json", str(out)], cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": REPO_ROOT})
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert [x["name"] for x in result["layouts"]] == ["default", "alternative",
                                                      "before issue 16"]
    assert "| true Jaccard | pairs |" in r.stdout and result["corpus"]["documents"] == 40
