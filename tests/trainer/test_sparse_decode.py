"""The sparse training step against the dense one: same loss, terms, codes and gradients.

The dense path (dense codes, dense products, autograd through them) is the reference: every check
runs the same dictionary twice, `sparse_decode` forced off and on, and compares the loss, every
term, the codes and the gradient of every parameter. The building blocks are checked against
brute force (a loop over tokens, an einsum on dense codes).
"""

import copy

import pytest
import torch

from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary
from trainer.sparse_decode import CPU_SPARSE_FRACTION, Pattern, SparseCodes, prefers_sparse

D_MODEL = 16
N_LATENTS = 256
BATCH = 48
PARAMS = ("W_enc", "b_enc", "W_dec", "b_dec")


def _model(arch, n_models, *, k=4, aux_k=None, dtype=torch.float64, seed=0):
    spec = DictionarySpec(name="s", architecture=arch, n_latents=N_LATENTS, k=k, aux_k=aux_k,
                          aux_coefficient=1.0, seed=seed)
    model = build_dictionary(spec, n_models, D_MODEL).to(dtype)
    with torch.no_grad():  # a trained-looking dictionary: nonzero biases, uneven decoder norms
        g = torch.Generator().manual_seed(seed + 1)
        model.b_enc.copy_(0.1 * torch.randn(N_LATENTS, generator=g))
        model.b_dec.copy_(0.2 * torch.randn(n_models, D_MODEL, generator=g))
        model.W_dec.mul_(0.5 + torch.rand(N_LATENTS, n_models, 1, generator=g))
    return model


def _x(n_models, batch=BATCH, seed=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, n_models, D_MODEL, generator=g) + 0.3).to(dtype)


def _run(model, x, sparse, **kw):
    model = copy.deepcopy(model)
    model.sparse_decode = sparse
    loss, terms = model.loss(x, **kw)
    loss.backward()
    return model, loss.detach(), terms


def _compare(model, x, rtol=1e-9, atol=1e-11, **kw):
    dense, loss_d, terms_d = _run(model, x, False, **kw)
    sparse, loss_s, terms_s = _run(model, x, True, **kw)
    torch.testing.assert_close(loss_s, loss_d, rtol=rtol, atol=atol)
    assert set(terms_s) == set(terms_d)
    for name in terms_d:
        torch.testing.assert_close(terms_s[name], terms_d[name], rtol=rtol, atol=atol, msg=name)
    for name in PARAMS:
        g_d, g_s = getattr(dense, name).grad, getattr(sparse, name).grad
        assert g_d is not None and g_s is not None, name
        torch.testing.assert_close(g_s, g_d, rtol=rtol, atol=atol, msg=name)
    for name, buf in dense.named_buffers():  # BatchTopK's threshold learns the same in both
        torch.testing.assert_close(dict(sparse.named_buffers())[name], buf, msg=name)
    return terms_d


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_models", [1, 2])
def test_training_step_matches_dense(arch, n_models):
    model = _model(arch, n_models)
    terms = _compare(model, _x(n_models))
    assert terms["l0"] > 0


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
@pytest.mark.parametrize("n_models", [1, 2])
@pytest.mark.parametrize("n_dead,aux_k", [(N_LATENTS, 8), (100, 8), (100, 64), (7, None)])
def test_auxk_matches_dense(arch, n_models, n_dead, aux_k):
    """AuxK active: all or some latents dead, its codes decoded sparsely (aux_k small against the
    dead) or densely (aux_k near their number), and capped at the number dead (7 < d_model / 2)."""
    model = _model(arch, n_models, aux_k=aux_k)
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[torch.randperm(N_LATENTS, generator=torch.Generator().manual_seed(n_dead))[:n_dead]] = True
    terms = _compare(model, _x(n_models), dead_mask=dead)
    assert terms["aux"] > 0


@pytest.mark.parametrize("n_models", [1, 2])
def test_batchtopk_inference_matches_dense(n_models):
    """Eval mode: the learned threshold keeps a count of codes that varies from token to token."""
    model = _model("batchtopk", n_models)
    model.eval()
    with torch.no_grad():
        ranked = model._ranked(torch.relu(model.pre_activations(_x(n_models))))
        model.set_threshold_(ranked.flatten().quantile(1 - 5 / N_LATENTS))
    terms = _compare(model, _x(n_models))
    per_token = (terms["f"] > 0).sum(1)
    assert per_token.min() < per_token.max() and per_token.max() > 0
    model.set_threshold_(-1.0)  # not yet estimated: every positive code, too many for sparse
    _compare(model, _x(n_models))


def test_float32_within_tolerance():
    model = _model("topk", 2, dtype=torch.float32)
    dead = torch.arange(N_LATENTS) % 3 == 0
    _compare(model, _x(2, dtype=torch.float32), rtol=1e-4, atol=1e-5, dead_mask=dead)


def test_default_rule_takes_the_sparse_path_here():
    """k / n_latents = 1/64 on a CPU: the step runs sparsely by default, and its dense codes are
    built only when read."""
    model = _model("topk", 1, dtype=torch.float32)
    _, terms = model.loss(_x(1, dtype=torch.float32))
    assert "f" not in terms._terms
    f = terms["f"]
    assert f.shape == (BATCH, N_LATENTS) and ((f > 0).sum(1) <= 4).all()
    assert terms["f"] is f and not f.requires_grad


def test_pattern_from_unordered_flat_indices():
    g = torch.Generator().manual_seed(0)
    batch, m = 9, 13
    idx = torch.randperm(batch * m, generator=g)[:40]
    p = Pattern.from_flat(idx, batch, m)
    expected = sorted((int(i) // m, int(i) % m) for i in idx)
    assert list(zip(p.rows.tolist(), p.latents.tolist())) == expected
    for b in range(batch):
        lo, hi = p.row_ptr[b], p.row_ptr[b + 1]
        assert (p.rows[lo:hi] == b).all() and hi - lo == sum(r == b for r, _ in expected)
    assert p.row_ptr[-1] == len(expected)


def test_sparse_decode_and_its_gradients_against_brute_force():
    g = torch.Generator().manual_seed(1)
    batch, m, n, d = 6, 20, 2, 5
    f = torch.randn(batch, m, generator=g, dtype=torch.float64) * (torch.rand(batch, m, generator=g) < 0.2)
    f[2] = 0  # a token with no codes at all
    w = torch.randn(m, n, d, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    upstream = torch.randn(batch, n, d, generator=g, dtype=torch.float64)
    f_s = f.clone().requires_grad_()
    out = SparseCodes.of_dense(f_s).decode(w, b)
    out.backward(upstream)
    grad_w, grad_f = w.grad.clone(), f_s.grad
    w.grad = None
    # brute force: token by token, latent by latent
    expected = torch.stack([b + sum(f[t, j] * w[j] for j in range(m)) for t in range(batch)])
    torch.testing.assert_close(out, expected.detach())
    expected.backward(upstream)
    torch.testing.assert_close(grad_w, w.grad)
    nonzero = f != 0
    dense_grad_f = torch.einsum("bnd,mnd->bm", upstream, w.detach())
    torch.testing.assert_close(grad_f, dense_grad_f * nonzero)


def test_decode_of_dense_codes_outside_autograd():
    """Dictionary.decode on sparse dense-laid codes (what evaluation splices) decodes their
    nonzero entries, and equals the einsum it stands for."""
    model = _model("topk", 2)
    with torch.no_grad():
        f = model.encode(_x(2))
        got = model.decode(f)
        expected = torch.einsum("bm,mnd->bnd", f, model.W_dec) + model.b_dec
    torch.testing.assert_close(got, expected)


def test_rule():
    assert prefers_sparse(32, 16384, 2048, "cpu")
    assert prefers_sparse(CPU_SPARSE_FRACTION * 1024, 1024, 64, "cpu")
    assert not prefers_sparse(CPU_SPARSE_FRACTION * 1024 + 1, 1024, 64, "cpu")
    assert not prefers_sparse(32, 16384, 2048, "cuda")
    assert not prefers_sparse(32, 16384, 2048, torch.device("meta"))
