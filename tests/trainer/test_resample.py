"""Resampling dead latents as "Towards Monosemanticity" does: losses over a sample of inputs, one
input per dead latent drawn without replacement with probability proportional to loss^2, decoder
along the input, encoder at 0.2 x the alive encoder norm, bias 0, Adam moments reset; streamed
from a loader of its own, so the training batches and a resumed run are unaffected."""

from __future__ import annotations

import collections

import pytest
import torch
from safetensors.torch import load_file

from mdiff.config import load_config
from mdiff.tiny import train_section as tiny_train_section
from mdiff.tiny import write_config
from tests.support import cache_tiny_store, interrupt_training_at
from trainer import resample as R
from trainer import train as T
from trainer.config import DictionarySpec, TrainSpec
from trainer.dictionaries import build_dictionary

D = 16
N_LATENTS = 64


def _picker(n, seed=0):
    return R.LossWeightedPicker(n, torch.Generator().manual_seed(seed))


def _stream(picker, x, losses, batch):
    for i in range(0, x.shape[0], batch):
        picker.offer(x[i:i + batch], losses[i:i + batch])
    return picker.picked()


def _inputs(n, n_models=1, seed=0):
    return torch.randn(n, n_models, D, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the draw


def test_input_losses_are_squared_errors_per_input():
    model = build_dictionary(DictionarySpec(name="r", architecture="relu", n_latents=N_LATENTS), 2, D)
    x = _inputs(8, 2)
    got = R.input_losses(model, x)
    for b in range(8):
        x_hat = model.decode(model.encode(x[b:b + 1]))[0]
        torch.testing.assert_close(got[b], ((x[b] - x_hat) ** 2).sum())


def test_no_input_is_picked_twice():
    x = _inputs(300)
    losses = torch.rand(300, generator=torch.Generator().manual_seed(1)) + 0.1
    rows, positions = _stream(_picker(200), x, losses, batch=64)
    assert len(set(positions.tolist())) == 200 == rows.shape[0]
    assert torch.equal(rows, x[positions])
    rows, positions = _stream(_picker(500), x, losses, batch=64)  # more dead latents than inputs
    assert sorted(positions.tolist()) == list(range(300))


def test_only_inputs_with_loss_are_picked():
    x = _inputs(256)
    losses = torch.zeros(256)
    lossy = [3, 70, 71, 150, 255]
    losses[lossy] = torch.tensor([1.0, 0.5, 2.0, 0.01, 4.0])
    rows, positions = _stream(_picker(10), x, losses, batch=50)
    assert sorted(positions.tolist()) == lossy
    assert torch.equal(rows, x[positions])


def test_picks_follow_the_squared_loss():
    """Against the exact probabilities of successive draws with p proportional to loss^2 (a
    draw proportional to the loss itself would give 1/6, 2/6, 3/6 for the first pick)."""
    x, losses, trials = _inputs(3), torch.tensor([1.0, 2.0, 3.0]), 4000
    p = losses**2 / (losses**2).sum()
    first, pairs = collections.Counter(), collections.Counter()
    for seed in range(trials):
        _, one = _stream(_picker(1, seed), x, losses, batch=3)
        first[int(one[0])] += 1
        _, two = _stream(_picker(2, seed + trials), x, losses, batch=2)
        pairs[frozenset(two.tolist())] += 1
    for i in range(3):
        assert abs(first[i] / trials - float(p[i])) < 0.025, (i, first)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        exact = float(p[a] * p[b] / (1 - p[a]) + p[b] * p[a] / (1 - p[b]))
        assert abs(pairs[frozenset((a, b))] / trials - exact) < 0.025, (a, b, pairs)


def test_streaming_does_not_change_the_draw():
    x = _inputs(100)
    losses = torch.rand(100, generator=torch.Generator().manual_seed(2))
    whole = _stream(_picker(20, seed=9), x, losses, batch=100)
    pieces = _stream(_picker(20, seed=9), x, losses, batch=7)
    assert torch.equal(whole[1], pieces[1]) and torch.equal(whole[0], pieces[0])
    other = _stream(_picker(20, seed=10), x, losses, batch=7)
    assert not torch.equal(whole[1], other[1])


# ------------------------------------------------------------------------------ the new weights


def _trained_relu(n_models):
    """A relu dictionary after two Adam steps, with uneven norms: Adam has state to reset."""
    model = build_dictionary(DictionarySpec(name="r", architecture="relu", n_latents=N_LATENTS), n_models, D)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.W_dec.mul_(0.5 + torch.rand(N_LATENTS, n_models, 1, generator=g))
        model.W_enc.mul_(0.5 + torch.rand(n_models, 1, N_LATENTS, generator=g))
        model.b_enc.add_(0.1 * torch.randn(N_LATENTS, generator=g))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for seed in range(2):
        loss, _ = model.loss(_inputs(32, n_models, seed=seed))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("n_models", [1, 2])
def test_resampled_weights_and_adam_state(n_models):
    model, opt = _trained_relu(n_models)
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[[2, 9, 10, 40, 63]] = True
    inputs = _inputs(4, n_models, seed=7) * torch.tensor([1.0, 3.0])[:n_models, None]  # fewer inputs than dead
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    moments = {name: {k: opt.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")}
               for name, p in model.named_parameters()}
    alive = [j for j in range(N_LATENTS) if not dead[j]]

    idx = R.resample_dead_(model, opt, dead, inputs)
    assert idx.tolist() == [2, 9, 10, 40]  # the first four dead latents; 63 stays as it was
    for i, j in enumerate(idx.tolist()):
        for n in range(n_models):
            unit = inputs[i, n] / inputs[i, n].norm()
            mean_dec = sum(float(before["W_dec"][a, n].norm()) for a in alive) / len(alive)
            mean_enc = sum(float(before["W_enc"][n, :, a].norm()) for a in alive) / len(alive)
            torch.testing.assert_close(model.W_dec[j, n], unit * mean_dec)
            torch.testing.assert_close(model.W_enc[n, :, j], unit * 0.2 * mean_enc)
        assert model.b_enc[j] == 0
    untouched = [j for j in range(N_LATENTS) if j not in idx.tolist()]
    assert torch.equal(model.W_dec[untouched], before["W_dec"][untouched])
    assert torch.equal(model.W_enc[..., untouched], before["W_enc"][..., untouched])
    assert torch.equal(model.b_enc[untouched], before["b_enc"][untouched])
    assert torch.equal(model.b_dec, before["b_dec"])
    for name, p in model.named_parameters():
        for k in ("exp_avg", "exp_avg_sq"):
            now, then = opt.state[p][k], moments[name][k]
            if name == "b_dec":
                assert torch.equal(now, then)
                continue
            latent_dim = 2 if name == "W_enc" else 0
            assert not now.index_select(latent_dim, idx).any()
            rest = torch.tensor(untouched)
            assert torch.equal(now.index_select(latent_dim, rest), then.index_select(latent_dim, rest))
            assert then.index_select(latent_dim, idx).any()  # there was something to reset


# ------------------------------------------------------------------------------ in the trainer


# a strong L1, small batches and a short silence make latents die within a few dozen steps
RELU = {"name": "relu", "architecture": "relu", "n_latents": 128, "l1_coefficient": 30.0, "resample_dead_every": 15,
        "resample_sample_tokens": 2048}


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return cache_tiny_store(tmp_path_factory.mktemp("resample"))


def _config(cached, name, dictionaries, steps=60):
    d, fx = cached
    train = tiny_train_section(["llama-s0", "llama-s1"], dictionaries, steps=steps, checkpoint_every=15, lr=1e-2,
                               batch_size=64, extra={"dead_after_tokens": 128})
    return load_config(write_config(d / f"{name}.toml", fx, n_tokens=8192, hooks=((1, "resid_post"),),
                                    store=str(d / "store"), name=name, train=train))


def _spy(monkeypatch):
    """Record each step's batch and each resampling's result, as run_train sees them."""
    seen = {"batches": [], "resampled": {}}
    real_step, real_due = T.train_step, T.resample_due

    def step(m, x, step, *rest):
        if m is seen.setdefault("first", {}).setdefault(step, m):
            seen["batches"].append((step, x.clone()))
        return real_step(m, x, step, *rest)

    def due(members, step, *args, **kwargs):
        out = real_due(members, step, *args, **kwargs)
        if out:
            seen["resampled"][step] = out
        return out

    monkeypatch.setattr(T, "train_step", step)
    monkeypatch.setattr(T, "resample_due", due)
    return seen


def test_training_batches_are_untouched_and_a_resumed_run_resamples_identically(cached, monkeypatch):
    quiet = {"log": lambda *a: None, "progress": False}
    seen = _spy(monkeypatch)
    full = T.run_train(_config(cached, "full", [RELU]), **quiet)
    assert set(seen["resampled"]) == {29, 44, 59} and all(r["relu"] > 0 for r in seen["resampled"].values())

    plain = _spy(monkeypatch)
    T.run_train(_config(cached, "plain", [{**RELU, "resample_dead_every": 0}]), **quiet)
    assert not plain["resampled"]
    assert [s for s, _ in plain["batches"]] == [s for s, _ in seen["batches"]] == list(range(60))
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(plain["batches"], seen["batches"], strict=True))

    cfg = _config(cached, "cut", [RELU])
    cut = _spy(monkeypatch)
    interrupt_training_at(monkeypatch, 37)
    with pytest.raises(KeyboardInterrupt):
        T.run_train(cfg, **quiet)
    monkeypatch.undo()
    resumed = _spy(monkeypatch)
    report = T.run_train(cfg, resume=True, **quiet)
    assert report.resumed_from == 30 and set(cut["resampled"]) == {29}
    assert {**cut["resampled"], **resumed["resampled"]} == seen["resampled"]
    a = load_file(str(full.out_dir / "relu" / "dictionary.safetensors"))
    b = load_file(str(report.out_dir / "relu" / "dictionary.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_one_sample_pass_of_the_configured_size(cached, monkeypatch):
    """Members due at the same step share one loader; each reads its own number of tokens, at
    most the training split; the dead latents' counters restart, the others' do not."""
    cfg = _config(cached, "sizes", [{**RELU, "name": "a", "resample_sample_tokens": 1000},
                                    {**RELU, "name": "b", "resample_sample_tokens": 10**9}])
    root, ts, hook, names, arrays = T.open_arrays(cfg, cfg.train)
    members = [T.new_member(s, cfg.train, 2, 32, [a.scale for a in arrays], "cpu") for s in cfg.train.dictionaries]
    for m in members:
        m.tokens_since_fired[::3] = cfg.train.dead_after_tokens  # a third of the latents dead
        m.tokens_since_fired[1::3] = 5
    rows, loaders = collections.Counter(), []
    real_losses, real_loader = R.input_losses, T.make_loader

    def losses(model, x):
        rows[id(model)] += x.shape[0]
        return real_losses(model, x)

    def loader(*args, **kwargs):
        loaders.append(real_loader(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(R, "input_losses", losses)
    monkeypatch.setattr(T, "make_loader", loader)
    assert T.resample_due(members, 13, cfg.train, arrays, ts, "cpu", progress=False) == {}  # not due
    out = T.resample_due(members, 14, cfg.train, arrays, ts, "cpu", progress=False)
    assert len(loaders) == 1 and out == {"a": 43, "b": 43}
    assert rows[id(members[0].model)] == 1000
    assert rows[id(members[1].model)] == loaders[0].rows_per_epoch < 10**9
    for m in members:
        assert not m.tokens_since_fired[::3].any() and (m.tokens_since_fired[1::3] == 5).all()


# ------------------------------------------------------------------------------ the window


def test_window_candidates_are_the_latents_silent_for_the_last_window_steps(monkeypatch):
    """The trainer's counters over a planted firing history (the real train_step, with the
    dictionary's loss replaced by one that reports the planted firings), read through the window:
    exactly the latents that fired in none of the last W steps, none before W steps were trained;
    without a window, the dead ones."""
    n, batch, window, steps = 24, 8, 5, 30
    spec = DictionarySpec(name="w", architecture="relu", n_latents=n, resample_dead_every=10,
                          resample_window_steps=window)
    train = TrainSpec(dictionaries=[spec], batch_size=batch, steps=steps, dead_after_tokens=12 * batch)
    m = T.new_member(spec, train, 1, D, [1.0], "cpu")
    rates = torch.linspace(0.0, 0.6, n)  # latent 0 never fires, the last ones often
    history = torch.rand(steps, n, generator=torch.Generator().manual_seed(4)) < rates
    history[:, 7] = False
    history[3, 7] = True  # fires once, early
    history[14, 9], history[15:, 9] = True, False  # falls silent after step 14
    calls = iter(range(steps))

    def planted_loss(x, **kwargs):
        fired = history[next(calls)]
        return m.model.W_enc.sum() * 0.0, {"loss": torch.zeros(()), "fired": fired, "counts": fired.float()}

    monkeypatch.setattr(m.model, "loss", planted_loss)
    seen_silent = set()
    for s in range(steps):
        T.train_step(m, torch.zeros(batch, 1, D), s, train)
        got = R.resample_candidates(m.tokens_since_fired, train.dead_after_tokens, window, batch)
        expected = torch.tensor([s + 1 >= window and not history[max(0, s - window + 1): s + 1, j].any()
                                 for j in range(n)])
        assert torch.equal(got, expected), s
        seen_silent |= set(expected.nonzero().flatten().tolist())
        last = [max([t for t in range(s + 1) if history[t, j]], default=-1) for j in range(n)]
        dead = torch.tensor([(s - last[j]) * batch >= train.dead_after_tokens for j in range(n)])
        assert torch.equal(R.resample_candidates(m.tokens_since_fired, train.dead_after_tokens, 0, batch), dead)
    assert {0, 7, 9} <= seen_silent and len(seen_silent) < n  # the planted cases, and not everyone
