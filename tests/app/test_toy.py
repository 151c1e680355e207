"""Ground truth for the trainer: synthetic features with a known true L0 (mdiff/synthetic.py),
stored like cached activations, trained by `mdiff train`'s lockstep sweep, scored against the
features (evals/ground_truth.py, mdiff/toy_study.py)."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from evals import ground_truth as G
from mdiff.synthetic import (
    ToyGenerator,
    ToySpec,
    ToyStoreSpec,
    build_toy_experiment,
    load_generator,
    write_store,
)
from mdiff.toy_study import ToyStudySpec, load_study_spec, run_study
from pipeline import store as S
from pipeline.config_files import write_config
from pipeline.typed_config import ConfigError
from trainer.loader import ActivationLoader

# 16 features in 24 dimensions, firing probabilities 0.45 ... 0.175: true L0 = 16 * 0.3125 = 5
GENERATOR = ToySpec(n_features=16, d_model=24, p_max=0.45, p_min=0.175, seed=0)
LAYOUT = ToyStoreSpec(n_tokens=1 << 16, context_length=128, shard_tokens=16384, chunk_tokens=4096,
                      scale_sample_tokens=8192)
SPEC = ToyStudySpec(generator=GENERATOR, data=LAYOUT, ks=[2, 4, 5, 6], transition_from=[10],
                    steps=1000, batch_size=256, lr=3e-3, lr_warmup_steps=50, eval_rows=8192)
TRUE_L0 = 5


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """One store and one lockstep sweep (k = 2, 4, 5, 6 and a schedule 10 -> 5), trained once."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster and the result is reproducible
    try:
        return run_study(SPEC, tmp_path_factory.mktemp("toy"), log=lambda *a: None, progress=False)
    finally:
        torch.set_num_threads(threads)


def row(study, name):
    return next(r for r in study.rows if r["dictionary"] == name)


def test_sae_at_the_true_l0_recovers_the_features(study):
    assert study.true_l0 == pytest.approx(TRUE_L0)
    r = row(study, "k05")
    assert r["recovered"] >= 0.9 * r["n_features"], r
    assert r["ve"] > 0.95 and r["ve_ground_truth"] > 0.99


def test_training_below_the_true_l0_recovers_fewer_features(study):
    low, right = row(study, "k02"), row(study, "k05")
    assert low["recovered"] <= right["recovered"] - 5, (low, right)
    assert low["mean_best_cosine"] < right["mean_best_cosine"] - 0.1
    # the learned dictionary beats the true one at too low a k: reconstruction rewards mixing
    assert low["ve"] > low["ve_ground_truth"]


def test_decoder_projection_finds_the_true_l0(study):
    est = study.estimate
    assert est.estimate is not None and abs(est.estimate - TRUE_L0) <= 1, est
    assert min(est.per_n) >= TRUE_L0  # only curves from the true L0 up are informative


def test_k_schedule_ends_at_k(study):
    r = row(study, "k10-to-05")
    assert r["k_logged"] == "10->5" and r["k"] == TRUE_L0
    assert abs(r["val_l0"] - TRUE_L0) < 0.5  # the learned inference threshold follows the schedule


def test_outputs(study):
    out = study.out_dir
    for name in ("summary.md", "summary.csv", "summary.json", "decoder_projection.png",
                 "recovery.png", "variance_explained.png", "cosines/k05.png"):
        assert (out / name).stat().st_size > 0, name
    with (out / "summary.csv").open() as f:
        assert [r["dictionary"] for r in csv.DictReader(f)] == ["k02", "k04", "k05", "k06", "k10-to-05"]
    assert json.loads((out / "summary.json").read_text())["true_l0"] == pytest.approx(TRUE_L0)


def test_store_verifies_and_the_loader_reads_it(study):
    cfg_store = study.out_dir / "store"
    root = S.StoreRoot(str(cfg_store))
    arr = S.open_activation_array(root, study.store["array"], require_complete=True)
    assert S.verify_array(arr) == []
    ts = S.open_token_set(root, arr.attrs["tokenset_id"])
    assert arr.attrs["synthetic"]["true_l0"] == pytest.approx(TRUE_L0)
    assert ts.attrs["n_validation_sequences"] == round(LAYOUT.n_tokens / 128 * LAYOUT.validation_fraction)
    # stored rows are the generator's rows times the scale, bit for bit
    gen = load_generator(study.out_dir / "generator")
    lo, hi = arr.shard_rows_range(1)
    expected = S.encode(gen.sample(hi - lo, stream=1)[0] * arr.scale, arr.storage_dtype)
    assert np.array_equal(arr.array[lo:hi], expected)
    norms = S.read_rows(arr, 0, 4096).float().norm(dim=-1)
    assert norms.mean() == pytest.approx(math.sqrt(GENERATOR.d_model), rel=0.02)
    with ActivationLoader([arr], ts, split="train", batch_size=512, include_first_position=True,
                          buffer_tokens=8192, read_threads=1) as loader:
        batch = next(iter(loader))
    assert batch.shape == (512, 1, GENERATOR.d_model)


def test_store_write_resumes_bit_identically(tmp_path):
    gen = ToyGenerator.from_spec(ToySpec(n_features=6, d_model=8, p_max=0.4, p_min=0.1, seed=3))
    layout = ToyStoreSpec(n_tokens=8192, context_length=64, chunk_tokens=1024, shard_tokens=2048,
                          scale_sample_tokens=2048)
    cfg, report = build_toy_experiment(tmp_path, gen, layout, log=lambda *a: None, progress=False)
    assert (report.shards_written, report.n_shards) == (4, 4)
    root = S.StoreRoot(cfg.store)
    arr = S.open_activation_array(root, report.array_path, require_complete=True)
    before = np.array(arr.array[:])
    # a killed writer: shard 2 never recorded, the array never completed
    root.delete(f"{arr.path}/_done/00000002.json")
    root.delete(f"{arr.path}/_complete.json")
    again = write_store(cfg, log=lambda *a: None, progress=False)
    assert again.shards_written == 1 and again.scale == report.scale
    arr = S.open_activation_array(root, report.array_path, require_complete=True)
    assert np.array_equal(np.array(arr.array[:]), before) and S.verify_array(arr) == []


def test_generator_statistics_match_the_spec():
    spec = ToySpec(n_features=12, d_model=16, p_max=0.45, p_min=0.05, correlated_fraction=0.8,
                   correlation_range=[0.4, 0.9], magnitude_std=0.2, seed=5)
    gen = ToyGenerator.from_spec(spec)
    n = 100_000
    x, codes = gen.sample(n, stream=11)
    fired = (codes > 0).double()
    p = gen.probabilities
    assert torch.allclose(gen.features @ gen.features.T, torch.eye(12, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(x, (codes.double() @ gen.features).float(), atol=1e-5)
    # firing rates: binomial error, 5 sigma
    assert ((fired.mean(0) - p).abs() <= 5 * (p * (1 - p) / n).sqrt()).all()
    # true L0: the mean of the per-sample count, 5 standard errors
    counts = fired.sum(1)
    assert abs(counts.mean() - gen.true_l0) <= 5 * counts.std() / math.sqrt(n)
    assert gen.true_l0 == pytest.approx(12 * (0.45 + 0.05) / 2)
    # correlated firing: indicator correlations as the copula predicts (sampling error ~1/sqrt(n))
    want = gen.expected_firing_correlation()
    got = torch.corrcoef(fired.T)
    off = ~torch.eye(12, dtype=torch.bool)
    assert (got - want)[off].abs().max() < 5 / math.sqrt(n)
    assert want[off].abs().max() > 0.2  # the check is not vacuous: features do co-fire
    # magnitudes of active features: mean and spread as asked
    active = codes[codes > 0].double()
    assert active.mean() == pytest.approx(spec.magnitude_mean, abs=0.01)
    assert active.std() == pytest.approx(spec.magnitude_std, abs=0.01)
    # a pure function of (seed, stream, n)
    assert torch.equal(gen.sample(500, stream=11)[0], gen.sample(500, stream=11)[0])
    assert not torch.equal(gen.sample(500, stream=12)[0], gen.sample(500, stream=11)[0])


def test_ground_truth_metrics_on_a_known_dictionary():
    gen = ToyGenerator.from_spec(ToySpec(n_features=8, d_model=12, p_max=0.5, p_min=0.1, seed=1))
    x = gen.sample(4096, stream=0)[0][:, None, :]
    true = G.ground_truth_dictionary(gen.features, 3)
    rec = G.feature_recovery(gen.features, true)
    assert rec.n_recovered == 8 and rec.best_cosine.min() == pytest.approx(1.0)
    # latents permuted and sign-flipped: recovered by |matching| only where the sign is right
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        true.W_dec.copy_(true.W_dec[perm])
        true.W_dec[0].neg_()
    assert G.feature_recovery(gen.features, true).n_recovered == 7
    order = G.matching_order(G.cosine_matrix(gen.features, G.decoder_rows(true)))
    assert np.array_equal(order, np.argsort(perm.numpy()))  # feature f's latent in column f
    exact = G.ground_truth_dictionary(gen.features, 8)
    assert G.variance_explained(exact, x, 8) == pytest.approx(1.0, abs=1e-5)
    assert G.variance_explained(exact, x, 1) < 0.9
    dp = G.decoder_projections(exact, x, [1, 7])
    assert dp[1] > 0.5 and dp[7] == pytest.approx(0.0, abs=1e-6)


def test_l0_estimate_reads_the_start_of_the_floor():
    ks = [2, 3, 4, 5, 6]
    dp = {1: [3, 3, 3, 3, 3],            # active projections: no floor near zero, skipped
          5: [1.0, 0.8, 0.4, 0.02, 0.0],  # falls to its floor at k=5
          6: [0.9, 0.6, 0.3, 0.01, 0.05],
          9: [0.01, 0.0, 0.0, 0.0, 0.0]}  # stays near zero: skipped
    est = G.estimate_true_l0(ks, dp)
    assert est.per_n == {5: 5, 6: 5} and est.estimate == 5
    assert set(est.skipped) == {1, 9} and est.argmin_per_n[6] == 5
    assert G.estimate_true_l0(ks, {1: [3] * 5, 4: [2, 2, 2, 2, 2]}).estimate is None


def test_study_spec_is_validated(tmp_path):
    bad = write_config(tmp_path / "study.toml", {"ks": [0, 3], "steps": 0, "bogus": 1,
                                                  "generator": {"p_min": 0.5, "p_max": 0.2}})
    with pytest.raises(ConfigError) as e:
        load_study_spec(bad)
    text = str(e.value)
    assert "bogus" in text and "ks" in text and "steps" in text and "p_min" in text
    good = write_config(tmp_path / "good.toml", {"ks": [3, 4], "steps": 10,
                                                  "generator": {"n_features": 8, "d_model": 8}})
    assert load_study_spec(good).generator.n_features == 8


def test_a_folder_holds_one_study(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps({"steps": 1}))
    with pytest.raises(ConfigError, match="other settings"):
        run_study(SPEC, tmp_path, log=lambda *a: None, progress=False)
