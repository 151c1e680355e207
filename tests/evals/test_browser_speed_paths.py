"""The pass's fast paths against the slow, obvious ones: the blockwise sparse encode against the
nonzero entries of `dictionary.encode` for every architecture, and the top-k merge against a
brute-force stable sort over all rows, with ties, repeated contexts, big batches and rows fed out
of order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evals.browser import collectors as K
from evals.browser.collect import active_codes
from evals.browser.encode import sparse_encode
from tests.evals.test_browser_collectors import brute_top
from trainer.architectures import ARCHITECTURES
from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary


def sparse_dictionary(arch: str, n_models: int, d: int = 8, L: int = 50):
    kw = {"k": 3} if arch in ("topk", "batchtopk") else {}
    dic = build_dictionary(DictionarySpec("t", arch, n_latents=L, seed=1, **kw), n_models, d).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        dic.b_enc.copy_(-1.5 * dic.W_enc.norm(dim=(0, 1)) + 0.3 * torch.randn(L, generator=g))
        dic.b_dec.normal_(generator=g)
        dic.W_dec.mul_(torch.rand(L, n_models, 1, generator=g) + 0.5)
        if arch == "jumprelu":
            dic.set_threshold_(torch.rand(L, generator=g) * 0.5)
        if arch == "batchtopk":
            dic.set_threshold_(0.05)
    return dic


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
@pytest.mark.parametrize("n_models", [1, 2])
def test_sparse_encode_is_the_nonzero_codes_of_encode(arch, n_models):
    if n_models > 1 and not ARCHITECTURES[arch].crosscoders:
        pytest.skip(f"{arch} is SAE-only")
    dic = sparse_dictionary(arch, n_models)
    x = torch.randn(300, n_models, 8, generator=torch.Generator().manual_seed(3)) * 2
    with torch.no_grad():
        f = dic.encode(x)
    lat, val, row = active_codes(f)
    assert 0 < len(lat) < f.numel() / 2  # sparse, not empty: the test means something
    want = torch.argsort(lat * 300 + row)  # (latent, row) order
    for block in (64, 1000, 1 << 21):  # several blocks of latents (or rows), and one
        got = sparse_encode(dic, x, block_codes=block)
        torch.testing.assert_close(got[0], lat[want], rtol=0, atol=0)
        torch.testing.assert_close(got[2], row[want], rtol=0, atol=0)
        torch.testing.assert_close(got[1], val[want], rtol=1e-6, atol=1e-6)


def feed(f, keys, k, bounds, order="row"):
    top = K.TopContexts(f.shape[1], k)
    for lo, hi in bounds:
        lat, val, ri = active_codes(torch.from_numpy(f[lo:hi]))
        row = ri + lo
        if order == "latent":
            o = torch.argsort(lat * len(f) + row)
            lat, val, row = lat[o], val[o], row[o]
        elif order == "shuffled":
            o = torch.randperm(len(lat), generator=torch.Generator().manual_seed(lo))
            lat, val, row = lat[o], val[o], row[o]
        top.update(lat, val, row, torch.from_numpy(keys)[row])
    return top.result()


def tied_codes(n=400, L=7, seed=0):
    """Few distinct values (many exact ties) and many repeated contexts."""
    rng = np.random.default_rng(seed)
    f = rng.choice([0.5, 1.0, 2.0], size=(n, L)) * (rng.random((n, L)) < 0.4)
    f[:, 0] = 1.0  # latent 0: every row ties
    return f.astype(np.float32), rng.integers(0, 60, size=n)


@pytest.mark.parametrize("order", ["row", "latent", "shuffled"])
def test_top_k_merge_breaks_ties_by_row_like_a_stable_sort(order):
    f, keys = tied_codes()
    bv, br = brute_top(f, keys, 5)
    assert list(br[0]) == sorted(br[0])  # latent 0: the first rows of distinct contexts
    for bounds in ([(0, 400)], [(i, min(400, i + 37)) for i in range(0, 400, 37)]):
        v, r = feed(f, keys, 5, bounds, order)
        np.testing.assert_array_equal(r, br)
        np.testing.assert_array_equal(v, bv)


def test_top_k_merge_with_batches_fed_out_of_order():
    f, keys = tied_codes(seed=1)
    bounds = [(i, min(400, i + 50)) for i in range(0, 400, 50)][::-1]  # last rows first
    v, r = feed(f, keys, 4, bounds)
    bv, br = brute_top(f, keys, 4)
    np.testing.assert_array_equal(r, br)


def test_top_k_merge_on_big_sparse_batches_equals_a_brute_force_top_k():
    rng = np.random.default_rng(4)
    n, L = 3000, 300
    f = (rng.exponential(1.0, (n, L)) * (rng.random((n, L)) < 0.05)).astype(np.float32)
    f[:, :3] *= rng.random((n, 1)) < 0.002  # a few latents that fire less than k times
    keys = rng.integers(0, 2000, size=n)
    keys[::50] = 7  # one context everywhere
    bv, br = brute_top(f, keys, 12)
    for size in (3000, 512):
        v, r = feed(f, keys, 12, [(i, min(n, i + size)) for i in range(0, n, size)], "latent")
        np.testing.assert_array_equal(r, br)
        np.testing.assert_allclose(v, bv)
