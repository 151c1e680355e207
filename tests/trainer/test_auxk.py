"""AuxK's default reach: d_model / 2 dead latents per token (Gao et al. 2024), not 2k.

Which latents AuxK trains is read off the gradient: a latent's encoder bias gets gradient only
from the main reconstruction (when its code is kept) or from AuxK (when it is among the aux_k
largest positive pre-activations of the dead latents). The expected set is computed by brute
force, token by token, from the pre-activations.
"""

import pytest
import torch

from trainer.config import DictionarySpec
from trainer.dictionaries import build_dictionary

D_MODEL = 32  # d_model / 2 = 16
K = 2  # 2k = 4: the old default, well below 16
N_LATENTS = 256


def _model(arch, n_models, **kw):
    spec = DictionarySpec(name="aux", architecture=arch, n_latents=N_LATENTS, k=K, aux_coefficient=1.0, **kw)
    return build_dictionary(spec, n_models, D_MODEL)


def _x(n_models, batch, seed=5):
    return torch.randn(batch, n_models, D_MODEL, generator=torch.Generator().manual_seed(seed)) + 0.2


def _expected_trained(model, x, f, dead, aux_k):
    """Brute force: the latents kept by the main codes, plus per token the aux_k largest positive
    pre-activations among the dead latents."""
    with torch.no_grad():
        pre = model.pre_activations(x)
    trained = set((f > 0).any(0).nonzero().flatten().tolist())
    dead_ids = dead.nonzero().flatten().tolist()
    for b in range(x.shape[0]):
        ranked = sorted(dead_ids, key=lambda j: -float(pre[b, j]))[: min(aux_k, len(dead_ids))]
        trained |= {j for j in ranked if pre[b, j] > 0}
    return trained


@pytest.mark.parametrize("arch,n_models", [("topk", 1), ("batchtopk", 1), ("topk", 2)])
def test_default_aux_k_is_half_d_model(arch, n_models):
    model = _model(arch, n_models)
    x = _x(n_models, batch=2)
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    dead[: 3 * N_LATENTS // 4] = True  # many dead: more than d_model / 2 with positive pre-activations
    loss, terms = model.loss(x, dead_mask=dead)
    loss.backward()
    got = set(model.b_enc.grad.nonzero().flatten().tolist())
    expected = _expected_trained(model, x, terms["f"], dead, D_MODEL // 2)
    assert got == expected
    aux_only = expected - set((terms["f"] > 0).any(0).nonzero().flatten().tolist())
    assert len(aux_only) > 2 * K * x.shape[0]  # more than 2k per token could ever reach
    assert model.aux_k == D_MODEL // 2 > 2 * K


def test_default_is_capped_by_the_dead_latents():
    model = _model("topk", 1)
    x = _x(1, batch=1)
    dead = torch.zeros(N_LATENTS, dtype=torch.bool)
    with torch.no_grad():
        pre = model.pre_activations(x)[0]
    dead[(pre > 0).nonzero().flatten()[:5]] = True  # 5 dead latents, each with a positive pre-activation
    loss, terms = model.loss(x, dead_mask=dead)
    loss.backward()
    got = set(model.b_enc.grad.nonzero().flatten().tolist())
    assert got == _expected_trained(model, x, terms["f"], dead, 5)
    assert set(dead.nonzero().flatten().tolist()) <= got


def test_explicit_aux_k_still_wins():
    model = _model("topk", 1, aux_k=3)
    x = _x(1, batch=1)
    dead = torch.ones(N_LATENTS, dtype=torch.bool)
    loss, terms = model.loss(x, dead_mask=dead)
    loss.backward()
    assert set(model.b_enc.grad.nonzero().flatten().tolist()) == _expected_trained(model, x, terms["f"], dead, 3)
    assert model.aux_k == 3
