"""Relative decoder norms of a two-model crosscoder: both conventions (r of Anthropic / Kissane et
al., delta of Minder et al.) against hand-computed values, their classes and thresholds, the
[eval] keys that choose them, and dead latents kept out of the classes and the histograms."""

from __future__ import annotations

import csv
import io
import re

import numpy as np
import pytest
import torch

from evals import config as EC
from evals import decoder_norms as N
from evals import plots as PL
from evals.config import EvalSpec
from pipeline.typed_config import Rules, from_mapping

# (|d_A|, |d_B|) per latent, with r = B / (A + B) and delta = 1/2 ((B - A) / max(A, B) + 1) by hand
NORMS = [(1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (1.0, 0.5), (0.0, 0.0), (1.0, 0.6), (1.0, 0.15), (0.19, 1.0),
         (0.05, 0.95)]
R_HAND = [0.0, 1.0, 0.5, 1 / 3, np.nan, 0.6 / 1.6, 0.15 / 1.15, 1 / 1.19, 0.95]
DELTA_HAND = [0.0, 1.0, 0.5, 0.25, np.nan, 0.3, 0.075, 0.905, 0.5 * (0.9 / 0.95 + 1)]
# classes with the defaults: r: A-only < 0.1, B-only > 0.9, shared [0.3, 0.7];
# delta: A-only <= 0.1, B-only >= 0.9, shared [0.4, 0.6]
CLASSES_R = ["a-only", "b-only", "shared", "shared", "dead", "shared", "other", "other", "b-only"]
CLASSES_DELTA = ["a-only", "b-only", "shared", "other", "dead", "other", "a-only", "b-only", "b-only"]


def decoder() -> torch.Tensor:
    """Latent j's decoder rows point along different axes, with the norms of NORMS[j]."""
    w = torch.zeros(len(NORMS), 2, 4)
    for j, (a, b) in enumerate(NORMS):
        w[j, 0, j % 4] = a
        w[j, 1, (j + 1) % 4] = b
    return w


def test_both_relative_norms_by_hand():
    a = N.decoder_norm_analysis(decoder(), ["a", "b"], EvalSpec())
    np.testing.assert_allclose(a.relative, R_HAND, atol=1e-7)
    np.testing.assert_allclose(a.delta, DELTA_HAND, atol=1e-7)
    np.testing.assert_allclose(a.values("delta"), DELTA_HAND, atol=1e-7)
    # the functions themselves, and delta as a function of r (independent closed forms):
    # r >= 1/2: delta = 1 - (1 - r) / (2 r); r < 1/2: delta = r / (2 (1 - r))
    rng = np.random.default_rng(0)
    na, nb = rng.random(1000) ** 3, rng.random(1000) ** 3
    r, d = N.relative_norm_r(na, nb), N.relative_norm_delta(na, nb)
    np.testing.assert_allclose(d, np.where(r >= 0.5, 1 - (1 - r) / (2 * r), r / (2 * (1 - r))), atol=1e-12)
    # Minder et al.'s thresholds in r: delta >= 0.9 iff r >= 5/6, delta in [0.4, 0.6] iff r in [4/9, 5/9]
    assert ((d >= 0.9) == (r >= 5 / 6)).all()
    assert (((d >= 0.4) & (d <= 0.6)) == ((r >= 4 / 9) & (r <= 5 / 9))).all()


def test_classes_by_each_convention_and_their_thresholds():
    by_r = N.decoder_norm_analysis(decoder(), ["a", "b"], EvalSpec())
    by_delta = N.decoder_norm_analysis(decoder(), ["a", "b"], EvalSpec(relative_norm="delta"))
    assert list(by_r.classes) == CLASSES_R and list(by_delta.classes) == CLASSES_DELTA
    assert by_r.convention == "r" and by_delta.convention == "delta"
    assert by_delta.thresholds["shared_band"] == [0.4, 0.6] and by_r.thresholds["shared_band"] == [0.3, 0.7]
    assert "delta >= 0.9" in by_delta.thresholds["rule"] and "r > 0.9" in by_r.thresholds["rule"]
    assert by_delta.summary()["class_convention"] == "delta"
    assert set(by_delta.summary()["relative_norms"]) == {"relative_norm_r", "relative_norm_delta"}
    # thresholds are configurable for either convention
    tight = N.decoder_norm_analysis(decoder(), ["a", "b"], EvalSpec(relative_norm="delta", specific_below=0.05,
                                                                     specific_above=0.95, shared_band=[0.2, 0.8]))
    assert list(tight.classes) == ["a-only", "b-only", "shared", "shared", "dead", "shared", "other", "other",
                                   "b-only"]
    # more than two models: shares decide, whatever the convention
    three = N.decoder_norm_analysis(torch.randn(20, 3, 4), ["x", "y", "z"], EvalSpec(relative_norm="delta"))
    assert three.relative is None and three.delta is None and three.summary()["class_convention"] == "share"


def test_dead_latents_leave_the_classes_and_the_histograms(tmp_path):
    dead = np.zeros(len(NORMS), bool)
    dead[[2, 8]] = True  # a shared latent and a B-only one
    a = N.decoder_norm_analysis(decoder(), ["a", "b"], EvalSpec(), dead=dead, dead_definition="planted")
    expected = ["dead" if dead[j] else c for j, c in enumerate(CLASSES_R)]
    assert list(a.classes) == expected
    assert a.counts == {"a-only": 1, "b-only": 1, "shared": 2, "other": 2, "dead": 3}  # 2 planted + 1 zero
    assert a.summary()["dead_excluded"] == {"count": 3, "definition": "planted; or all decoder vectors zero"}
    assert list(N.rank_specific(a, 10)[1]) == [1, 7]  # dead latents are never listed
    assert np.isnan(a.specificity[[2, 4, 8]]).all()

    paths = PL.write_norm_plots(a, tmp_path)
    html = paths["relative_norms_html"].read_text()
    svgs = re.findall(r"<svg.*?</svg>", html, flags=re.S)
    assert len(svgs) == 3  # r with the classes, delta for comparison, cosines
    for svg, label in zip(svgs[:2], ("r = |d_b| / (|d_a| + |d_b|)", "delta = 1/2 ((|d_b| - |d_a|)")):
        assert label in svg  # the axis names the convention
        assert sum(int(n) for n in re.findall(r"\): (\d+)", svg)) == 6  # 9 latents, 3 dead
    assert "3 dead left out" in svgs[0]

    header, rows = N.norm_table(a, dead, None)
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    table = list(csv.DictReader(io.StringIO(text.getvalue())))
    assert [int(t["excluded_as_dead"]) for t in table] == [0, 0, 1, 0, 1, 0, 0, 0, 1]
    assert [t["dead_training"] for t in table] == [str(int(x)) for x in dead]
    assert [t["class_by_r"] for t in table] == expected
    np.testing.assert_allclose([float(t["relative_norm_delta"]) for t in table], DELTA_HAND, atol=1e-6)
    with pytest.raises(ValueError, match="dead mask has 3 entries for 9 latents"):
        N.decoder_norm_analysis(decoder(), ["a", "b"], dead=np.zeros(3, bool))


def _eval_spec(**values):
    errors: list[str] = []
    spec = from_mapping(EvalSpec, values, "eval", errors, Rules(checks=EC.rules()))
    return spec, errors


def test_eval_keys_are_validated():
    spec, errors = _eval_spec(relative_norm="delta", transfer_units="stored")
    assert not errors and spec.relative_norm == "delta" and spec.transfer_units == "stored"
    assert EC.shared_band(spec) == (0.4, 0.6) and EC.shared_band(EvalSpec()) == (0.3, 0.7)
    _, errors = _eval_spec(relative_norm="kissane")
    assert len(errors) == 1 and "eval.relative_norm" in errors[0] and "'delta'" in errors[0]
    _, errors = _eval_spec(transfer_units="raw")
    assert len(errors) == 1 and "eval.transfer_units" in errors[0] and "'source'" in errors[0]
    _, errors = _eval_spec(shared_band=[0.05, 0.5])
    assert len(errors) == 1 and "overlaps the specific ranges" in errors[0]
    _, errors = _eval_spec(specific_below=0.6, specific_above=0.4)
    assert errors and "specific_below" in errors[0]
