"""Resampling dead latents of L1 dictionaries (Anthropic, "Towards Monosemanticity", simplified).

A dead latent gets a new decoder direction pointing at an input the dictionary reconstructs
badly (sampled with probability proportional to its squared error), an encoder row along the same
direction scaled to a fraction of the alive encoder norms, a zero bias, and fresh Adam moments, so
it starts on data the others do not explain.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def resample_dead_(model, opt: torch.optim.Optimizer, dead: torch.Tensor, x: torch.Tensor,
                   seed: tuple[int, int], encoder_scale: float = 0.2) -> int:
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return 0
    x_hat, _ = model(x)
    err = (x - x_hat).pow(2).sum(dim=(1, 2))  # [batch]
    if err.sum() <= 0:
        return 0
    gen = torch.Generator(device="cpu").manual_seed(hash(seed) % (2**63))
    picks = torch.multinomial(err.cpu(), idx.numel(), replacement=True, generator=gen).to(x.device)
    residual = (x - x_hat)[picks]  # [n_dead, n_models, d]
    direction = residual / residual.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    dec_norm = model.W_dec.norm(dim=-1)  # [m, n]
    alive = ~dead
    target_dec = dec_norm[alive].mean(0) if alive.any() else dec_norm.mean(0)  # [n]
    model.W_dec[idx] = direction * target_dec[None, :, None]
    enc_norm = model.W_enc.norm(dim=1)  # [n, m]
    target_enc = (enc_norm[:, alive].mean(1) if alive.any() else enc_norm.mean(1)) * encoder_scale
    model.W_enc[:, :, idx] = (direction * target_enc[None, :, None]).permute(1, 2, 0)
    model.b_enc[idx] = 0.0
    for p in (model.W_enc, model.W_dec, model.b_enc):
        state = opt.state.get(p, {})
        for name in ("exp_avg", "exp_avg_sq"):
            if name in state:
                if p is model.W_enc:
                    state[name][:, :, idx] = 0.0
                else:
                    state[name][idx] = 0.0
    return idx.numel()
