"""SAEs and crosscoders: they learn planted sparse structure, and keep their contracts.

The planted data is made from a known dictionary (64 unit directions in d = 32, three active per
token), so a working architecture must reach a low FVU in a few hundred steps and, for TopK,
find the directions themselves. Crosscoder data adds models that see a fixed random rotation of
the same directions, plus a few directions only one model has.
"""

import json

import pytest
import torch

from trainer.architectures import ARCHITECTURES, BatchTopKDictionary
from trainer.config import DictionarySpec
from trainer.dictionaries import TENSOR_TERMS, Dictionary, build_dictionary, load_dictionary

D_MODEL = 32
N_LATENTS = 128
BATCH = 256

# architecture -> spec fields for planted-data training (coefficients suit E||x||^2 ~ 3 per model)
TRAIN_KW = {
    "relu": {"l1_coefficient": 0.03},
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    # unit-norm decoders: codes are in the inputs' units, where pre-activations of a matching atom are ~0.5-1.5
    "jumprelu": {"l0_coefficient": 0.03, "jumprelu_threshold_init": 0.1, "jumprelu_bandwidth": 0.1},
}


def _spec(arch, **kw):
    fields = {**TRAIN_KW[arch], "n_latents": N_LATENTS, **kw}
    return DictionarySpec(name=f"test-{arch}", architecture=arch, **fields)


def planted(n_tokens, n_models=1, seed=0, truth_seed=1234, n_atoms=64, per_token=3, n_specific=8):
    """(x [tokens, n_models, d], atoms [n_atoms, n_models, d]): sparse nonnegative mixtures.

    `truth_seed` draws the atoms (one ground truth shared by all calls), `seed` the tokens. Keep
    `truth_seed` away from the specs' seed (0): the same generator seed would draw the atoms as
    the initial decoder rows, and every architecture would "recover" them without learning. Model i > 0 sees
    the atoms through its own fixed random rotation; with several models, atoms
    [i*n_specific, (i+1)*n_specific) exist in model i only.
    """
    g = torch.Generator().manual_seed(truth_seed)
    base = torch.randn(n_atoms, D_MODEL, generator=g)
    base = base / base.norm(dim=1, keepdim=True)
    views = [base]
    for _ in range(1, n_models):
        rotation, _ = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, generator=g))
        views.append(base @ rotation)
    atoms = torch.stack(views, 1)
    if n_models > 1:
        for i in range(n_models):
            others = [j for j in range(n_models) if j != i]
            atoms[i * n_specific:(i + 1) * n_specific, others] = 0
    g = torch.Generator().manual_seed(seed)
    chosen = torch.rand(n_tokens, n_atoms, generator=g).topk(per_token, dim=1).indices
    coef = 0.5 + torch.rand(n_tokens, per_token, generator=g)
    codes = torch.zeros(n_tokens, n_atoms).scatter(1, chosen, coef)
    return torch.einsum("ta,and->tnd", codes, atoms), atoms


def train(model, x, steps, lr=3e-3, seed=0, dead_after=50):
    """The trainer's step in miniature: loss, backward, constraint-aware step, dead tracking."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    since_fired = torch.zeros(model.n_latents, dtype=torch.long)
    losses, fvus = [], []
    for _ in range(steps):
        batch = x[torch.randint(0, x.shape[0], (BATCH,), generator=g)]
        loss, terms = model.loss(batch, dead_mask=since_fired >= dead_after)
        opt.zero_grad()
        loss.backward()
        model.remove_parallel_grads_()
        opt.step()
        model.constrain_()
        since_fired = torch.where((terms["f"] > 0).any(0), 0, since_fired + 1)
        losses.append(loss.item())
        fvus.append(terms["fvu"].item())
    return losses, fvus


def _mean_tail(values, n=20):
    return sum(values[-n:]) / n


@pytest.fixture(scope="module")
def trained():
    """Train each (architecture, n_models) once per module; several tests inspect the result."""
    cache = {}

    def get(arch, n_models, steps=300):
        key = (arch, n_models, steps)
        if key not in cache:
            x, atoms = planted(8192, n_models)
            model = build_dictionary(_spec(arch), n_models, D_MODEL)
            threads = torch.get_num_threads()
            torch.set_num_threads(1)  # ops this small only pay for threads, worst on a busy machine
            try:
                losses, fvus = train(model, x, steps)
            finally:
                torch.set_num_threads(threads)
            cache[key] = model, losses, fvus, atoms
        return cache[key]

    return get


def _eval_fvu(model, x):
    model.eval()
    try:
        with torch.no_grad():
            x_hat, f = model(x)
    finally:
        model.train()
    fvu = (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    return fvu.item(), (f > 0).sum(1).float().mean().item()


def _recovered(model, atoms, n=0, cos=0.9):
    """Fraction of model n's ground-truth atoms that some decoder row matches to cosine > `cos`."""
    a = atoms[:, n][atoms[:, n].norm(dim=1) > 0]
    w = model.W_dec.detach()[:, n]
    sims = (a / a.norm(dim=1, keepdim=True)) @ (w / w.norm(dim=1, keepdim=True).clamp_min(1e-9)).T
    return (sims.max(1).values > cos).float().mean().item()


# ------------------------------------------------------------------------------ learning


@pytest.mark.parametrize("arch,n_models", [("relu", 1), ("topk", 1), ("batchtopk", 1), ("jumprelu", 1),
                                           ("relu", 2), ("batchtopk", 2)])
def test_learns_planted_structure(trained, arch, n_models):
    model, losses, fvus, atoms = trained(arch, n_models)
    assert _mean_tail(losses) < 0.5 * losses[0]
    assert _mean_tail(fvus) < 0.3
    held_out, _ = planted(2048, n_models, seed=1)
    fvu, l0 = _eval_fvu(model, held_out)
    assert fvu < 0.3  # for batchtopk this is the learned threshold at work, not the batch rule
    if arch in ("topk", "batchtopk"):
        assert 2 <= l0 <= 8  # k = 4 (batchtopk: on average)
    if arch in ("topk", "batchtopk"):  # sparse enough to find the planted directions themselves
        assert min(_recovered(model, atoms, n) for n in range(n_models)) >= 0.75


def test_jumprelu_thresholds_are_learned(trained):
    model, *_ = trained("jumprelu", 1)
    init = model.spec.jumprelu_threshold_init
    assert (model.threshold.detach() > init).float().mean() > 0.5  # the L0 penalty pushed them up


@pytest.mark.parametrize("arch", ["relu", "batchtopk"])
def test_three_model_crosscoder_trains(trained, arch):
    model, losses, fvus, _ = trained(arch, 3, steps=200)
    assert _mean_tail(losses) < 0.5 * losses[0]
    assert _mean_tail(fvus) < 0.4
    assert model.decoder_norms().shape == (N_LATENTS, 3)


# ------------------------------------------------------------------------------ construction


def _random_x(n_models=1, batch=BATCH, seed=3):
    return torch.randn(batch, n_models, D_MODEL, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch,n_models,norm", [("relu", 1, 0.1), ("relu", 2, 0.1), ("topk", 1, 1.0),
                                                ("batchtopk", 1, 1.0), ("batchtopk", 2, 0.1),
                                                ("jumprelu", 1, 1.0)])
def test_init(arch, n_models, norm):
    rng = torch.get_rng_state()
    model = build_dictionary(_spec(arch, seed=7), n_models, D_MODEL)
    assert torch.equal(torch.get_rng_state(), rng)  # seeded locally, the global RNG untouched
    assert type(model) is ARCHITECTURES[arch] and isinstance(model, Dictionary)
    assert model.W_enc.shape == (n_models, D_MODEL, N_LATENTS)
    assert model.W_dec.shape == (N_LATENTS, n_models, D_MODEL)
    assert model.b_enc.shape == (N_LATENTS,) and model.b_dec.shape == (n_models, D_MODEL)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model.decoder_norms(), torch.full((N_LATENTS, n_models), norm))
    assert torch.equal(model.W_enc, model.W_dec.permute(1, 2, 0))
    assert model.W_enc.data_ptr() != model.W_dec.data_ptr()
    assert not model.b_enc.any() and not model.b_dec.any()
    again = build_dictionary(_spec(arch, seed=7), n_models, D_MODEL)
    other = build_dictionary(_spec(arch, seed=8), n_models, D_MODEL)
    assert torch.equal(again.W_dec, model.W_dec) and not torch.equal(other.W_dec, model.W_dec)
    assert model.scales == [1.0] * n_models and model.folded is False


def test_build_refuses_what_cannot_work():
    with pytest.raises(ValueError, match="SAEs only"):
        build_dictionary(_spec("jumprelu"), 2, D_MODEL)
    with pytest.raises(ValueError, match="scales"):
        build_dictionary(_spec("relu"), 2, D_MODEL, scales=[1.0])
    model = build_dictionary(DictionarySpec(name="x", architecture="topk", n_latents=16), 1, D_MODEL)
    with pytest.raises(ValueError, match="k >= 1"):
        model.encode(_random_x())
    with pytest.raises(ValueError, match="shape"):
        build_dictionary(_spec("relu"), 2, D_MODEL).encode(_random_x(1))


@pytest.mark.parametrize("arch,n_models", [("relu", 1), ("topk", 1), ("batchtopk", 2), ("jumprelu", 1)])
def test_loss_terms(arch, n_models):
    model = build_dictionary(_spec(arch), n_models, D_MODEL)
    x = _random_x(n_models) + 0.5
    loss, terms = model.loss(x, dead_mask=torch.ones(N_LATENTS, dtype=torch.bool))
    extra = {"relu": "l1", "topk": "aux", "batchtopk": "aux", "jumprelu": "l0_penalty"}[arch]
    assert {"loss", "mse", "fvu", "l0", "f", extra} | {f"fvu/{i}" for i in range(n_models)} <= set(terms)
    assert all(not t.requires_grad for t in terms.values())
    assert all(t.dim() == 0 for name, t in terms.items() if name not in TENSOR_TERMS)
    assert torch.equal(terms["fired"], (terms["f"] > 0).any(0))
    assert torch.equal(terms["counts"], (terms["f"] > 0).sum(0).float())
    x_hat = model.decode(terms["f"])
    err = (x - x_hat).pow(2)
    var = (x - x.mean(0)).pow(2)
    torch.testing.assert_close(terms["mse"], err.sum((1, 2)).mean())
    torch.testing.assert_close(terms["fvu"], err.sum() / var.sum())
    for i in range(n_models):
        torch.testing.assert_close(terms[f"fvu/{i}"], err[:, i].sum() / var[:, i].sum())
    torch.testing.assert_close(terms["l0"], (terms["f"] > 0).sum(1).float().mean())
    spec = model.spec
    coefficient = {"relu": spec.l1_coefficient, "topk": spec.aux_coefficient,
                   "batchtopk": spec.aux_coefficient, "jumprelu": spec.l0_coefficient}[arch]
    torch.testing.assert_close(loss.detach(), terms["mse"] + coefficient * terms[extra])
    if arch == "relu":
        weighted = terms["f"] * model.decoder_norms().sum(1)
        torch.testing.assert_close(terms["l1"], weighted.sum(1).mean())
        loss_half, _ = model.loss(x, l1_coefficient=0.5 * spec.l1_coefficient)
        torch.testing.assert_close(loss_half, terms["mse"] + 0.5 * coefficient * terms["l1"])
    if arch == "jumprelu":
        torch.testing.assert_close(terms["l0_penalty"], terms["l0"])


# ------------------------------------------------------------------------------ TopK family


def test_topk_keeps_exactly_k():
    model = build_dictionary(_spec("topk", k=5), 1, D_MODEL)
    x = _random_x()
    f = model.encode(x)
    active = (f > 0).sum(1)
    assert (active <= 5).all() and (active == 5).float().mean() > 0.95
    pre = torch.relu(model.pre_activations(x))
    kept = torch.where(f > 0, pre, torch.full_like(pre, float("inf"))).min(1).values
    dropped = torch.where(f > 0, torch.zeros_like(pre), pre).max(1).values
    assert (kept >= dropped).all()  # the largest ones were kept, at their own values
    assert torch.equal(f[f > 0], pre[f > 0])
    assert ((model.encode(x, k=2) > 0).sum(1) <= 2).all()
    _, terms = model.loss(x, k=3)
    assert terms["l0"] <= 3


def test_topk_crosscoder_ranks_by_decoder_norm():
    model = build_dictionary(_spec("topk", k=1), 2, D_MODEL)
    x = _random_x(2, batch=8)
    pre = torch.relu(model.pre_activations(x))
    with torch.no_grad():  # make the weakest code of token 0 the winner through its decoder norm
        j = int(torch.where(pre[0] > 0, pre[0], torch.full_like(pre[0], float("inf"))).argmin())
        model.W_dec[j] *= 1e4
    f = model.encode(x)
    assert (f[0] > 0).nonzero().flatten().tolist() == [j]


def test_batchtopk_train_and_eval():
    model = build_dictionary(_spec("batchtopk", k=4), 1, D_MODEL)
    x = _random_x(batch=64)
    f = model.encode(x)
    assert int((f > 0).sum()) == 64 * 4
    assert (f > 0).sum(1).float().std() > 0  # per token it varies: k on average only
    assert ((model.encode(x, k=2) > 0).sum()) == 64 * 2

    assert float(model.threshold) < 0  # not estimated yet
    _, terms = model.loss(x)
    first = terms["f"][terms["f"] > 0].min()
    torch.testing.assert_close(model.threshold, first)  # first batch sets it
    _, terms = model.loss(_random_x(batch=64, seed=4))
    second = terms["f"][terms["f"] > 0].min()
    torch.testing.assert_close(model.threshold, 0.99 * first + 0.01 * second)  # then an EMA

    model.eval()
    threshold = model.threshold.clone()
    model.loss(x)  # eval: no update
    assert torch.equal(model.threshold, threshold)
    f_batch = model.encode(x)
    f_alone = torch.cat([model.encode(x[i:i + 1]) for i in range(x.shape[0])])
    assert torch.equal(f_batch > 0, f_alone > 0)
    torch.testing.assert_close(f_batch, f_alone)  # the same rule; only matmul rounding may differ
    pre = model.pre_activations(x)
    assert torch.equal(f_batch, pre * (pre > threshold))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu"])
def test_sae_decoder_rows_stay_unit_norm(arch):
    """JumpReLU too: without the constraint its loss is invariant to rescaling f, W_dec and the
    thresholds, while the straight-through bandwidth is an absolute width."""
    model = build_dictionary(_spec(arch), 1, D_MODEL)
    torch.testing.assert_close(model.decoder_norms(), torch.ones(N_LATENTS, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # without the fix, even these steps move norms
    for seed in range(3):
        loss, _ = model.loss(_random_x(seed=seed) + 1.0)
        opt.zero_grad()
        loss.backward()
        raw = model.W_dec.grad.clone()
        assert (raw * model.W_dec).sum(-1).abs().max() > 1e-3 * raw.norm()  # there was a radial part
        model.remove_parallel_grads_()
        grad = model.W_dec.grad
        unit = model.W_dec / model.W_dec.norm(dim=-1, keepdim=True)
        radial = (grad * unit).sum(-1)
        assert radial.abs().max() < 1e-6 * raw.norm()
        # what was removed is exactly the radial component (brute force, row by row)
        for j in range(0, N_LATENTS, 17):
            r, u = raw[j, 0], unit[j, 0]
            torch.testing.assert_close(grad[j, 0], r - (r @ u) * u, rtol=0, atol=1e-5 * float(r.norm()))
        opt.step()
        model.constrain_()
        torch.testing.assert_close(model.decoder_norms(), torch.ones(N_LATENTS, 1))


def test_crosscoder_and_relu_have_no_constraint():
    for arch, n_models in [("topk", 2), ("relu", 1)]:
        model = build_dictionary(_spec(arch), n_models, D_MODEL)
        with torch.no_grad():
            model.W_dec.mul_(3.0)
        before = model.W_dec.clone()
        loss, _ = model.loss(_random_x(n_models))
        loss.backward()
        grad = model.W_dec.grad.clone()
        model.remove_parallel_grads_()
        model.constrain_()
        assert torch.equal(model.W_dec, before) and torch.equal(model.W_dec.grad, grad)


# ------------------------------------------------------------------------------ AuxK


@pytest.mark.parametrize("arch,n_models", [("topk", 1), ("batchtopk", 1), ("topk", 2)])
def test_auxk(arch, n_models):
    model = build_dictionary(_spec(arch, k=2, aux_coefficient=1.0), n_models, D_MODEL)
    x = _random_x(n_models, batch=32) + 0.3
    all_dead = torch.ones(N_LATENTS, dtype=torch.bool)
    none_dead = torch.zeros(N_LATENTS, dtype=torch.bool)

    loss, terms = model.loss(x, dead_mask=all_dead)
    assert terms["aux"] > 0
    loss.backward()
    never_active = ~(terms["f"] > 0).any(0)  # the main loss cannot reach these encoder columns
    assert never_active.sum() > 0
    assert model.W_enc.grad[..., never_active].abs().sum() > 0
    assert model.b_enc.grad[never_active].abs().sum() > 0

    model.zero_grad()
    loss, terms = model.loss(x, dead_mask=none_dead)
    assert terms["aux"] == 0
    loss.backward()
    assert model.W_enc.grad[..., never_active].abs().sum() == 0
    assert model.loss(x)[1]["aux"] == 0  # no mask: nothing is known to be dead

    one_dead = none_dead.clone()
    one_dead[int(never_active.nonzero()[0])] = True  # aux_k (d_model / 2 = 16) is capped at 1 dead latent
    assert torch.isfinite(model.loss(x, dead_mask=one_dead)[1]["aux"])
    off = build_dictionary(_spec(arch, k=2, aux_k=0), n_models, D_MODEL)
    assert off.loss(x, dead_mask=all_dead)[1]["aux"] == 0


def test_auxk_matches_its_definition():
    model = build_dictionary(_spec("topk", k=2, aux_k=3), 1, D_MODEL)
    x = _random_x(batch=16) + 0.3
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[::2] = True
    _, terms = model.loss(x, dead_mask=dead)
    with torch.no_grad():
        pre = torch.relu(model.pre_activations(x))
        e = x - model.decode(terms["f"])
        z = torch.zeros_like(pre)
        for b in range(x.shape[0]):
            candidates = dead.nonzero().flatten()
            top = candidates[pre[b, candidates].topk(3).indices]
            z[b, top] = pre[b, top]
        e_hat = torch.einsum("bm,mnd->bnd", z, model.W_dec)
        expected = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(terms["aux"], expected)


# ------------------------------------------------------------------------------ JumpReLU


def test_jumprelu_forward_and_threshold_gradient():
    model = build_dictionary(_spec("jumprelu", jumprelu_threshold_init=0.05, jumprelu_bandwidth=0.1,
                                   l0_coefficient=1.0), 1, D_MODEL)
    x = _random_x(batch=64)
    pre = model.pre_activations(x)
    f = model.encode(x)
    assert torch.equal(f, pre * (pre > model.threshold))
    assert 0 < (f > 0).sum() < f.numel()

    loss, _ = model.loss(x)
    loss.backward()
    grad = model.log_threshold.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0

    model.zero_grad()  # the L0 penalty alone pushes thresholds up (negative gradient only)
    l0_only = build_dictionary(_spec("jumprelu", jumprelu_threshold_init=0.05, jumprelu_bandwidth=0.1,
                                     l0_coefficient=1e6), 1, D_MODEL)
    l0_only.loss(x)[0].backward()
    grad = l0_only.log_threshold.grad
    assert (grad <= 0).all() and (grad < 0).any()


# ------------------------------------------------------------------------------ folding, files


def _perturbed(arch, n_models, seed=11):
    """A dictionary with nonzero biases, uneven decoder norms and (batchtopk) a threshold."""
    model = build_dictionary(_spec(arch), n_models, D_MODEL)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.W_dec.mul_(0.5 + torch.rand(N_LATENTS, n_models, 1, generator=g))
        if isinstance(model, BatchTopKDictionary):
            model.threshold.fill_(0.05)
    return model


CASES = [("relu", 1), ("topk", 1), ("batchtopk", 1), ("jumprelu", 1), ("relu", 2), ("topk", 2),
         ("batchtopk", 2), ("batchtopk", 3)]


@pytest.mark.parametrize("arch,n_models", CASES)
@pytest.mark.parametrize("training", [True, False])
def test_fold_scales(arch, n_models, training):
    model = _perturbed(arch, n_models).train(training)
    scales = torch.exp(torch.randn(n_models, generator=torch.Generator().manual_seed(5)))
    x_raw = 3.0 * _random_x(n_models, batch=64)
    x_norm = x_raw * scales[:, None]
    original = {k: v.clone() for k, v in model.state_dict().items()}

    folded = model.fold_scales(scales.tolist())
    with torch.no_grad():
        expected_hat, expected_f = model(x_norm)
        got_f = folded.encode(x_raw)
        got_hat = folded.decode(got_f)
    torch.testing.assert_close(got_f, expected_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_hat, expected_hat / scales[:, None], rtol=1e-5, atol=1e-5)
    assert folded.folded and folded.scales == [1.0] * n_models
    assert not model.folded
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())  # a copy
    with pytest.raises(ValueError, match="already"):
        folded.fold_scales([2.0] * n_models)


def test_fold_scales_defaults_and_refusals():
    model = build_dictionary(_spec("topk"), 1, D_MODEL, scales=[4.0])
    folded = model.fold_scales()
    torch.testing.assert_close(folded.W_dec, model.W_dec / 4.0)
    with pytest.raises(RuntimeError, match="not trained"):
        folded.constrain_()
    with pytest.raises(ValueError, match="positive"):
        model.fold_scales([0.0])


@pytest.mark.parametrize("arch,n_models", CASES)
def test_save_load_round_trip(tmp_path, arch, n_models):
    model = _perturbed(arch, n_models)
    model.scales = [0.5 + i for i in range(n_models)]
    model.save(tmp_path / "d", {"step": 17, "models": ["a", "b", "c"][:n_models]})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["config.json", "dictionary.safetensors"]
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["architecture"] == arch and config["n_models"] == n_models
    assert config["d_model"] == D_MODEL and config["n_latents"] == N_LATENTS
    assert config["spec"]["architecture"] == arch and config["spec"]["k"] == model.spec.k
    assert config["scales"] == model.scales and config["folded"] is False and config["step"] == 17

    loaded = load_dictionary(tmp_path / "d")
    assert type(loaded) is type(model) and loaded.spec == model.spec and loaded.scales == model.scales
    assert loaded.state_dict().keys() == model.state_dict().keys()
    x = _random_x(n_models, batch=32)
    for training in (True, False):
        model.train(training)
        loaded.train(training)
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(model(x), loaded(x), strict=True))

    folded = model.fold_scales()
    folded.save(tmp_path / "f", {})
    again = load_dictionary(tmp_path / "f")
    assert again.folded and again.scales == [1.0] * n_models
    with torch.no_grad():
        assert torch.equal(again.eval()(x)[0], folded.eval()(x)[0])


def test_save_refuses_clashing_metadata(tmp_path):
    model = build_dictionary(_spec("relu"), 1, D_MODEL)
    with pytest.raises(ValueError, match="n_latents"):
        model.save(tmp_path, {"n_latents": 3})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch,n_models", [("relu", 2), ("topk", 1), ("batchtopk", 2), ("jumprelu", 1)])
def test_runs_on_cuda(tmp_path, arch, n_models):
    """Everything follows the input's device: one step, eval, folding and a round trip on the GPU."""
    model = _perturbed(arch, n_models).cuda()
    x = _random_x(n_models, batch=64).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, terms = model.loss(x, dead_mask=torch.ones(N_LATENTS, dtype=torch.bool))
    loss.backward()
    model.remove_parallel_grads_()
    opt.step()
    model.constrain_()
    assert terms["f"].is_cuda and torch.isfinite(loss)
    model.eval()
    scales = [0.5 + i for i in range(n_models)]
    folded = model.fold_scales(scales)
    s = torch.tensor(scales, device="cuda")[:, None]
    with torch.no_grad():
        torch.testing.assert_close(folded(x / s)[0], model(x)[0] / s, rtol=1e-4, atol=1e-4)
    model.save(tmp_path, {})
    loaded = load_dictionary(tmp_path, device="cuda").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)[0], model(x)[0])


def test_jumprelu_reconstruction_gradient_is_the_rectangle_ste():
    """Without the L0 term the threshold still learns, through JumpReLU's own estimator."""
    eps = 0.1
    model = build_dictionary(_spec("jumprelu", jumprelu_threshold_init=0.05, jumprelu_bandwidth=eps,
                                   l0_coefficient=0.0), 1, D_MODEL)
    x = _random_x(batch=64)
    f = model.encode(x)
    f.retain_grad()
    (x - model.decode(f)).pow(2).sum((1, 2)).mean().backward()
    with torch.no_grad():
        pre = model.pre_activations(x)
        theta = model.threshold
        window = ((pre - theta) / eps).abs() < 0.5
        d_theta = (f.grad * -(theta / eps) * window).sum(0)
    assert window.any()
    torch.testing.assert_close(model.log_threshold.grad, d_theta * theta)  # chain rule through exp
