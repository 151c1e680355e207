"""The latent browser's collectors against brute-force scans of planted data: running top-k over
distinct contexts, doubling-range histograms with uniform per-bin draws (also across merges),
per-group firing counts, context keys, and the band examples drawn from the histograms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evals.browser import collectors as K
from evals.browser import examples as X
from evals.browser import windows as W
from evals.browser.collect import Collection, active_codes
from evals.browser.spec import BrowserSpec, browser_spec
from pipeline.typed_config import ConfigError


def sparse_codes(n: int, L: int, seed: int, p: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    f = rng.exponential(1.0, size=(n, L)) * (rng.random((n, L)) < p)
    return (f * rng.choice([0.1, 1.0, 30.0], size=L)).astype(np.float32)  # latents of different scales


def batches(n: int, seed: int, most: int = 20):
    rng = np.random.default_rng(seed)
    lo = 0
    while lo < n:
        hi = min(n, lo + int(rng.integers(1, most + 1)))
        yield lo, hi
        lo = hi


def entries(f, lo, hi):
    """A batch's active codes as the pass hands them over: (latent, value, row)."""
    lat, val, ri = active_codes(torch.from_numpy(f[lo:hi]))
    return lat, val, ri + lo


def feed_top(f, keys, k, seed=0, most=20):
    top = K.TopContexts(f.shape[1], k)
    for lo, hi in batches(len(f), seed, most):
        lat, val, row = entries(f, lo, hi)
        top.update(lat, val, row, torch.from_numpy(keys)[row])
    return top.result()


def brute_top(f, keys, k):
    vals, rows = np.zeros((f.shape[1], k), np.float32), np.full((f.shape[1], k), -1)
    for j in range(f.shape[1]):
        seen, got = set(), []
        for r in np.argsort(-f[:, j], kind="stable"):
            if f[r, j] <= 0 or len(got) == k:
                break
            if keys[r] not in seen:
                seen.add(keys[r])
                got.append(r)
        vals[j, :len(got)], rows[j, :len(got)] = f[got, j], got
    return vals, rows


def test_top_contexts_equal_a_brute_force_scan_over_distinct_contexts():
    f = sparse_codes(700, 9, seed=1)
    keys = np.random.default_rng(2).integers(0, 150, size=700)  # many repeated contexts
    v, r = feed_top(f, keys, k=6)
    bv, br = brute_top(f, keys, 6)
    np.testing.assert_array_equal(r, br)
    # one big batch holding many copies of each context: still exact
    v, r = feed_top(f, keys, k=6, most=700)
    np.testing.assert_array_equal(r, br)
    np.testing.assert_allclose(v, bv)
    assert all(len(set(keys[row[row >= 0]])) == (row >= 0).sum() for row in r)  # each context once
    # without repeated contexts it is the plain top-k
    distinct = np.arange(700)
    v, r = feed_top(f, distinct, k=6)
    np.testing.assert_allclose(v, -np.sort(-f, axis=0)[:6].T)


def test_a_batch_repeating_one_context_more_than_2k_times_is_still_exact():
    f = sparse_codes(200, 3, seed=10, p=0.9)
    keys = np.arange(200)
    f[:, 0] = np.linspace(1, 2, 200)
    keys[-60:] = 7  # the 60 largest activations of latent 0 are one context
    for most in (200, 37):
        v, r = feed_top(f, keys, k=5, most=most)
        bv, br = brute_top(f, keys, 5)
        np.testing.assert_array_equal(r, br)
        assert len(set(keys[r[0]])) == 5


def test_a_latent_that_never_fires_has_no_top_rows():
    f = sparse_codes(50, 3, seed=3)
    f[:, 1] = 0
    v, r = feed_top(f, np.arange(50), k=4)
    assert (r[1] == -1).all() and (v[1] == 0).all()


def feed_bins(f, bins, samples, seed=0, most=20):
    bs = K.BinnedSamples(f.shape[1], bins, samples, seed=seed)
    for lo, hi in batches(len(f), seed, most):
        lat, val, row = entries(f, lo, hi)
        bs.update(lat, val, row)
    return bs.result()


def test_histograms_have_power_of_two_ranges_and_exact_counts():
    f = sparse_codes(900, 11, seed=4)
    f[:450] *= 0.01  # small values first: every range doubles several times (bins merge)
    res = feed_bins(f, bins=16, samples=3)
    for j in range(f.shape[1]):
        v = f[:, j][f[:, j] > 0]
        R = res["range"][j]
        assert R == 2.0 ** (np.floor(np.log2(v.max())) + 1) and R / 2 <= v.max() < R
        expected = np.bincount(np.minimum((v / R * 16).astype(int), 15), minlength=16)
        np.testing.assert_array_equal(res["counts"][j], expected)
        for b in range(16):  # every draw is a real activation of that latent, in its bin
            for s in range(3):
                row, val = res["sample_row"][j, b, s], res["sample_value"][j, b, s]
                if expected[b] == 0:
                    assert row == -1
                    continue
                assert f[row, j] == pytest.approx(val) and int(val / R * 16) == b


def test_bin_draws_are_uniform_even_across_range_doublings():
    """4000 identical latents see the same 8 events in growing order (ranges double 3 times, bins
    merge) and one large value; each latent's 2 draws from the final bin [0, 0.5) must be uniform
    over the 8 events."""
    events = np.array([0.26, 0.3, 0.33, 0.37, 0.4, 0.43, 0.46, 0.49], np.float32)
    L = 4000
    bs = K.BinnedSamples(L, 4, 2, seed=5)
    for i, v in enumerate([*events[:4], 1.5, *events[4:]]):
        bs.update(torch.arange(L), torch.full((L,), float(v)), torch.full((L,), i))
    res = bs.result()
    assert (res["range"] == 2.0).all() and (res["counts"][:, 0] == 8).all()
    rows = res["sample_row"][:, 0, :].reshape(-1)
    freq = np.bincount(rows, minlength=9)
    assert freq[4] == 0  # the large value is in another bin
    picked = np.delete(freq, 4)
    assert np.abs(picked - 1000).max() < 150, picked  # 5 sigma of a uniform draw


def test_firing_counts_per_group_match_a_scan():
    f = sparse_codes(300, 5, seed=6)
    groups = {"a": np.arange(400) % 3 == 0, "b": np.arange(400) % 2 == 0}
    fc = K.FiringCounts(5, groups)
    for lo, hi in batches(300, 7):
        lat, val, row = entries(f, lo, hi)
        fc.update(torch.arange(lo, hi), lat, val, row - lo)
    res = fc.result()
    assert res["n_rows"] == 300
    np.testing.assert_array_equal(res["fired"], (f > 0).sum(0))
    np.testing.assert_allclose(res["total"], f.sum(0, dtype=np.float64), rtol=1e-6)
    for g, name in enumerate(res["groups"]):
        m = groups[name][:300]
        assert res["group_rows"][g] == m.sum()
        np.testing.assert_array_equal(res["group_fired"][g], (f[m] > 0).sum(0))


def test_context_keys_are_equal_exactly_for_identical_windows():
    toks = np.array([[5, 6, 7, 8, 9, 1],
                     [3, 6, 7, 8, 9, 2],
                     [5, 6, 7, 8, 9, 1]])
    keys = W.context_keys(toks, before=2, after=1).reshape(3, 6)
    np.testing.assert_array_equal(keys[0], keys[2])  # a repeated sequence
    assert keys[0, 3] == keys[1, 3]  # (6, 7) 8 (9): same window in another sequence
    assert keys[0, 2] != keys[1, 2]  # (5, 6) 7 vs (3, 6) 7
    assert keys[0, 0] != keys[1, 0] and len(set(keys[0])) == 6
    # windows are cut at the sequence end: [7, 8] 9 | end differs from [7, 8] 9 1
    short = W.context_keys(np.array([[7, 8, 9]]), before=2, after=1)
    assert short[2] != keys[0, 4]
    rows, centre = W.window_rows(np.array([0, 7, 11]), ctx=6, before=2, after=1)
    np.testing.assert_array_equal(rows, [[-1, -1, 0, 1], [-1, 6, 7, 8], [9, 10, 11, -1]])


def test_histogram_cdf_and_band_edges():
    counts = np.array([[2, 0, 6, 2]])
    rng = np.array([4.0])  # bins of width 1
    np.testing.assert_allclose(X.histogram_cdf(counts, rng, np.array([[0, 1, 2.5, 4]])), [[0, 2, 5, 10]])
    q = X.band_edges("quantile", counts, rng, np.array([3.5]), 2)
    np.testing.assert_allclose(q, [[0, 2 + 3 / 6, 3.5]])  # half of the 10 below 2.5
    np.testing.assert_allclose(X.band_edges("interval", counts, rng, np.array([3.5]), 2), [[0, 1.75, 3.5]])


def planted_collection(f, keys, spec, seed=0):
    tv, tr = feed_top(f, keys, spec.top_k)
    res = feed_bins(f, spec.hist_bins, spec.samples, seed=seed)
    return Collection(columns=["m"], n_latents=f.shape[1], context_length=len(f), first_row=0,
                      tokens=np.zeros((1, len(f)), np.int64), keys=keys, n_rows=len(f), top_values=tv[None],
                      top_rows=tr[None], bins=[res], firing=[])


@pytest.mark.parametrize("kind", ["interval", "quantile"])
def test_band_examples_lie_in_their_bands_and_never_repeat_a_context(kind):
    f = sparse_codes(3000, 6, seed=8, p=0.5)
    keys = np.random.default_rng(9).integers(0, 1500, size=3000)
    spec = browser_spec({"top_k": 5, "bands": 4, "per_band": 3, "band_kind": kind, "hist_bins": 32, "samples": 3})
    ex = X.select_examples(planted_collection(f, keys, spec), spec)
    for j in range(6):
        v = f[:, j][f[:, j] > 0]
        edges, share = ex.band_edges[0, j], ex.band_share[0, j]
        assert edges[0] == 0 and edges[-1] == pytest.approx(v.max())
        brute = np.histogram(v, bins=edges)[0] / len(v)
        np.testing.assert_allclose(share, brute, atol=0.04)  # linear within 32 bins
        if kind == "quantile":
            np.testing.assert_allclose(share, 0.25, atol=0.04)
        mine = ex.latent == j
        assert (ex.group[mine] == X.TOP).sum() == 5
        shown = keys[ex.row[mine]]
        assert len(set(shown)) == len(shown)  # no context twice, top or band
        for g in range(4):
            in_band = mine & (ex.group == g)
            lo, hi = edges[3 - g], edges[4 - g]  # band 0 is the highest
            assert in_band.sum() <= 3
            if brute[3 - g] * len(v) >= 20:  # a band with enough activations is never empty
                assert in_band.sum() >= 1
            assert ((ex.value[in_band] >= lo - 1e-6) & (ex.value[in_band] <= hi + 1e-6)).all()
            np.testing.assert_allclose(ex.value[in_band], f[ex.row[in_band], j])


def test_browser_options_are_validated_all_at_once():
    assert browser_spec({}) == BrowserSpec()
    with pytest.raises(ConfigError) as err:
        browser_spec({"top_k": 0, "hist_bins": 24, "colour": "red", "band_kind": "deciles"})
    text = str(err.value)
    for part in ("browser.top_k", "browser.hist_bins", "power of two", "browser.colour: unknown key",
                 "browser.band_kind"):
        assert part in text, text
