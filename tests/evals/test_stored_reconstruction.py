"""Explained variance per model and per source from stored rows, against a brute force in float64."""

from __future__ import annotations

import numpy as np
import torch

from evals.activations import JOINT, Batch
from evals.stored_reconstruction import ALL, HIGH_NORM, TYPICAL, reconstruction_by_source
from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary

CTX, N_SEQ, D = 8, 12, 6


def _ev(x: np.ndarray, x_hat: np.ndarray) -> float:
    x, x_hat = x.astype(np.float64), x_hat.astype(np.float64)
    return 1 - ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()


def _setup(n_models: int, spikes=()):
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(N_SEQ * CTX, D, generator=gen) * (1 + m) + m for m in range(n_models)]
    for row in spikes:  # attention-sink-like tokens, in the first model only
        xs[0][row] *= 40
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 0, 1, 1, 0, 1])
    spec = DictionarySpec(name="d", architecture="relu", n_latents=16, seed=1)
    model = build_dictionary(spec, n_models, D)
    with torch.no_grad():
        model.b_enc.fill_(0.3)  # some codes fire, the reconstruction is imperfect
    rows = torch.arange(N_SEQ * CTX)
    keep = rows % CTX != 0  # position 0 left out, as the store batches do

    def batches():  # uneven batches: the sums must not depend on them
        kept = rows[keep]
        for lo, hi in ((0, 5), (5, 40), (40, len(kept))):
            r = kept[lo:hi]
            yield Batch(r, r, [x[r] for x in xs])

    return xs, labels, model, keep.numpy(), batches


def test_crosscoder_per_model_and_per_source_match_brute_force():
    xs, labels, model, keep, batches = _setup(2)
    got = reconstruction_by_source(model, batches, labels, ["bible", "austen"], [JOINT], ["a", "b"], CTX)
    with torch.no_grad():
        x_hat = model.decode(model.encode(torch.stack(xs, 1))).numpy()
    src = np.repeat(labels, CTX)
    for m, name in enumerate(["a", "b"]):
        x = xs[m].numpy()
        for group, sel in ((ALL, keep), ("bible", keep & (src == 0)), ("austen", keep & (src == 1))):
            assert got[name][group]["tokens"] == int(sel.sum())
            np.testing.assert_allclose(got[name][group]["explained_variance"], _ev(x[sel], x_hat[sel, m]),
                                       rtol=1e-5)


def test_sae_columns_are_reconstructed_one_model_at_a_time():
    xs, labels, model, keep, batches = _setup(1)
    xs2 = [xs[0], xs[0] * 0.5 + 1]

    def two_columns():
        for b in batches():
            yield Batch(b.rows, b.token_ids, [x[b.rows] for x in xs2])

    got = reconstruction_by_source(model, two_columns, labels, ["s0", "s1"], ["a", "b"], ["a"], CTX)
    src = np.repeat(labels, CTX)
    for name, x in zip(["a", "b"], xs2):
        with torch.no_grad():
            x_hat = model.decode(model.encode(x[:, None, :]))[:, 0].numpy()
        sel = keep & (src == 1)
        np.testing.assert_allclose(got[name]["s1"]["explained_variance"], _ev(x.numpy()[sel], x_hat[sel]), rtol=1e-5)
    assert got["a"][ALL]["explained_variance"] != got["b"][ALL]["explained_variance"]


def test_high_norm_tokens_are_reported_apart_and_left_out_of_typical_and_sources():
    spikes = [9, 17, 50]  # positions 1, 1 and 2 of sequences 1, 2 (austen) and 6 (bible)
    xs, labels, model, keep, batches = _setup(2, spikes)
    got = reconstruction_by_source(model, batches, labels, ["bible", "austen"], [JOINT], ["a", "b"], CTX)
    with torch.no_grad():
        x_hat = model.decode(model.encode(torch.stack(xs, 1))).numpy()
    high = np.zeros(N_SEQ * CTX, dtype=bool)
    high[spikes] = True
    src = np.repeat(labels, CTX)
    for m, name in enumerate(["a", "b"]):  # a row high in one model leaves every model's typical groups
        x = xs[m].numpy()
        for group, sel in ((ALL, keep), (TYPICAL, keep & ~high), (HIGH_NORM, keep & high),
                           ("bible", keep & ~high & (src == 0)), ("austen", keep & ~high & (src == 1))):
            assert got[name][group]["tokens"] == int(sel.sum())
            np.testing.assert_allclose(got[name][group]["explained_variance"], _ev(x[sel], x_hat[sel, m]),
                                       rtol=1e-5, atol=1e-6)
    assert got["a"][HIGH_NORM]["tokens"] == 3


def test_no_high_norm_group_without_high_norm_tokens():
    _, labels, model, _, batches = _setup(1)
    got = reconstruction_by_source(model, batches, labels, ["s0", "s1"], [JOINT], ["a"], CTX)
    assert HIGH_NORM not in got["a"] and got["a"][TYPICAL]["tokens"] == got["a"][ALL]["tokens"]
