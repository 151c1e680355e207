"""Latent Scaling: the streamed, vectorized betas against a per-latent least-squares fit, planted
cases of each class, the pairs of an n-way crosscoder, the config checks and the driver's files."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from evals import latent_scaling as LS
from evals.analysis_specs import LatentScalingSpec, check_scaling_models, rules
from pipeline.typed_config import Rules, from_mapping
from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def random_crosscoder(n_models: int, d: int, n_latents: int, seed: int):
    """A ReLU crosscoder with random weights and biases, most latents firing on most tokens."""
    cc = build_dictionary(DictionarySpec(name="c", architecture="relu", n_latents=n_latents, seed=seed), n_models, d)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cc.W_dec.copy_(torch.randn(cc.W_dec.shape, generator=g))
        cc.W_enc.copy_(torch.randn(cc.W_enc.shape, generator=g) * 0.3)
        cc.b_enc.copy_(torch.rand(n_latents, generator=g) * 0.5)
        cc.b_dec.copy_(torch.randn(cc.b_dec.shape, generator=g) * 0.1)
    return cc


def brute_force_betas(cc, x: torch.Tensor, base: int, ft: int) -> dict[str, np.ndarray]:
    """Per latent, torch.linalg.lstsq of the four targets on the single column f_j(x_n) d_j^ft."""
    with torch.no_grad():
        f = cc.encode(x).double()
        x_hat = cc.decode(cc.encode(x)).double()
    w = cc.W_dec.detach().double()
    xd = x.double()
    out = {k: np.full(cc.n_latents, np.nan) for k in ("error_base", "error_ft", "recon_base", "recon_ft")}
    for j in range(cc.n_latents):
        if not (f[:, j] > 0).any():
            continue
        column = (f[:, j, None] * w[j, ft][None, :]).reshape(-1, 1)
        for key, m in (("base", base), ("ft", ft)):
            error = xd[:, m] - (x_hat[:, m] - f[:, j, None] * w[j, m][None, :])
            for kind, target in (("error", error), ("recon", x_hat[:, m])):
                sol = torch.linalg.lstsq(column, target.reshape(-1, 1)).solution
                out[f"{kind}_{key}"][j] = float(sol[0, 0])
    return out


def batches(x: torch.Tensor, rows: int):
    for lo in range(0, x.shape[0], rows):
        yield x[lo:lo + rows]


@pytest.mark.parametrize("n_models,base,ft", [(2, 0, 1), (3, 2, 0)])
def test_streamed_betas_equal_a_per_latent_least_squares_fit(n_models, base, ft):
    torch.manual_seed(0)
    cc = random_crosscoder(n_models, d=6, n_latents=7, seed=n_models)
    x = torch.randn(53, n_models, 6)
    names = [f"m{i}" for i in range(n_models)]
    spec = LatentScalingSpec(base=names[base], ft=names[ft])
    result = LS.latent_scaling(cc, batches(x, 8), names, spec)  # 8-row batches: sums across batches
    (p,) = result.pairs
    assert (p.base, p.ft) == (names[base], names[ft]) and result.n_tokens == 53
    expected = brute_force_betas(cc, x, base, ft)
    assert np.isfinite(expected["error_ft"]).sum() >= 5  # most latents fired: the check has teeth
    for key, want in expected.items():
        np.testing.assert_allclose(getattr(p, f"beta_{key}"), want, rtol=2e-4, atol=1e-6, err_msg=key)
    np.testing.assert_allclose(p.nu_epsilon, np.where(expected["error_ft"] > 0,
                                                      expected["error_base"] / expected["error_ft"], np.nan),
                               rtol=1e-3, atol=1e-6)
    norms = cc.W_dec.detach().norm(dim=-1).double().numpy()
    nb, nf = norms[:, base], norms[:, ft]
    np.testing.assert_allclose(p.delta, 0.5 * ((nf - nb) / np.maximum(nb, nf) + 1), rtol=1e-6)
    np.testing.assert_allclose(p.relative, nf / (nb + nf), rtol=1e-6)
    with torch.no_grad():
        np.testing.assert_array_equal(p.active, (cc.encode(x) > 0).sum(0).numpy())


E = torch.eye(6)


def planted_crosscoder():
    """Five latents on d_model = 6 (basis e0..e5), base = model 0, ft = model 1:
    0: decoder e0 for ft, zero for base, reads ft's e0          (the concept is in both models)
    1: decoder e1 for ft, zero for base, reads ft's e1          (the concept is only in ft)
    2: decoder e2 for ft, zero for base, reads ft's e2          (in both; base's copy is latent 3's)
    3: decoder e2 for base, zero for ft, reads base's e2
    4: decoder e3 for both, reads both models' e3 (shared)."""
    cc = build_dictionary(DictionarySpec(name="p", architecture="relu", n_latents=5), 2, 6)
    dec = torch.zeros(5, 2, 6)
    enc = torch.zeros(2, 6, 5)
    for j, (model, k) in enumerate([(1, 0), (1, 1), (1, 2), (0, 2)]):
        dec[j, model] = E[k]
        enc[model, k, j] = 1.0
    dec[4, 0] = dec[4, 1] = E[3]
    enc[0, 3, 4] = enc[1, 3, 4] = 0.5
    with torch.no_grad():
        cc.W_dec.copy_(dec)
        cc.W_enc.copy_(enc)
        cc.b_enc.zero_()
        cc.b_dec.zero_()
    return cc


def planted_activations(n: int = 400, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 4, generator=g) * (torch.rand(n, 4, generator=g) < 0.5)  # concepts 0..3, sparse
    noise = torch.randn(n, 2, 6, generator=g) * 0.01
    noise[..., :4] = 0  # noise off the concept directions only
    ft = a[:, 0, None] * E[0] + a[:, 1, None] * E[1] + a[:, 2, None] * E[2] + a[:, 3, None] * E[3]
    base = a[:, 0, None] * E[0] + a[:, 2, None] * E[2] + a[:, 3, None] * E[3]  # no e1 at all
    return torch.stack([base, ft], dim=1) + noise


def test_planted_shrinkage_genuine_decoupling_and_norm_classes():
    result = LS.latent_scaling(planted_crosscoder(), batches(planted_activations(), 64), ["base", "ft"])
    (p,) = result.pairs
    # latent 0: base's error still holds the whole concept (its base decoder was zeroed): nu_epsilon = 1
    assert p.nu_epsilon[0] == pytest.approx(1.0, abs=1e-4) and abs(p.nu_r[0]) < 1e-4
    # latent 1: nothing of e1 anywhere in the base model: both nus vanish
    assert abs(p.nu_epsilon[1]) < 1e-4 and abs(p.nu_r[1]) < 1e-4
    # latent 2: the base model's copy is reconstructed by latent 3, so it is in base's reconstruction
    assert abs(p.nu_epsilon[2]) < 1e-4 and p.nu_r[2] == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(p.delta, [1, 1, 1, 0, 0.5])
    assert list(p.classes) == [LS.SHRINKAGE, LS.GENUINE, LS.DECOUPLING, "base-only", "shared"]
    assert p.counts[LS.GENUINE] == 1 and p.counts["base-only"] == 1
    assert LS.pair_summary(p)["exclusive"] == {LS.GENUINE: [1], LS.SHRINKAGE: [0], LS.DECOUPLING: [2]}

    # thresholds are the spec's: with nu_r_max above 1, latent 2 counts as genuine
    loose = LS.latent_scaling(planted_crosscoder(), [planted_activations()], ["base", "ft"],
                              LatentScalingSpec(nu_r_max=1.5)).pairs[0]
    assert loose.classes[2] == LS.GENUINE
    # a latent that never fires has no beta: inactive
    silent = planted_activations()
    silent[:, 1, 1] = 0
    q = LS.latent_scaling(planted_crosscoder(), [silent], ["base", "ft"]).pairs[0]
    assert q.classes[1] == LS.INACTIVE and math.isnan(q.beta_error_ft[1]) and q.active[1] == 0


def test_pairs_for_two_and_more_models():
    spec = LatentScalingSpec
    assert LS.resolve_pairs(["a", "b"], spec()) == [(0, 1)]
    assert LS.resolve_pairs(["a", "b"], spec(ft="a")) == [(1, 0)]
    assert LS.resolve_pairs(["a", "b"], spec(base="b")) == [(1, 0)]
    assert LS.resolve_pairs(["a", "b", "c"], spec()) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    assert LS.resolve_pairs(["a", "b", "c"], spec(ft="c")) == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="'z' is not one of"):
        LS.resolve_pairs(["a", "b"], spec(base="z"))
    cc = random_crosscoder(3, d=4, n_latents=3, seed=1)
    res = LS.latent_scaling(cc, [torch.randn(20, 3, 4)], ["a", "b", "c"])
    assert [(p.base, p.ft) for p in res.pairs] == [("a", "b"), ("a", "c"), ("b", "a"), ("b", "c"),
                                                  ("c", "a"), ("c", "b")]
    sae = build_dictionary(DictionarySpec(name="s", architecture="relu", n_latents=3), 1, 4)
    with pytest.raises(ValueError, match="needs a crosscoder"):
        LS.latent_scaling(sae, [torch.randn(5, 1, 4)], ["a"])


def _parse(data):
    errors: list[str] = []
    spec = from_mapping(LatentScalingSpec, data, "eval.latent_scaling", errors, Rules(checks=rules()))
    return spec, errors


def test_spec_is_validated_and_unknown_keys_rejected():
    spec, errors = _parse({"ft": "chat", "max_rows": 1000, "nu_r_max": 0.6})
    assert not errors and spec == LatentScalingSpec(ft="chat", max_rows=1000, nu_r_max=0.6)
    _, errors = _parse({"nu_eps_max": 0.2})
    assert len(errors) == 1 and "unknown key" in errors[0] and "nu_epsilon_max" in errors[0]
    _, errors = _parse({"base": "x", "ft": "x", "exclusive_delta": 0.3, "shared_delta": [0.6, 0.4],
                        "max_rows": 0, "nu_epsilon_max": 0})
    assert len(errors) == 5, errors
    for key in ("ft", "exclusive_delta", "shared_delta", "max_rows", "nu_epsilon_max"):
        assert any(e.startswith(f"eval.latent_scaling.{key}:") for e in errors), key
    errors = []
    check_scaling_models(LatentScalingSpec(ft="chat"), ["base", "it"], "eval.latent_scaling", errors)
    assert len(errors) == 1 and "'chat' is not a [[models]] name" in errors[0] and "'it'" in errors[0]


# ------------------------------------------------------------------------------- the driver, on a store


@pytest.fixture(scope="module")
def trained_crosscoder(tmp_path_factory):
    """A cached store of two tiny models and a briefly trained crosscoder on both."""
    from mdiff.config import load_config
    from mdiff.tiny import build_fixture, train_section, write_config
    from pipeline.cache import run_cache
    from trainer import train as T

    d = tmp_path_factory.mktemp("scaling")
    fx = build_fixture(d, archs=("llama",), seeds=(0, 1), n_docs=120, d_model=32, n_layers=2)
    kw = {"n_tokens": 2048, "hooks": ((1, "resid_post"),), "store": str(d / "store")}
    run_cache(load_config(write_config(d / "cache.toml", fx, **kw)), log=lambda *a: None, progress=False)
    spec = 'name = "cc"\narchitecture = "relu"\nn_latents = 24\nl1_coefficient = 0.3'
    train = train_section(["llama-s0", "llama-s1"], [spec], steps=30, lr=3e-3, eval_every=30, eval_batches=1,
                          checkpoint_every=1000, read_threads=1)
    cfg = load_config(write_config(d / "cc.toml", fx, name="cc", train=train, **kw))
    report = T.run_train(cfg, log=lambda *a: None, progress=False)
    return cfg, report.out_dir / "cc"


def test_driver_streams_the_first_validation_rows_and_writes_csv_json_png(trained_crosscoder, tmp_path):
    from pipeline import store as S
    from trainer.dictionaries import load_dictionary

    cfg, dict_dir = trained_crosscoder
    spec = LatentScalingSpec(max_rows=100, batch_rows=32, device="cpu")
    logs = []
    summary = LS.run_latent_scaling(dict_dir, cfg, spec, tmp_path, progress=False, log=logs.append)
    assert summary["n_tokens"] == 100 and summary["models"] == ["llama-s0", "llama-s1"] and logs
    assert (tmp_path / "latent_scaling.png").read_bytes()[:8] == PNG_MAGIC

    # brute force on the same rows, read independently: validation rows, position 0 skipped, first 100
    meta = json.loads((dict_dir / "config.json").read_text())
    root = S.StoreRoot(cfg.store)
    ts = S.open_token_set(root, meta["tokenset_id"])
    first, ctx = ts.n_train_sequences, ts.context_length
    xs = [S.read_rows(S.open_activation_array(root, p), first * ctx, (first + 8) * ctx).float() for p in meta["arrays"]]
    x = torch.stack(xs, dim=1)[np.arange(8 * ctx) % ctx != 0][:100]
    cc = load_dictionary(dict_dir).eval()
    expected = brute_force_betas(cc, x, 0, 1)
    assert np.isfinite(expected["error_ft"]).sum() >= 5  # enough latents fired to compare

    with open(tmp_path / "latent_scaling.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:6] == ["latent", "base", "ft", "nu_epsilon", "nu_r", "class"]
    assert [int(r["latent"]) for r in rows] == list(range(24))
    for key, want in expected.items():
        got = np.array([float(r[f"beta_{key}"]) for r in rows])
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-5, err_msg=key)
    saved = json.loads((tmp_path / "latent_scaling.json").read_text())
    assert saved["pairs"] == summary["pairs"]
    (lat,) = saved["latents"]
    assert lat["class"] == [r["class"] for r in rows]
    assert sum(summary["pairs"][0]["counts"].values()) == 24
