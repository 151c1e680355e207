"""The training variants: adaptive sparsity follows its formula, merging merges exactly the
near-duplicate pairs a brute-force cosine finds, the config refuses what does not apply, and
(end to end through `run_train`) each variant does what it says and survives a resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from mdiff.config import load_config, parse_config
from mdiff.tiny import train_section as tiny_train_section
from mdiff.tiny import write_config
from pipeline.typed_config import ConfigError
from tests.support import cache_tiny_store, interrupt_training_at
from trainer import resample as R
from trainer import train as T
from trainer import variants as V
from trainer.config import DictionarySpec
from trainer.dictionaries import Dictionary, build_dictionary

D = 16


def _relu(n_latents=32, n_models=2, **spec):
    """A relu dictionary after two Adam steps (uneven norms, Adam state to merge and reset)."""
    model = build_dictionary(DictionarySpec(name="v", architecture="relu", n_latents=n_latents, **spec), n_models, D)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.W_dec.mul_(0.5 + torch.rand(n_latents, n_models, 1, generator=g))
        model.b_enc.add_(0.1 * torch.randn(n_latents, generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(2):
        loss, _ = model.loss(torch.randn(32, n_models, D, generator=torch.Generator().manual_seed(seed)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _brute_pairs(w_dec: torch.Tensor, threshold: float) -> list[tuple[int, int]]:
    """Every pair's cosine over the concatenated models, in float64 one pair at a time, then the
    greedy disjoint matching: highest cosine first, ties by the lower indices."""
    v = w_dec.flatten(1).double()
    cos = ((v @ v.T) / (v.norm(dim=1)[:, None] * v.norm(dim=1)[None, :])).tolist()
    found = [(-cos[i][j], i, j) for i in range(len(cos)) for j in range(i + 1, len(cos)) if cos[i][j] > threshold]
    pairs, used = [], set()
    for _, i, j in sorted(found):
        if i not in used and j not in used:
            used |= {i, j}
            pairs.append((i, j))
    return pairs


# ------------------------------------------------------------------------------ adaptive sparsity


def test_adaptive_factor_is_the_clamped_ratio_of_target_to_the_smoothed_fvu():
    spec = DictionarySpec(name="a", architecture="relu", adaptive_l1_target_fvu=0.2, adaptive_l1_clamp=[0.5, 3.0],
                          adaptive_l1_ema_decay=0.5)
    state = V.VariantState.new()
    planted = [0.4, 0.01, 0.01, 0.01, 0.01, 0.01, 0.9, 0.9, 0.3, 0.2]
    ema, factors = None, []
    for fvu in planted:
        expected = 1.0 if ema is None else min(3.0, max(0.5, 0.2 / ema))  # from the batches before
        assert float(V.adaptive_factor(state, spec)) == pytest.approx(expected, rel=1e-6)
        knobs = V.scale_knobs(state, spec, {"l1_coefficient": 2.5})
        assert float(knobs["l1_coefficient"]) == pytest.approx(2.5 * expected, rel=1e-6)
        factors.append(expected)
        V.observe_(state, spec, {"fvu": torch.tensor(fvu)})
        ema = fvu if ema is None else 0.5 * ema + 0.5 * fvu
    assert 3.0 in factors and 0.5 in factors and any(0.5 < f < 3.0 and f != 1.0 for f in factors)  # both bounds hit
    assert V.log_fields(state, spec) == {"l1_factor": pytest.approx(min(3.0, max(0.5, 0.2 / ema)), rel=1e-6)}


def test_without_a_target_nothing_changes():
    spec = DictionarySpec(name="a", architecture="relu")
    state = V.VariantState.new()
    V.observe_(state, spec, {"fvu": torch.tensor(0.5)})
    assert V.adaptive_factor(state, spec) == 1.0 and int(state.fvu_seen) == 0
    assert V.scale_knobs(state, spec, {"l1_coefficient": 2.0}) == {"l1_coefficient": 2.0}
    assert V.log_fields(state, spec) == {}


def test_state_survives_a_checkpoint_file(tmp_path):
    spec = DictionarySpec(name="a", architecture="relu", adaptive_l1_target_fvu=0.1, merge_every=3)
    fvus = torch.rand(12, generator=torch.Generator().manual_seed(0))
    straight, cut = V.VariantState.new(), V.VariantState.new()
    for f in fvus[:5]:
        V.observe_(straight, spec, {"fvu": f})
        V.observe_(cut, spec, {"fvu": f})
    straight.merged_since_log = cut.merged_since_log = 4
    save_file(cut.tensors(), str(tmp_path / "variants.safetensors"))
    resumed = V.VariantState.new()
    resumed.load_(load_file(str(tmp_path / "variants.safetensors")))
    for f in fvus[5:]:
        V.observe_(straight, spec, {"fvu": f})
        V.observe_(resumed, spec, {"fvu": f})
    assert torch.equal(straight.fvu_ema, resumed.fvu_ema) and int(resumed.fvu_seen) == 12
    assert V.log_fields(resumed, spec) == V.log_fields(straight, spec) and resumed.merged_since_log == 0
    fresh = V.VariantState.new()
    fresh.load_({})  # a checkpoint from before the variants
    assert int(fresh.fvu_seen) == 0 and fresh.merged_since_log == 0


# ------------------------------------------------------------------------------ merging


def test_duplicate_pairs_match_a_brute_force_greedy_matching():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(40, 2, 8, generator=g)
    w[17] = 1.7 * w[5] + 0.05 * torch.randn(2, 8, generator=g)
    w[30] = w[3] + 0.1 * torch.randn(2, 8, generator=g)  # a triple: 3 ~ 30 ~ 31
    w[31] = 0.4 * w[3] + 0.03 * torch.randn(2, 8, generator=g)
    w[22, 1] = 0  # one model's slice off: the cosine is over the concatenation
    w[23] = w[22] * torch.tensor([1.0, 5.0])[:, None] + 0.01 * torch.randn(2, 8, generator=g)
    for threshold in (0.95, 0.6, 0.3):
        assert V.duplicate_pairs(w, threshold) == _brute_pairs(w, threshold), threshold
    pairs = V.duplicate_pairs(w, 0.95)
    assert (5, 17) in pairs and (22, 23) in pairs and len({3, 30, 31} & {i for p in pairs for i in p}) == 2


def test_a_planted_pair_ends_as_one_latent_and_a_reinitialized_one():
    n = 32
    model, opt = _relu(n, merge_every=5, merge_threshold=0.9)
    with torch.no_grad():  # latent 9: latent 4's decoder direction at another norm, its own encoder
        model.W_dec[9] = 1.5 * model.W_dec[4] + 0.01 * torch.randn(2, D, generator=torch.Generator().manual_seed(1))
    assert _brute_pairs(model.W_dec.detach(), 0.9) == [(4, 9)]
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    moments = {k: {s: opt.state[p][s].clone() for s in ("exp_avg", "exp_avg_sq")} for k, p in model.named_parameters()}
    counters = torch.arange(n) * 10
    state = V.VariantState.new()
    x = torch.randn(64, 2, D, generator=torch.Generator().manual_seed(8))
    spec = model.spec

    assert V.merge_due(model, opt, spec, counters, state, x, step=3) == 0  # not due: nothing moves
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert V.merge_due(model, opt, spec, counters, state, x, step=4) == 1

    torch.testing.assert_close(model.W_enc[:, :, 4], (before["W_enc"][:, :, 4] + before["W_enc"][:, :, 9]) / 2)
    torch.testing.assert_close(model.b_enc[4], (before["b_enc"][4] + before["b_enc"][9]) / 2)
    torch.testing.assert_close(model.W_dec[4], before["W_dec"][4] + before["W_dec"][9])
    # the freed latent: re-initialized as resampling does, along one input of the batch
    alive = [j for j in range(n) if j != 9]
    unit = model.W_dec[9] / model.W_dec[9].norm(dim=-1, keepdim=True)
    along = [b for b in range(64) if torch.allclose(unit, x[b] / x[b].norm(dim=-1, keepdim=True), atol=1e-5)]
    assert len(along) == 1
    for m in range(2):
        mean_dec = model.W_dec.detach()[alive, m].norm(dim=-1).mean()  # the alive rows, after the merge
        torch.testing.assert_close(model.W_dec[9, m].norm(), mean_dec)
        mean_enc = model.W_enc.detach()[m][:, alive].norm(dim=0).mean()
        torch.testing.assert_close(model.W_enc[m, :, 9], unit[m] * R.ENCODER_SCALE * mean_enc)
    assert model.b_enc[9] == 0
    others = [j for j in range(n) if j not in (4, 9)]
    for k, dim in (("W_enc", 2), ("W_dec", 0), ("b_enc", 0)):
        p = dict(model.named_parameters())[k]
        assert torch.equal(p.detach().index_select(dim, torch.tensor(others)),
                           before[k].index_select(dim, torch.tensor(others)))
        for s in ("exp_avg", "exp_avg_sq"):
            now, then = opt.state[p][s], moments[k][s]
            torch.testing.assert_close(now.index_select(dim, torch.tensor([4])),
                                       (then.index_select(dim, torch.tensor([4]))
                                        + then.index_select(dim, torch.tensor([9]))) / 2)
            assert not now.index_select(dim, torch.tensor([9])).any()
            assert torch.equal(now.index_select(dim, torch.tensor(others)), then.index_select(dim, torch.tensor(others)))
    assert torch.equal(model.b_dec, before["b_dec"])
    assert counters[4] == 40 and counters[9] == 0 and torch.equal(counters[others], torch.tensor(others) * 10)
    assert V.log_fields(state, spec) == {"merged": 1} and V.log_fields(state, spec) == {"merged": 0}
    assert V.duplicate_pairs(model.W_dec, 0.9) == []


def test_an_exact_duplicate_merges_without_changing_the_output():
    """Two identical latents fire alike; the merged one (mean encoder, summed decoder) alone gives
    the pair's output on every input, and the same L1 penalty."""
    model, opt = _relu(16, n_models=1)
    with torch.no_grad():
        for p, dim in ((model.W_enc, 2), (model.W_dec, 0), (model.b_enc, 0)):
            p.index_copy_(dim, torch.tensor([11]), p.index_select(dim, torch.tensor([2])))
    x = torch.randn(50, 1, D, generator=torch.Generator().manual_seed(2))
    f = model.encode(x).detach()
    pair = f[:, [2, 11]] @ model.W_dec.detach()[[2, 11]].flatten(1)
    penalty = (f[:, [2, 11]] * model.W_dec.detach()[[2, 11]].norm(dim=-1).sum(1)).sum(1)
    V.merge_pairs_(model, opt, [(2, 11)], x, torch.Generator().manual_seed(0))
    g = model.encode(x).detach()
    torch.testing.assert_close(g[:, 2:3] @ model.W_dec.detach()[2:3].flatten(1), pair)
    torch.testing.assert_close(g[:, 2] * model.W_dec.detach()[2].norm(dim=-1).sum(), penalty)


# ------------------------------------------------------------------------------ the config


def _parse(dictionary: dict, models=("a",)):
    config = {"name": "x", "store": "/tmp/s", "models": [{"name": "a", "path": "/tmp"}, {"name": "b", "path": "/tmp"}],
              "hooks": [{"layer": 1}], "tokens": {"tokenset": "ts-0123456789abcdef"},
              "train": {"models": list(models), "dictionaries": [{"name": "d", "n_latents": 8, **dictionary}]}}
    return parse_config(config)


def _problems(dictionary: dict) -> list[str]:
    with pytest.raises(ConfigError) as e:
        _parse(dictionary)
    return [line.removeprefix("<config>: train.dictionaries[0].") for line in str(e.value).splitlines()
            if line.startswith("<config>: train.dictionaries[0].")]


def test_the_config_takes_every_variant_on_relu():
    spec = _parse({"architecture": "relu", "l1_coefficient_start": 5.0, "l1_schedule_steps": 100,
                   "l1_schedule_delay": 10, "adaptive_l1_target_fvu": 0.1, "adaptive_l1_clamp": [0.2, 5],
                   "adaptive_l1_ema_decay": 0.9, "resample_dead_every": 50, "resample_window_steps": 25,
                   "merge_every": 200, "merge_threshold": 0.9}).train.dictionaries[0]
    assert (spec.l1_coefficient_start, spec.adaptive_l1_clamp, spec.resample_window_steps, spec.merge_threshold) == \
        (5.0, [0.2, 5.0], 25, 0.9)


@pytest.mark.parametrize("dictionary, expected", [
    ({"architecture": "batchtopk", "k": 4, "l1_coefficient_start": 2.0, "l1_schedule_steps": 10,
      "adaptive_l1_target_fvu": 0.1, "merge_every": 5, "resample_window_steps": 3},
     ["adaptive_l1_target_fvu: is only used by relu, not 'batchtopk' (remove it)",
      "l1_coefficient_start: is only used by relu, not 'batchtopk' (remove it)",
      "l1_schedule_steps: is only used by relu, not 'batchtopk' (remove it)",
      "merge_every: is only used by relu, not 'batchtopk' (remove it)",
      "resample_window_steps: is only used by relu, not 'batchtopk' (remove it)"]),
    ({"architecture": "relu", "l1_coefficient_start": -1.0, "l1_schedule_steps": 4, "adaptive_l1_target_fvu": 1.5,
      "adaptive_l1_clamp": [2.0, 3.0], "adaptive_l1_ema_decay": 1.0, "merge_every": 5, "merge_threshold": 1.0},
     ["l1_coefficient_start: is negative (-1.0) (use a value >= 0)",
      "adaptive_l1_target_fvu: is 1.5 (use the fraction of variance left unexplained to aim for, between 0 and 1, "
      "e.g. 0.1)",
      "adaptive_l1_clamp: is [2.0, 3.0] (give [lo, hi], the bounds of the factor on l1_coefficient, with "
      "0 < lo <= 1 <= hi, e.g. [0.1, 10])",
      "adaptive_l1_ema_decay: is 1.0 (use a decay in [0, 1), e.g. 0.99 (0: no smoothing))",
      "merge_threshold: is 1.0 (use a decoder cosine between 0 and 1, e.g. 0.95)"]),
    ({"architecture": "relu", "l1_coefficient_start": 2.0, "l1_schedule_delay": 3, "adaptive_l1_clamp": [0.5, 2.0],
      "resample_window_steps": 4, "merge_threshold": 0.5},
     ["adaptive_l1_clamp: does nothing without adaptive_l1_target_fvu (set adaptive_l1_target_fvu, or remove it)",
      "resample_window_steps: does nothing without resample_dead_every (set resample_dead_every, how often to "
      "resample)",
      "merge_threshold: does nothing without merge_every (set merge_every, how often to merge, or remove it)"]),
    ({"architecture": "relu", "l1_coefficient_start": 2.0, "l1_schedule_steps": 0},
     ["l1_coefficient_start: does nothing without l1_schedule_steps or l1_schedule_delay (set l1_schedule_steps, "
      "the steps it takes to reach l1_coefficient, or remove it)"]),
    ({"architecture": "relu", "resample_dead_every": 5, "resample_window_steps": -2},
     ["resample_window_steps: is negative (-2) (it is a size: a count of steps)"]),
    ({"architecture": "relu", "l1_schedule_steps": 10, "adaptive_l1_clamp": [0.5]},
     ["l1_schedule_steps: does nothing without l1_coefficient_start (set l1_coefficient_start, where the line "
      "starts)",
      "adaptive_l1_clamp: does nothing without adaptive_l1_target_fvu (set adaptive_l1_target_fvu, or remove it)",
      "adaptive_l1_clamp: is [0.5] (give [lo, hi], the bounds of the factor on l1_coefficient, with "
      "0 < lo <= 1 <= hi, e.g. [0.1, 10])"]),
])
def test_the_config_refuses_variants_that_do_not_apply(dictionary, expected):
    assert sorted(_problems(dictionary)) == sorted(expected)


# ------------------------------------------------------------------------------ end to end



SCHED = {"name": "sched", "architecture": "relu", "n_latents": 64, "l1_coefficient": 0.3, "l1_warmup_steps": 5,
         "l1_coefficient_start": 3.0, "l1_schedule_steps": 30, "l1_schedule_delay": 5}
ADAPT = {"name": "adapt", "architecture": "relu", "n_latents": 64, "l1_coefficient": 1.0,
         "adaptive_l1_target_fvu": 0.3, "adaptive_l1_clamp": [0.25, 4.0], "adaptive_l1_ema_decay": 0.8}
# a strong L1 kills latents within a few steps; dead_after_tokens is never reached, so only the
# window can make latents candidates
WINDOW = {"name": "window", "architecture": "relu", "n_latents": 64, "l1_coefficient": 30.0,
          "resample_dead_every": 15, "resample_window_steps": 4, "resample_sample_tokens": 1024}
MERGE = {"name": "merge", "architecture": "relu", "n_latents": 128, "l1_coefficient": 0.3, "merge_every": 10,
         "merge_threshold": 0.4}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return cache_tiny_store(tmp_path_factory.mktemp("variants"))


def _config(cached, name):
    d, fx = cached
    train = tiny_train_section(["llama-s0", "llama-s1"], [SCHED, ADAPT, WINDOW, MERGE], steps=45, checkpoint_every=15,
                               lr=1e-2, batch_size=64, extra={"dead_after_tokens": 10**9})
    return load_config(write_config(d / f"{name}.toml", fx, n_tokens=8192, hooks=((1, "resid_post"),),
                                    store=str(d / "store"), name=name, train=train))


def _spy(monkeypatch):
    """Per member and training step: the L1 coefficient the loss got, its FVU and firings; each
    resampling's candidates and result; each merge's decoder and pairs."""
    seen = {"l1": {}, "fvu": {}, "fired": {}, "resampled": {}, "merges": []}
    real_loss, real_resample, real_pairs = Dictionary.loss, R.resample, V.duplicate_pairs

    def loss(self, x, **kwargs):
        out = real_loss(self, x, **kwargs)
        if self.training:
            seen["l1"].setdefault(self.spec.name, []).append(float(kwargs["l1_coefficient"]))
            seen["fvu"].setdefault(self.spec.name, []).append(float(out[1]["fvu"]))
            seen["fired"].setdefault(self.spec.name, []).append(out[1]["fired"].clone())
        return out

    def resample(due, *args, **kwargs):
        out = real_resample(due, *args, **kwargs)
        for d, idx in zip(due, out):
            step = len(seen["l1"][d.model.spec.name]) - 1
            seen["resampled"].setdefault(d.model.spec.name, {})[step] = (d.dead.clone(), idx.clone())
        return out

    def pairs(w_dec, threshold):
        out = real_pairs(w_dec, threshold)
        seen["merges"].append((w_dec.detach().clone(), threshold, out))
        return out

    monkeypatch.setattr(Dictionary, "loss", loss)
    monkeypatch.setattr(R, "resample", resample)
    monkeypatch.setattr(V, "duplicate_pairs", pairs)
    return seen


def _lines(out, name):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["dictionary"] == name and "fvu" in r]


def test_each_variant_trains_as_defined_and_resumes_identically(cached, monkeypatch):
    quiet = {"log": lambda *a: None, "progress": False}
    seen = _spy(monkeypatch)
    full = T.run_train(_config(cached, "full"), **quiet)
    steps = 45

    # the schedule: held at 3.0 for 5 steps, down to 0.3 over 30, all times the 5-step warm-up
    for s, got in enumerate(seen["l1"]["sched"]):
        line = 3.0 if s < 5 else 3.0 + (0.3 - 3.0) * min(s - 5, 30) / 30
        assert got == pytest.approx(min(1.0, s / 5) * line, rel=1e-6), s
    assert [r["l1_coefficient"] for r in _lines(full.out_dir, "sched")][-1] == pytest.approx(0.3)

    # adaptive: clamp(0.3 / EMA of the earlier batches' FVU, 0.25, 4), replayed from the FVUs the loss returned
    ema, factors = None, []
    for s, (got, fvu) in enumerate(zip(seen["l1"]["adapt"], seen["fvu"]["adapt"], strict=True)):
        factor = 1.0 if ema is None else min(4.0, max(0.25, 0.3 / ema))
        assert got == pytest.approx(factor, rel=1e-5), s
        factors.append(factor)
        ema = fvu if ema is None else 0.8 * ema + 0.2 * fvu
    assert len(set(factors)) > 5
    for r in _lines(full.out_dir, "adapt"):  # logged: the factor the next step uses
        expected = factors[r["step"]] if r["step"] < steps else min(4.0, max(0.25, 0.3 / ema))
        assert r["l1_factor"] == pytest.approx(expected, rel=1e-5)

    # the window: at each resampling, the candidates are exactly the latents with no firing (and no
    # resampling) in the last 4 steps
    last, resampled = torch.full((64,), -1), 0
    for s, fired in enumerate(seen["fired"]["window"]):
        last[fired] = s
        silent = s - last >= 4
        if (s + 1) % 15 == 0 and silent.any():
            dead, idx = seen["resampled"]["window"].pop(s)
            assert torch.equal(dead, silent), s
            last[idx] = s
            resampled += idx.numel()
    assert not seen["resampled"]["window"] and resampled > 0  # none at other steps, or with no candidate

    # merging: every 10 steps, the brute-force pairs of that moment's decoder; the log counts them
    assert len(seen["merges"]) == 4
    for w_dec, threshold, pairs in seen["merges"]:
        assert pairs == _brute_pairs(w_dec, threshold)
    merged = sum(len(p) for _, _, p in seen["merges"])
    assert merged > 0 and sum(r["merged"] for r in _lines(full.out_dir, "merge")) == merged

    # a run cut at step 22 (between checkpoints and log lines) and resumed ends identical
    cfg = _config(cached, "cut")
    real_step = interrupt_training_at(monkeypatch, 22)
    with pytest.raises(KeyboardInterrupt):
        T.run_train(cfg, **quiet)
    monkeypatch.setattr(T, "train_step", real_step)
    report = T.run_train(cfg, resume=True, **quiet)
    assert report.resumed_from == 15
    for name in ("sched", "adapt", "window", "merge"):
        a = load_file(str(full.out_dir / name / "dictionary.safetensors"))
        b = load_file(str(report.out_dir / name / "dictionary.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    again = [json.loads(line) for line in (report.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert again == [json.loads(line) for line in (full.out_dir / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(again[-1]["val/fvu"])
