"""Shared and dedicated latents: tied rows stay tied and dedicated rows stay zero through Adam
steps, checkpoints and resume; the shared latents' reduced L1 matches its formula; configs that
cannot work are refused; the evaluation's relative norms read the partition as built."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from evals.decoder_norms import DEAD, SHARED, decoder_norm_analysis, only
from mdiff.config import load_config, parse_config
from mdiff.tiny import train_section, write_config
from pipeline.typed_config import ConfigError
from tests.support import cache_tiny_store, interrupt_training_at
from trainer import checkpoint as ckpt
from trainer import train as T
from trainer.config import DictionarySpec, TrainSpec
from trainer.dictionaries import build_dictionary, load_dictionary
from trainer.latent_partition import DEFAULT_SHARED_PENALTY_FACTOR

D = 16
N_LATENTS = 48
SHARED_N, DEDICATED = 6, [4, 5]  # latents 0-5 shared, 6-9 model 0 only, 10-14 model 1 only


def _spec(arch: str, dedicated=DEDICATED, shared=SHARED_N, **kw) -> DictionarySpec:
    knobs = {"relu": {"l1_coefficient": 0.05}, "topk": {"k": 4}, "batchtopk": {"k": 4}}[arch]
    return DictionarySpec(name=arch, architecture=arch, n_latents=N_LATENTS, shared_latents=shared,
                          dedicated_latents=list(dedicated), **{**knobs, **kw})


def _data(n_models: int, n: int = 256, seed: int = 0) -> torch.Tensor:
    """Sparse nonnegative mixtures of 24 random atoms per model (each model its own view)."""
    g = torch.Generator().manual_seed(1000 + seed)
    atoms = torch.randn(24, n_models, D, generator=g)
    codes = torch.relu(torch.randn(n, 24, generator=g) - 1.0)
    return torch.einsum("ba,and->bnd", codes, atoms)


def _assert_partitioned(w: torch.Tensor, shared: int, dedicated: list[int]) -> None:
    """Shared rows bitwise identical across models, dedicated rows exactly zero elsewhere."""
    n_models = w.shape[1]
    for n in range(1, n_models):
        assert torch.equal(w[:shared, n], w[:shared, 0]), f"shared rows of model {n} differ from model 0"
    start = shared
    for model, count in enumerate(dedicated):
        rows = w[start:start + count]
        assert count == 0 or rows[:, model].abs().sum() > 0, "a dedicated latent lost its own decoder"
        others = [n for n in range(n_models) if n != model]
        assert torch.count_nonzero(rows[:, others]) == 0, f"latents dedicated to model {model} leak"
        start += count


# ------------------------------------------------------------------------------ construction


@pytest.mark.parametrize("arch", ["relu", "batchtopk"])
def test_init_ties_shared_rows_masks_dedicated_ones_and_leaves_the_rest(arch):
    model = build_dictionary(_spec(arch, seed=3), 2, D)
    plain = build_dictionary(_spec(arch, seed=3, shared=0, dedicated=[]), 2, D)
    w, w0 = model.W_dec.detach(), plain.W_dec.detach()
    _assert_partitioned(w, SHARED_N, DEDICATED)
    end = SHARED_N + sum(DEDICATED)
    assert torch.equal(w[end:], w0[end:])  # free latents: exactly the ordinary init
    assert torch.equal(w[:SHARED_N, 1], w0[:SHARED_N, 0])  # one drawn vector, for every model
    torch.testing.assert_close(model.decoder_norms()[w.norm(dim=-1) > 0],
                               torch.full((int((w.norm(dim=-1) > 0).sum()),), 0.1))
    assert torch.equal(model.W_enc, model.W_dec.permute(1, 2, 0))  # encoder = decoder transpose
    # the partition is saved with the weights; without one the state dict is the ordinary one
    assert {"decoder_mask", "shared_mask"} <= set(model.state_dict())
    assert not {"decoder_mask", "shared_mask"} & set(plain.state_dict())


def test_build_refuses_partitions_that_cannot_work():
    with pytest.raises(ValueError, match="SAE"):
        build_dictionary(_spec("relu"), 1, D)
    with pytest.raises(ValueError, match="one count per model"):
        build_dictionary(_spec("relu", dedicated=[1, 2, 3]), 2, D)
    with pytest.raises(ValueError, match="exceeds n_latents"):
        build_dictionary(_spec("relu", shared=40, dedicated=[5, 4]), 2, D)


# ------------------------------------------------------------------------------ training steps


def _member(spec: DictionarySpec, n_models: int, steps: int = 40):
    train = TrainSpec(dictionaries=[spec], steps=steps, lr=1e-2, lr_warmup_steps=0, grad_clip=1.0,
                      dead_after_tokens=512)
    return T.new_member(spec, train, n_models, D, [1.0] * n_models, "cpu"), train


@pytest.mark.parametrize("arch,n_models,dedicated", [("relu", 2, DEDICATED), ("batchtopk", 2, DEDICATED),
                                                     ("topk", 3, [3, 0, 2])])
def test_training_steps_keep_the_partition(arch, n_models, dedicated):
    m, train = _member(_spec(arch, dedicated=dedicated), n_models, steps=15)
    start = m.model.W_dec.detach().clone()
    x = _data(n_models)
    fvu_before = float(m.model.loss(x)[1]["fvu"])
    for step in range(train.steps):
        T.train_step(m, x, step, train)
        _assert_partitioned(m.model.W_dec.detach(), SHARED_N, dedicated)
    assert not torch.equal(m.model.W_dec[:SHARED_N], start[:SHARED_N])  # the tied rows did train
    assert float(m.model.loss(x)[1]["fvu"]) < 0.8 * fvu_before


@pytest.mark.parametrize("n_models", [2, 3])
def test_adam_keeps_tied_rows_identical_before_they_are_re_tied(n_models):
    """Averaged gradients into identical rows with identical (zero) Adam moments give identical
    steps: the rows are equal right after opt.step, before constrain_ re-ties them."""
    m, _ = _member(_spec("relu", dedicated=[]), n_models)
    x = _data(n_models, seed=1)
    for _ in range(5):
        loss, _ = m.model.loss(x)
        m.opt.zero_grad(set_to_none=True)
        loss.backward()
        raw = m.model.W_dec.grad.clone()
        m.model.remove_parallel_grads_()
        grad = m.model.W_dec.grad
        for n in range(n_models):  # brute force: the mean of the models' own gradients
            torch.testing.assert_close(grad[:SHARED_N, n], raw[:SHARED_N].mean(1))
        assert torch.equal(grad[SHARED_N:], raw[SHARED_N:])  # the free latents' gradients untouched
        torch.nn.utils.clip_grad_norm_(m.model.parameters(), 0.5)
        m.opt.step()
        w = m.model.W_dec.detach()
        assert all(torch.equal(w[:SHARED_N, n], w[:SHARED_N, 0]) for n in range(n_models))
        m.model.constrain_()


def test_constrain_projects_any_decoder_onto_the_partition():
    """From rows moved apart (as a resampling or a foreign state would): shared rows become their
    mean over models, dedicated rows lose their other models, free rows are untouched."""
    model = build_dictionary(_spec("relu"), 2, D)
    with torch.no_grad():
        model.W_dec.copy_(torch.randn(N_LATENTS, 2, D, generator=torch.Generator().manual_seed(5)))
    before = model.W_dec.detach().clone()
    model.constrain_()
    w = model.W_dec.detach()
    for n in range(2):
        torch.testing.assert_close(w[:SHARED_N, n], before[:SHARED_N].mean(1))
    assert torch.equal(w[6:10, 0], before[6:10, 0]) and not w[6:10, 1].any()
    assert torch.equal(w[10:15, 1], before[10:15, 1]) and not w[10:15, 0].any()
    assert torch.equal(w[15:], before[15:])
    with pytest.raises(RuntimeError, match="folded"):
        model.fold_scales([2.0, 4.0]).constrain_()


# ------------------------------------------------------------------------------ the reduced penalty


@pytest.mark.parametrize("factor", [None, 0.2])
def test_shared_latents_pay_the_reduced_l1(factor):
    model = build_dictionary(_spec("relu", shared_penalty_factor=factor), 2, D)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # rows of unequal norms, on the partition, and a nontrivial norm scale
        model.W_dec.mul_(torch.rand(N_LATENTS, 2, 1, generator=g) * 3)
        model.constrain_()
        model.decoder_norm_scale.copy_(torch.tensor([1.0, 2.5]))
    x = _data(2, n=32, seed=2)
    _, terms = model.loss(x, l1_coefficient=0.7)
    f = terms["f"]
    c = DEFAULT_SHARED_PENALTY_FACTOR if factor is None else factor
    expected = 0.0
    for b in range(x.shape[0]):
        for j in range(N_LATENTS):
            norms = sum(float(model.W_dec[j, n].detach().norm()) * [1.0, 2.5][n] for n in range(2))
            expected += float(f[b, j]) * norms * (c if j < SHARED_N else 1.0)
    expected /= x.shape[0]
    assert float(terms["l1"]) == pytest.approx(expected, rel=1e-5)
    assert float(terms["loss"]) == pytest.approx(float(terms["mse"]) + 0.7 * expected, rel=1e-5)


def test_topk_ranking_weight_is_the_plain_sum_of_decoder_norms():
    """TopK/BatchTopK get tied and masked decoders and no extra ranking weight (no penalty to reduce)."""
    model = build_dictionary(_spec("batchtopk"), 2, D)
    brute = torch.tensor([sum(float(model.W_dec[j, n].detach().norm()) for n in range(2)) for j in range(N_LATENTS)])
    torch.testing.assert_close(model._selection_weights().detach(), brute)


# ------------------------------------------------------------------------------ the evaluation's view


def test_relative_norms_read_dedicated_as_exclusive_and_shared_as_one_half():
    m, train = _member(_spec("relu"), 2, steps=20)
    x = _data(2)
    for step in range(train.steps):
        T.train_step(m, x, step, train)
    a = decoder_norm_analysis(m.model.W_dec, ["a", "b"])
    r = a.relative
    assert np.all(r[:SHARED_N] == 0.5) and np.all(a.delta[:SHARED_N] == 0.5)
    assert np.all(r[6:10] == 0.0) and np.all(r[10:15] == 1.0)
    assert set(a.classes[:SHARED_N]) == {SHARED}
    assert set(a.classes[6:10]) <= {only("a"), DEAD} and set(a.classes[10:15]) <= {only("b"), DEAD}
    assert np.all(a.cosine[:SHARED_N] == pytest.approx(1.0))


# ------------------------------------------------------------------------------ config checks


def _mapping(train_models, **dictionary) -> dict:
    entry = {"name": "cc", "architecture": "relu", "n_latents": 64, **dictionary}
    return {"name": "p", "store": "store",
            "models": [{"name": "base", "repo": "org/base"}, {"name": "chat", "repo": "org/chat"}],
            "hooks": [{"layer": 1}],
            "tokens": {"context_length": 16, "n_tokens": 4096, "sources": [{"kind": "hf", "name": "org/data"}]},
            "train": {"models": train_models, "dictionaries": [entry]}}


def _problems(mapping, tmp_path) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(mapping, "exp.toml", base_dir=tmp_path)
    return str(info.value)


def test_config_accepts_a_partition(tmp_path):
    cfg = parse_config(_mapping(["base", "chat"], shared_latents=8, dedicated_latents=[4, 4],
                                shared_penalty_factor=0.1), "exp.toml", base_dir=tmp_path)
    d = cfg.train.dictionaries[0]
    assert (d.shared_latents, d.dedicated_latents, d.shared_penalty_factor) == (8, [4, 4], 0.1)


@pytest.mark.parametrize("models,keys,expected", [
    (["base"], {"shared_latents": 4}, "dictionaries[0].shared_latents: partitions a crosscoder's latents"),
    (["base"], {"dedicated_latents": [4]}, "dictionaries[0].dedicated_latents: partitions a crosscoder"),
    (["base", "chat"], {"dedicated_latents": [4, 4, 4]}, "has 3 counts for 2 models"),
    (["base", "chat"], {"dedicated_latents": [4, -1]}, "dedicated_latents[1]: is negative"),
    (["base", "chat"], {"shared_latents": -2}, "shared_latents: is negative"),
    (["base", "chat"], {"shared_latents": 40, "dedicated_latents": [20, 10]}, "= 70 exceeds n_latents (64)"),
    (["base", "chat"], {"shared_penalty_factor": 0.1}, "is set but shared_latents is 0"),
    (["base", "chat"], {"shared_latents": 4, "shared_penalty_factor": 1.5}, "shared_penalty_factor: is 1.5"),
    (["base", "chat"], {"architecture": "batchtopk", "k": 8, "shared_latents": 4, "shared_penalty_factor": 0.1},
     "shared_penalty_factor: is only used by relu, not 'batchtopk'"),
])
def test_config_refuses_partitions_that_cannot_work(tmp_path, models, keys, expected):
    assert expected in _problems(_mapping(models, **keys), tmp_path)


# ------------------------------------------------------------------------------ checkpoints and resume


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    return cache_tiny_store(tmp_path_factory.mktemp("partition"), n_docs=300, n_layers=2, n_tokens=4096)


PARTITIONED = [
    {"name": "relu", "architecture": "relu", "n_latents": 64, "l1_coefficient": 0.1, "shared_latents": 8,
     "dedicated_latents": [4, 6], "shared_penalty_factor": 0.2},
    {"name": "btk", "architecture": "batchtopk", "n_latents": 64, "k": 4, "shared_latents": 8,
     "dedicated_latents": [6, 4]},
]


def test_partition_survives_checkpoints_resume_and_save(cached, monkeypatch):
    d, fx = cached

    def config(name: str) -> Path:
        sweep = train_section(["llama-s0", "llama-s1"], PARTITIONED, steps=30, checkpoint_every=10)
        return write_config(d / f"{name}.toml", fx, n_tokens=4096, hooks=((1, "resid_post"),),
                            store=str(d / "store"), name=name, train=sweep)

    full = T.run_train(load_config(config("full")), log=lambda *a: None, progress=False)
    cfg = load_config(config("cut"))
    real_step = interrupt_training_at(monkeypatch, 14)  # dies at step 15 (1-based), after checkpoint 10
    with pytest.raises(KeyboardInterrupt):
        T.run_train(cfg, log=lambda *a: None, progress=False)
    monkeypatch.setattr(T, "train_step", real_step)
    checkpoint = ckpt.latest_checkpoint(Path(cfg.train.out_dir) / "checkpoints")
    for spec in PARTITIONED:  # the checkpoint holds the partition and a partitioned decoder
        state = ckpt.load_part(checkpoint, spec["name"])[0]["dictionary"]
        assert {"decoder_mask", "shared_mask"} <= set(state)
        _assert_partitioned(state["W_dec"], 8, spec["dedicated_latents"])
    resumed = T.run_train(cfg, resume=True, log=lambda *a: None, progress=False)
    assert resumed.resumed_from == 10
    for spec in PARTITIONED:
        name = spec["name"]
        a = load_file(str(full.out_dir / name / "dictionary.safetensors"))
        b = load_file(str(resumed.out_dir / name / "dictionary.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        loaded = load_dictionary(resumed.out_dir / name)
        _assert_partitioned(loaded.W_dec.detach(), 8, spec["dedicated_latents"])
        assert torch.equal(loaded.decoder_mask, build_dictionary(loaded.spec, 2, 32).decoder_mask)
        meta = json.loads((resumed.out_dir / name / "config.json").read_text())
        assert meta["spec"]["dedicated_latents"] == spec["dedicated_latents"]
        # folded: each model's copy of a tied row is the row over that model's scale
        folded = loaded.fold_scales()
        for n, scale in enumerate(loaded.scales):
            torch.testing.assert_close(folded.W_dec[:8, n].detach() * scale, loaded.W_dec[:8, 0].detach())
